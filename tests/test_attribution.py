"""Which sample each row belongs to: the mis-attribution cases of the audit, at
sizes where the sequence length T equals the batch size N and where it does
not. Each either gives exact per-sample results (against the naive loop and
torch.func, float64, both materialize modes, norms, clip_ and dot) or raises an
error naming the module: never a silently wrong answer."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gradhooks
from gradhooks import BatchLayoutError, CheckError, GradhooksError, check_attribution, check_rule, per_sample_grads
from tests import reference
from tests.check import check_model

#: (N, T): T < N, T == N (where a misread dimension looks like the batch), T > N.
SIZES = [(5, 3), (4, 4), (2, 2), (3, 6)]
SIZE_IDS = [f"N{n}-T{t}" for n, t in SIZES]
UNEQUAL = [(n, t) for n, t in SIZES if n != t]  # where a reshape-order bug changes the rows
UNEQUAL_IDS = [f"N{n}-T{t}" for n, t in UNEQUAL]
V, D = 11, 4


class PositionTable(nn.Module):
    """nanoGPT: ``wpe(arange(T))`` is ``(T, D)``, batch-independent, added to ``(N, T, D)``."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(V, D)
        self.wpe = nn.Embedding(8, D)
        self.head = nn.Linear(D, 3)

    def forward(self, idx: Tensor) -> Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.head(torch.tanh(self.wte(idx) + self.wpe(pos))).mean(1)


class TimeMajorLinear(nn.Module):
    """A Linear applied to ``x.transpose(0, 1)``: the batch is dimension 1 of its input."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(D, D)
        self.head = nn.Linear(D, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.fc(x.transpose(0, 1)))  # (T, N, D)
        return self.head(h.transpose(0, 1)).mean(1)


class FirstRowOfPositions(nn.Module):
    """``pos_emb(ids)[0]`` on ``(1, T)`` ids: a batch-independent ``(T, D)`` table."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(V, D)
        self.pos = nn.Embedding(8, D)
        self.head = nn.Linear(D, 3)

    def forward(self, idx: Tensor) -> Tensor:
        ids = torch.arange(idx.shape[1], device=idx.device)[None]  # (1, T)
        return self.head(torch.tanh(self.wte(idx) + self.pos(ids)[0])).mean(1)


def _tokens(n: int, t: int) -> Tensor:
    return torch.randint(0, V, (n, t))


def _features(n: int, t: int) -> Tensor:
    return torch.randn(n, t, D, dtype=torch.float64)


def ce(reduction: str):
    return lambda m, x, y: F.cross_entropy(m(x), y, reduction=reduction)


EXACT = [
    pytest.param(PositionTable, _tokens, id="position-ids-(T,)"),
    pytest.param(TimeMajorLinear, _features, id="linear-on-transpose(0,1)"),
    pytest.param(FirstRowOfPositions, _tokens, id="pos_emb((1,T))[0]"),
]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("n, t", SIZES, ids=SIZE_IDS)
@pytest.mark.parametrize("make, make_x", EXACT)
def test_batch_independent_and_permuted_uses_are_exact(make, make_x, n, t, reduction):
    torch.manual_seed(n * 10 + t)
    batch = (make_x(n, t), torch.randint(0, 3, (n,)))
    check_model(make, ce(reduction), batch, reduction)


@pytest.mark.parametrize("n, t", SIZES, ids=SIZE_IDS)
@pytest.mark.parametrize("make, make_x", EXACT)
def test_attribution_check_agrees(make, make_x, n, t):
    """The on-demand check (random weights, and thorough) passes on the same cases."""
    torch.manual_seed(n * 10 + t)
    x, y = make_x(n, t), torch.randint(0, 3, (n,))
    loss = lambda out: F.cross_entropy(out, y, reduction="none")  # noqa: E731
    assert check_attribution(make(), x, loss)
    assert check_attribution(make(), x, loss, thorough=True)


class Mixed(nn.Module):
    """A Linear on a tensor whose rows are not one sample each."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.fc = nn.Linear(D, D)
        self.head = nn.Linear(D, 3)

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        if self.how == "reshape":  # (N, T, D) read as (T, N, D): rows of several samples mixed
            h = self.fc(x.reshape(t, n, d)).reshape(n, t, d)
        elif self.how == "flip":
            h = self.fc(x.flip(0))
        elif self.how == "roll":
            h = self.fc(x.roll(1, 0))
        elif self.how == "cumsum":
            h = self.fc(x.cumsum(0))
        elif self.how == "first-sample":
            h = self.fc(x[0]) + x
        else:  # "batch-mean"
            h = self.fc(x.mean(0, keepdim=True)) + x
        return self.head(torch.tanh(h)).mean(1)


MIXING = [
    # (how, N, T, the reason the error gives, or None: attributable, must be exact)
    ("reshape", 5, 3, "split the batch dimension"),
    ("reshape", 3, 6, None),  # (3, 6, D) read as (6, 3, D): sample n is rows 2n, 2n+1 of dim 0
    ("reshape", 4, 4, None),  # a reshape to the same shape changes nothing
    ("flip", 3, 5, "flip along the batch dimension"),
    ("roll", 4, 4, "roll along the batch dimension"),
    ("cumsum", 4, 4, "cumsum along the batch dimension"),
    ("first-sample", 4, 4, "indexing selected one sample"),
    ("first-sample", 2, 5, "indexing selected one sample"),
]


@pytest.mark.parametrize("how, n, t, why", MIXING, ids=[f"{c[0]}-N{c[1]}-T{c[2]}" for c in MIXING])
def test_rows_mixing_samples_are_exact_or_a_layout_error_naming_the_module(how, n, t, why):
    """Where each row still belongs to one sample the result is exact (against one
    backward per sample through the batch's forward: the model's function depends on
    N here, so a forward per sample is no reference); otherwise the error names 'fc'."""
    torch.manual_seed(n * 10 + t)
    x, y = _features(n, t), torch.randint(0, 3, (n,))
    loss = lambda out: F.cross_entropy(out, y, reduction="none")  # noqa: E731
    if why is None:
        assert check_attribution(Mixed(how), x, loss, thorough=True)
        return
    with pytest.raises(BatchLayoutError) as info:
        check_attribution(Mixed(how), x, loss, thorough=True)
    msg = str(info.value)
    assert "'fc' (Linear)" in msg and why in msg, msg


@pytest.mark.parametrize("n, t", SIZES, ids=SIZE_IDS)
def test_batch_mean_before_a_layer_names_the_module_and_the_cause(n, t):
    """A Linear on ``x.mean(0)``: the statistic couples the samples. The error must
    say so and name ``'fc'``, not blame a use the tracer cannot see."""
    model = Mixed("batch-mean").double()
    with pytest.raises(GradhooksError) as info:
        with per_sample_grads(model):
            ce("mean")(model, _features(n, t), torch.randint(0, 3, (n,))).backward()
    msg = str(info.value)
    assert "'fc' (Linear)" in msg and "mean over the batch" in msg, msg


# -- a user rule with a reshape-order bug ------------------------------------------


class Scale(nn.Module):
    """``y = x * w``, ``x: (N, T, d)``."""

    def __init__(self, d: int = D) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(d))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.w


class ReshapeBugRule(gradhooks.Rule):
    """``reshape(-1, N, d)`` where ``reshape(N, -1, d)`` was meant: every row of the
    batch sum is right, each sample gets other samples' rows."""

    def per_sample(self, module: nn.Module, calls: Sequence[gradhooks.Call], names: Sequence[str]) -> dict[str, Tensor]:
        n, d = calls[0].grad.shape[0], calls[0].grad.shape[-1]
        return {"w": sum((c.input * c.grad).reshape(-1, n, d).sum(0) for c in calls)}  # type: ignore[dict-item]


@pytest.fixture
def reshape_bug():
    gradhooks.register_rule(Scale, rule=ReshapeBugRule())
    try:
        yield
    finally:
        gradhooks.unregister_rule(Scale)


def _scaled() -> nn.Module:
    return nn.Sequential(nn.Linear(D, D), Scale(), nn.Tanh(), nn.Linear(D, 3))


@pytest.mark.parametrize("n, t", UNEQUAL, ids=UNEQUAL_IDS)
def test_reshape_bug_is_caught_by_check_rule(n, t):
    torch.manual_seed(0)
    with pytest.raises(CheckError) as info:
        check_rule(ReshapeBugRule, Scale(), _features(n, t))
    msg = str(info.value)
    assert "per_sample('w')" in msg and "batch sum is right" in msg, msg


@pytest.mark.parametrize("n, t", UNEQUAL, ids=UNEQUAL_IDS)
def test_reshape_bug_is_caught_by_check_attribution(reshape_bug, n, t):
    torch.manual_seed(0)
    y = torch.randint(0, 3, (n,))
    # The context's own exit check of user rules (RuleError) fires before the comparison.
    with pytest.raises((CheckError, gradhooks.RuleError), match=r"'1\.w'|'1' \(Scale\)"):
        check_attribution(_scaled(), _features(n, t), lambda out: F.cross_entropy(out.mean(1), y, reduction="none"))


@pytest.mark.parametrize("n, t", UNEQUAL, ids=UNEQUAL_IDS)
def test_reshape_bug_inside_the_context_is_not_silent(reshape_bug, n, t):
    """The README: a rule with wrong math raises instead of returning wrong numbers.
    Either the per-sample gradients are right or the context raises naming ``'1'``."""
    torch.manual_seed(0)
    model = _scaled().double()
    x, y = _features(n, t), torch.randint(0, 3, (n,))
    loss = lambda m, a, b: F.cross_entropy(m(a).mean(1), b, reduction="sum")  # noqa: E731
    ref = reference.naive(model, loss, x, y)
    try:
        with per_sample_grads(model, loss_reduction="sum") as g:
            loss(model, x, y).backward()
    except GradhooksError as err:
        assert "'1' (Scale)" in str(err), str(err)
        return
    torch.testing.assert_close(g["1.w"], ref["1.w"], rtol=1e-9, atol=1e-12)
