"""fallback=True: modules without a rule through torch.func, against the naive
loop and torch.func references, float64; plus strict=True / strict=False
without fallback, and the errors of modules the fallback cannot replay."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradhooks import FallbackWarning, GradhooksError, RuleError, UnsupportedModuleError, per_sample_grads
from gradhooks.rules import fallback as vmap_rule
from tests import reference
from tests.check import TOL, check_model
from tests.hygiene import assert_clean, snapshot

pytestmark = [
    pytest.mark.filterwarnings("ignore::gradhooks.FallbackWarning"),
    # torch.func's notice about its slow attention batching, from the vmap reference
    pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning"),
]

# -- user modules without a rule -------------------------------------------------


class Affine(nn.Module):
    """Bare parameters: ``x * scale + shift`` (``shift`` a scalar when ``scalar``)."""

    def __init__(self, d: int, scalar: bool = False) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(d))
        self.shift = nn.Parameter(torch.randn(()) if scalar else torch.randn(d))

    def forward(self, x):
        return x * self.scale + self.shift


class FunctionalLinear(nn.Module):
    """A weight used through ``F.linear``, no bias."""

    def __init__(self, i: int, o: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(o, i) / i**0.5)

    def forward(self, x):
        return F.linear(x, self.w)


class Gated(nn.Module):
    """A submodule Linear called normally plus an own parameter: one unit."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.gate = nn.Parameter(torch.randn(d))
        self.inner = Affine(d)  # a rule-less grandchild, in the same unit

    def forward(self, x):
        return self.inner(self.fc(x)) * torch.sigmoid(self.gate)


class SelfAttention(nn.Module):
    """``nn.MultiheadAttention`` (batch_first) as self-attention, then a head."""

    def __init__(self, need_weights: bool, masked: bool) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)
        self.need_weights = need_weights
        self.masked = masked

    def forward(self, x, mask):
        kw = {"key_padding_mask": mask} if self.masked else {}
        out, weights = self.attn(x, x, x, need_weights=self.need_weights, **kw)
        y = self.head(out).mean(1)
        if self.need_weights:  # the attention weights get a gradient too
            y = y + weights.square().sum((1, 2))[:, None]
        return y


class CrossAttention(nn.Module):
    """``kdim``/``vdim`` differ from ``embed_dim``: separate q/k/v projection weights."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, kdim=5, vdim=6)
        self.head = nn.Linear(8, 3)

    def forward(self, x, mask):
        q, k, v = x.roll(1, -1), x[..., :5], torch.tanh(x[..., 2:8])
        out, _ = self.attn(q, k, v, key_padding_mask=mask, need_weights=False)
        return self.head(out).mean(1)


class TwiceAffine(nn.Module):
    """One fallback module called twice: its calls add up."""

    def __init__(self) -> None:
        super().__init__()
        self.a = Affine(4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.a(torch.tanh(self.a(x)))))


class TiedFunctional(nn.Module):
    """A Linear and a fallback module sharing one weight: the sum, once in g."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.f = FunctionalLinear(4, 4)
        self.f.w = self.fc.weight
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.f(torch.tanh(self.fc(x))))


def mlp_with(middle: nn.Module, i: int = 5, d: int = 4) -> nn.Module:
    return nn.Sequential(nn.Linear(i, d), middle, nn.Tanh(), nn.Linear(d, 3))


def ce(reduction):
    return lambda m, x, y: F.cross_entropy(m(x), y, reduction=reduction)


def mse_masked(reduction):
    return lambda m, x, mask, y: F.mse_loss(m(x, mask), y, reduction=reduction)


def _tokens(n: int) -> torch.Tensor:
    return torch.randn(n, 5, 5, dtype=torch.float64)


def _flat(n: int) -> torch.Tensor:
    return torch.randn(n, 5, dtype=torch.float64)


def _mask(n: int, s: int = 4) -> torch.Tensor:
    mask = torch.zeros(n, s, dtype=torch.bool)
    mask[:, -1] = True
    mask[0, 1:] = True  # sample 0 attends to one key only
    return mask


def _functional_linear_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 4), FunctionalLinear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def _tokens_mlp() -> nn.Module:
    """``(N, T, 5)`` tokens through a fallback module, then flattened."""
    return nn.Sequential(nn.Linear(5, 4), Affine(4), nn.Tanh(), nn.Flatten(), nn.Linear(20, 3))


# (model factory, input factory, fallback module names)
PLAIN = [
    pytest.param(lambda: mlp_with(Affine(4)), _flat, ["1"], id="affine"),
    pytest.param(lambda: mlp_with(Affine(4, scalar=True)), _flat, ["1"], id="affine-scalar-shift"),
    pytest.param(_tokens_mlp, _tokens, ["1"], id="affine-tokens"),
    pytest.param(_functional_linear_mlp, _flat, ["1"], id="functional-linear"),
    pytest.param(lambda: mlp_with(Gated(4)), _flat, ["1"], id="gated-subtree"),
    pytest.param(lambda: Gated(5), _flat, [""], id="model-is-the-unit"),
    pytest.param(lambda: nn.Sequential(nn.Linear(5, 4), TwiceAffine()), _flat, ["1.a"], id="called-twice"),
    pytest.param(lambda: nn.Sequential(nn.Linear(5, 4), TiedFunctional()), _flat, ["1.f"], id="tied-with-linear"),
]

ATTENTION = [
    ("mha-no-weights", lambda: SelfAttention(need_weights=False, masked=False)),
    ("mha-weights", lambda: SelfAttention(need_weights=True, masked=False)),
    ("mha-mask", lambda: SelfAttention(need_weights=False, masked=True)),
    ("mha-weights-mask", lambda: SelfAttention(need_weights=True, masked=True)),
    ("mha-kdim-vdim-mask", CrossAttention),
]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("n", [1, 5], ids=["N=1", "N=5"])
@pytest.mark.parametrize("make, make_x, fallbacks", PLAIN)
def test_fallback_matches_references(make, make_x, fallbacks, n, reduction):
    torch.manual_seed(n)
    x, y = make_x(n), torch.randint(0, 3, (n,))
    check_model(make, ce(reduction), (x, y), reduction, fallback=True)
    with per_sample_grads(make().double(), fallback=True) as g:
        pass
    assert g.fallback_modules == fallbacks


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("n", [1, 4], ids=["N=1", "N=4"])
@pytest.mark.parametrize("make", [c[1] for c in ATTENTION], ids=[c[0] for c in ATTENTION])
def test_multihead_attention_matches_references(make, n, reduction):
    torch.manual_seed(n)
    x, y = torch.randn(n, 4, 8, dtype=torch.float64), torch.randn(n, 3, dtype=torch.float64)
    check_model(make, mse_masked(reduction), (x, _mask(n), y), reduction, fallback=True)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("materialize", [True, False])
def test_scalar_parameter(materialize, reduction):
    """A 0-dim parameter: (N,) per-sample gradients, norms and clip_ against the naive loop."""
    torch.manual_seed(0)
    model = mlp_with(Affine(4, scalar=True)).double()
    x, y = _flat(5), torch.randint(0, 3, (5,))
    ref = reference.naive(model, ce(reduction), x, y)
    flat = torch.cat([t.reshape(5, -1) for t in ref.values()], 1)
    c = (0.3 / (flat.norm(dim=1) + 1e-6)).clamp(max=1.0)
    with per_sample_grads(model, fallback=True, loss_reduction=reduction, materialize=materialize) as g:
        ce(reduction)(model, x, y).backward()
    if materialize:
        assert g["1.shift"].shape == (5,)
        torch.testing.assert_close(g["1.shift"], ref["1.shift"], **TOL)
    torch.testing.assert_close(g.param_norms()["1.shift"], ref["1.shift"].abs(), **TOL)
    torch.testing.assert_close(g.norms(), flat.norm(dim=1), **TOL)
    torch.testing.assert_close(g.clip_(0.3), c, **TOL)
    div = 5 if reduction == "mean" else 1
    torch.testing.assert_close(model[1].shift.grad, (c * ref["1.shift"]).sum() / div, **TOL)


def test_blocks_of_samples_match(monkeypatch):
    """Temporaries bounded by processing blocks: one sample per block gives the same."""
    monkeypatch.setattr(vmap_rule, "BLOCK_ELEMENTS", 1)
    x, mask, y = torch.randn(5, 4, 8, dtype=torch.float64), _mask(5), torch.randn(5, 3, dtype=torch.float64)
    check_model(CrossAttention, mse_masked("mean"), (x, mask, y), "mean", fallback=True, use_vmap=False)


@pytest.mark.parametrize("block", [1 << 24, 1], ids=["one-block", "block-per-sample"])
@pytest.mark.parametrize("make", [lambda: mlp_with(Gated(4)), lambda: nn.Sequential(nn.Linear(5, 4), TiedFunctional())], ids=["gated", "tied"])
def test_reuse_writes_into_the_earlier_storage(make, block, monkeypatch):
    """``reuse=g``: per-sample gradients written (or, tied, added) into warm storage."""
    monkeypatch.setattr(vmap_rule, "BLOCK_ELEMENTS", block)
    torch.manual_seed(0)
    model = make().double()
    g = None
    for step in range(2):
        x, y = _flat(4), torch.randint(0, 3, (4,))
        model.zero_grad(set_to_none=True)
        with per_sample_grads(model, fallback=True, loss_reduction="sum", reuse=g) as g:
            ce("sum")(model, x, y).backward()
        if step == 0:
            storage = sorted(t.data_ptr() for t in g.values())
    assert sorted(t.data_ptr() for t in g.values()) == storage  # pooled by shape, not by name
    ref = reference.naive(model, ce("sum"), x, y)
    for k in ref:
        torch.testing.assert_close(g[k], ref[k], **TOL)


def test_warning_names_the_units_and_hooks_leave_nothing():
    model = nn.Sequential(nn.Linear(5, 4), Gated(4), SelfAttention(False, False).attn).double()
    before = snapshot(model)
    with pytest.warns(FallbackWarning) as record:
        with per_sample_grads(model, fallback=True) as g:
            pass
    msg = str(record[0].message)
    assert len(record) == 1
    # MultiheadAttention has a rule (its uses are captured per op): not a fallback unit.
    assert "'1' (Gated)" in msg and "MultiheadAttention" not in msg and "1.inner" not in msg
    assert g.fallback_modules == ["1"]
    assert_clean(model, before)


def test_replay_is_silent():
    """No torch.func notices reach the user: only our FallbackWarning."""
    model = mlp_with(Gated(4)).double()
    x = _flat(3)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with per_sample_grads(model, fallback=True, materialize=False, loss_reduction="sum") as g:
            model(x).sum().backward()
        g.clip_(1.0)
    assert [w.category for w in record] == [FallbackWarning], [str(w.message) for w in record]


def _count_forwards(module: nn.Module) -> list[int]:
    """A counter of ``module``'s forward runs (replays included), via a test-owned hook."""
    count = [0]
    module.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    return count


@pytest.mark.parametrize("materialize, at_exit", [(True, 2), (False, 1)], ids=["materialize", "lean"])
def test_one_replay_serves_every_name(materialize, at_exit):
    """Exit replays the unit once for the check (+ once to build the tensors); norms()
    reuses the check's replay; clip_ replays once more when not materialized."""
    model = mlp_with(Gated(4)).double()
    count = _count_forwards(model[1])
    x, y = _flat(6), torch.randint(0, 3, (6,))
    with per_sample_grads(model, fallback=True, materialize=materialize) as g:
        ce("mean")(model, x, y).backward()
    assert count[0] == 1 + at_exit
    g.norms()
    g.param_norms()
    assert count[0] == 1 + at_exit
    g.clip_(0.1)
    assert count[0] == 1 + at_exit + (0 if materialize else 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("after", ["layernorm", "softmax"])
def test_cancelling_gradient_is_no_false_alarm(after, dtype):
    """A scalar shift before a shift-invariant op: its gradient cancels to ~0 in every
    sample, and the exit check must still see it as rounding."""
    d = 64
    tail = nn.LayerNorm(d, elementwise_affine=False) if after == "layernorm" else nn.Softmax(-1)
    for seed in range(3):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(8, d), Affine(d, scalar=True), tail, nn.Linear(d, 3)).to(dtype)
        x = torch.randn(16, 6, 8, dtype=dtype) * 10
        for materialize in (True, False):
            model.zero_grad(set_to_none=True)
            with per_sample_grads(model, fallback=True, materialize=materialize) as g:
                model(x).square().mean().backward()
            assert float(g.param_norms()["1.shift"].max()) < 1e-3 * float(g.param_norms()["1.scale"].max())


# -- what the fallback cannot do -------------------------------------------------


class BatchCentered(nn.Module):
    """Couples the samples (a batch mean): no per-sample gradient to replay."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(4))

    def forward(self, x):
        return (x - x.mean(0, keepdim=True)) * self.scale


class ItemBranch(nn.Module):
    """Data-dependent Python control flow: vmap cannot run it."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(4))

    def forward(self, x):
        return x * self.scale if x.sum().item() > -1e9 else x


class Noisy(nn.Module):
    """Functional randomness, not visible as a Dropout module."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(4))

    def forward(self, x):
        return F.dropout(x * self.scale, 0.5, training=True)


class WithDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(4))
        self.drop = nn.Dropout(0.25)

    def forward(self, x):
        return self.drop(x * self.scale)


def _step(model: nn.Module, n: int = 6, **kw) -> None:
    x, y = _flat(n), torch.randint(0, 3, (n,))
    with per_sample_grads(model, fallback=True, **kw) as g:
        ce("mean")(model, x, y).backward()
    return g


@pytest.mark.parametrize("materialize", [True, False])
def test_coupled_samples_are_an_error_naming_the_module(materialize):
    """A unit that mixes the samples (a batch mean) has no per-sample gradient: the
    tracer sees the batch reduced before the unit's output."""
    model = mlp_with(BatchCentered()).double()
    with pytest.raises(ValueError, match=r"'1' \(BatchCentered\).*mean over the batch"):
        _step(model, materialize=materialize)


@pytest.mark.parametrize("module, words", [(ItemBranch, ["ItemBranch", "item"]), (Noisy, ["Noisy", "random"])], ids=["item", "functional-dropout"])
def test_unreplayable_forward_names_module_and_remedy(module, words):
    model = mlp_with(module()).double()
    with pytest.raises(RuleError) as info:  # a GradhooksError and a RuntimeError
        _step(model)
    msg = str(info.value)
    for w in [*words, "torch.func", "gradhooks.register_rule", "strict=False"]:
        assert w in msg, (w, msg)


def _attention_only() -> nn.Module:
    return SelfAttention(need_weights=False, masked=False)


@pytest.mark.parametrize(
    "make, make_args, label",
    [
        (lambda: mlp_with(WithDropout()), lambda: (_flat(3),), "'1' (WithDropout)"),
    ],
    ids=["dropout-module"],
)
def test_dropout_in_training_mode_is_refused_at_the_call(make, make_args, label):
    model = make().double().train()
    with pytest.raises(UnsupportedModuleError, match=r"dropout.*eval mode") as info:
        with per_sample_grads(model, fallback=True):
            model(*make_args())
            raise AssertionError("the forward should have raised")
    assert label in str(info.value)


def test_dropout_in_eval_mode_is_replayed():
    model = mlp_with(WithDropout()).double().eval()
    x, y = _flat(4), torch.randint(0, 3, (4,))
    ref = reference.naive(model, ce("mean"), x, y)
    g = _step_with(model, x, y)
    for k in ref:
        torch.testing.assert_close(g[k], ref[k], **TOL)


def _step_with(model, x, y):
    with per_sample_grads(model, fallback=True) as g:
        ce("mean")(model, x, y).backward()
    return g


# -- without fallback --------------------------------------------------------------


def test_without_fallback_modules_are_handled_by_their_uses():
    """No fallback: MultiheadAttention has a rule, Gated's own parameter is used
    elementwise; every parameter is covered, exactly."""
    def make() -> nn.Module:
        return nn.Sequential(nn.Linear(8, 8), Gated(8), nn.Tanh(), nn.Flatten(), nn.Linear(32, 3))

    x, y = torch.randn(3, 4, 8, dtype=torch.float64), torch.randint(0, 3, (3,))
    check_model(make, ce("mean"), (x, y), "mean")
    model = make().double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to skip, so no warning
        with per_sample_grads(model, strict=False) as g:
            ce("mean")(model, x, y).backward()
    assert list(g) == [k for k, _ in model.named_parameters()]




_NO_NUMPY = """
import importlib.abc, sys, warnings

class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "numpy" or name.startswith("numpy."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, Hide())
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import torch  # torch 2.13 itself warns "Failed to initialize NumPy" here
with warnings.catch_warnings(record=True) as got:
    warnings.simplefilter("always")
    import gradhooks
    import gradhooks.rules.fallback
print([str(w.message) for w in got])
"""


@pytest.mark.backward_mode("default")
def test_import_adds_no_warning_without_numpy():
    """torch.func is imported lazily: ``import gradhooks`` (fallback included) adds no
    warning of its own on a machine without numpy."""
    done = subprocess.run([sys.executable, "-c", _NO_NUMPY], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr
    assert issubclass(RuleError, GradhooksError) and issubclass(RuleError, RuntimeError)
