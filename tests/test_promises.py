"""The audit's "broken promises": one test each, against the naive loop where
numbers are involved. (The normalization false alarms and the instance_norm
kernel bug are in tests/rules/test_normalization.py.)"""

from __future__ import annotations

import dataclasses
import os
import sys
import traceback
import warnings
from collections.abc import Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gradhooks
from gradhooks import ContextStateError, GradhooksError, UnseenGradientError, per_sample_grads
from tests import reference

TOL = {"rtol": 1e-9, "atol": 1e-12}


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def batch(n: int = 6) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 5, dtype=torch.float64, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def ce(reduction: str = "mean"):
    return lambda m, x, y: F.cross_entropy(m(x), y, reduction=reduction)


def grads_of(model: nn.Module) -> list[Tensor | None]:
    return [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]


def assert_grads(model: nn.Module, before: list[Tensor | None]) -> None:
    for p, b in zip(model.parameters(), before, strict=True):
        if b is None:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, b, rtol=0, atol=0, equal_nan=True)


# -- an Embedding weight penalty is detected, however many tokens -------------------


def _token_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(1000, 16), nn.Linear(16, 4))


def _token_loss(m: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(m(x).mean(1), y)


@pytest.mark.parametrize("materialize", [True, False])
@pytest.mark.parametrize("n, t, share", [(32, 2048, 0.10), (32, 2048, 1e-3), (8, 512, 0.008)],
                         ids=["32x2048-10%", "32x2048-0.1%", "8x512-0.8%"])
def test_embedding_weight_penalty_is_detected(n, t, share, materialize):
    """A penalty ``lam ||W||^2`` whose gradient is ``share`` of p.grad (float32)."""
    model = _token_model()
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randint(0, 1000, (n, t), generator=gen), torch.randint(0, 4, (n,), generator=gen)
    w = model[0].weight
    data_grad = torch.autograd.grad(_token_loss(model, x, y), [w])[0]
    lam = float(share * data_grad.norm() / (2 * w.detach().norm()))
    with pytest.raises(UnseenGradientError, match=r"'0\.weight'"):
        with per_sample_grads(model, materialize=materialize) as g:
            (_token_loss(model, x, y) + lam * w.square().sum()).backward()
    with pytest.raises(ContextStateError, match="raised at exit"):
        g.clip_(1.0)


def test_embedding_without_penalty_is_no_alarm_and_exact():
    """The control at the same size: no error, and the norms of the naive loop (float32)."""
    model = _token_model()
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randint(0, 1000, (32, 2048), generator=gen), torch.randint(0, 4, (32,), generator=gen)
    with per_sample_grads(model, materialize=False) as g:
        _token_loss(model, x, y).backward()
    ref = reference.naive(model, _token_loss, x, y)
    torch.testing.assert_close(g.norms(), reference.norms(ref), rtol=1e-4, atol=1e-7)


# -- a NaN from outside the hooks --------------------------------------------------


@pytest.mark.parametrize("prior", [None, "ones"])
@pytest.mark.parametrize("materialize", [True, False])
def test_nan_from_outside_is_detected_and_p_grad_kept(materialize, prior):
    """``(w * 0).sqrt().sum()`` in the loss sends NaN to ``w`` outside its uses: exit
    raises naming it, and clip_ (refused) does not overwrite the NaN."""
    model = mlp()
    x, y = batch()
    if prior:
        for p in model.parameters():
            p.grad = torch.ones_like(p)
    w = model[0].weight
    with pytest.raises(UnseenGradientError, match=r"'0\.weight'"):
        with per_sample_grads(model, materialize=materialize) as g:
            (ce()(model, x, y) + (w * 0).sqrt().sum()).backward()
    assert torch.isnan(w.grad).all()
    left = grads_of(model)
    with pytest.raises(ContextStateError):
        g.clip_(1.0)
    assert_grads(model, left)


# -- captured inputs modified in place after the block --------------------------------


class Scale(nn.Module):
    """``y = x * w``: handled by a registered rule or by the fallback."""

    def __init__(self, d: int = 5) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(d))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.w


class ScaleRule(gradhooks.Rule):
    def per_sample(self, module: nn.Module, calls: Sequence[gradhooks.Call], names: Sequence[str]) -> dict[str, Tensor]:
        return {"w": sum((c.input * c.grad).reshape(c.grad.shape[0], -1, c.grad.shape[-1]).sum(1) for c in calls)}  # type: ignore[dict-item]


@pytest.fixture
def scale_rule():
    gradhooks.register_rule(Scale, rule=ScaleRule())
    try:
        yield
    finally:
        gradhooks.unregister_rule(Scale)


def _scale_first() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(Scale(), nn.Linear(5, 3)).double()


MUTATIONS = [
    ("linear", mlp, {}, "input"),
    ("linear-base-of-view", mlp, {}, "base"),
    ("registered-rule", _scale_first, {"rule": True}, "input"),
    ("fallback", _scale_first, {"fallback": True}, "input"),
]


@pytest.mark.filterwarnings("ignore::gradhooks.FallbackWarning")
@pytest.mark.parametrize("materialize", [True, False])
@pytest.mark.parametrize("make, opts, what", [c[1:] for c in MUTATIONS], ids=[c[0] for c in MUTATIONS])
def test_input_modified_after_the_block(request, make, opts, what, materialize):
    """``x.mul_(0)`` after the block: materialized results are already built (exact);
    with ``materialize=False`` clip_ raises and leaves p.grad as it was."""
    if opts.get("rule"):
        request.getfixturevalue("scale_rule")
    model = make()
    base = torch.randn(9, 5, dtype=torch.float64)
    x, y = base[:6], batch()[1]
    ref = reference.naive(model, ce("sum"), x.clone(), y)
    want, _ = reference.clipped(ref, 0.5, "sum")
    with per_sample_grads(model, loss_reduction="sum", materialize=materialize, fallback=bool(opts.get("fallback"))) as g:
        ce("sum")(model, x, y).backward()
    (x if what == "input" else base).mul_(0)
    if materialize:
        g.clip_(0.5)
        for k, p in model.named_parameters():
            torch.testing.assert_close(p.grad, want[k], **TOL)
        return
    left = grads_of(model)
    with pytest.raises(ContextStateError, match="modified in place"):
        g.clip_(0.5)
    assert_grads(model, left)


class LastStep(nn.Module):
    """An LSTM classifier: its rule recomputes the gates from the weights at query time."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(5, 4, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.lstm(x)[0][:, -1])


def _lstm() -> nn.Module:
    torch.manual_seed(0)
    return LastStep().double()


class Squash(nn.Module):
    """``tanh(x * w)``: its per-sample gradient depends on ``w`` (no rule: a fallback unit)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(5))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x * self.w)


def _squash_middle() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 5), Squash(), nn.Linear(5, 3)).double()


WEIGHTS_CHANGED = [
    ("linear", mlp, lambda: batch()[0], False),
    ("lstm", _lstm, lambda: torch.randn(6, 3, 5, dtype=torch.float64), False),
    ("fallback", _squash_middle, lambda: batch()[0], True),
]


@pytest.mark.filterwarnings("ignore::gradhooks.FallbackWarning")
@pytest.mark.parametrize("make, make_x, fallback", [c[1:] for c in WEIGHTS_CHANGED], ids=[c[0] for c in WEIGHTS_CHANGED])
def test_parameters_changed_in_place_after_the_block(make, make_x, fallback):
    """``materialize=False``: weights updated in place between exit and ``clip_`` (an
    optimizer step, a weight clamp). A rule that reads the weights at query time must
    see the change (version counters) and raise; the others stay exact."""
    model = make()
    x, y = make_x(), batch()[1]
    ref = reference.naive(model, ce("sum"), x, y)
    want, _ = reference.clipped(ref, 0.5, "sum")
    with per_sample_grads(model, loss_reduction="sum", materialize=False, fallback=fallback) as g:
        ce("sum")(model, x, y).backward()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    try:
        g.clip_(0.5)
    except ContextStateError as err:
        assert "modified in place" in str(err), str(err)
        return
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[k], **TOL)


# -- DDP: an exit failure on one rank ------------------------------------------------


def _ddp_worker(rank: int, init: str, out, one_backward: bool) -> None:
    try:
        sys.path.insert(0, os.getcwd())
        torch.set_num_threads(1)
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel as DDP

        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
        outcomes = []
        for materialize in (True, False):
            ddp = DDP(mlp())
            x, y = batch()
            w = ddp.module[0].weight
            try:
                with ddp.no_sync(), per_sample_grads(ddp, materialize=materialize, one_backward=one_backward):
                    loss = ce()(ddp, x[3 * rank : 3 * rank + 3], y[3 * rank : 3 * rank + 3])
                    if rank == 1:  # a weight penalty on one rank only
                        loss = loss + 0.1 * w.square().sum()
                    loss.backward()
                outcomes.append("exit passed")  # then clip_ (collective) would wait for rank 1 forever
            except GradhooksError as err:
                outcomes.append(type(err).__name__)
        out.put((rank, "ok", outcomes))
    except BaseException:
        out.put((rank, "fail", traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def test_ddp_exit_failure_on_one_rank_raises_on_every_rank(tmp_path, backward_mode):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_ddp_worker, args=(r, f"file://{tmp_path / 'rdv'}", out, backward_mode == "one")) for r in range(2)]
    for p in procs:
        p.start()
    try:
        results = dict((r, (status, got)) for r, status, got in (out.get(timeout=120) for _ in procs))
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    for r in (0, 1):
        assert results[r][0] == "ok", results[r][1]
    assert results[1][1] == ["UnseenGradientError"] * 2
    assert all(o != "exit passed" for o in results[0][1]), results[0][1]


# -- an empty batch with loss_reduction="mean" -----------------------------------------


@pytest.mark.parametrize("prior", [None, "values"])
@pytest.mark.parametrize("materialize", [True, False])
def test_empty_batch_mean_leaves_p_grad(materialize, prior):
    from gradhooks.privacy import privatize_

    model = mlp()
    x, y = batch(0)
    if prior:
        for p in model.parameters():
            p.grad = torch.full_like(p, 0.25)
    with per_sample_grads(model, materialize=materialize) as g:
        ce()(model, x, y).backward()
    before = grads_of(model)  # as backward left it (zeros added, or nothing)
    if prior:
        for b in before:
            torch.testing.assert_close(b, torch.full_like(b, 0.25), rtol=0, atol=0)
    assert g.batch_size == 0 and g.norms().shape == (0,)
    assert g.clip_(1.0).shape == (0,)
    assert_grads(model, before)
    privatize_(g, max_norm=1.0, noise_multiplier=0.0)
    assert_grads(model, before)


# -- GradScaler at scale exactly 1.0 ---------------------------------------------------


def _scaler_at_one(how: str, opt: torch.optim.Optimizer, model: nn.Module) -> torch.amp.GradScaler:
    if how == "init_scale=1":
        return torch.amp.GradScaler("cpu", init_scale=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=65536.0)
    for _ in range(16):  # 16 overflows halve 65536 to 1
        scaler.scale(torch.ones(()))
        for p in model.parameters():
            p.grad = torch.full_like(p, float("inf"))
        scaler.step(opt)
        scaler.update()
    model.zero_grad(set_to_none=True)
    return scaler


@pytest.mark.parametrize("how", ["init_scale=1", "16-halvings"])
@pytest.mark.parametrize("materialize", [True, False])
def test_grad_scaler_at_one_overflow_skips_the_step(how, materialize):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = _scaler_at_one(how, opt, model)
    assert scaler.get_scale() == 1.0
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    x[2, 0] = float("inf")
    start = [p.detach().clone() for p in model.parameters()]
    with per_sample_grads(model, materialize=materialize, grad_scaler=scaler) as g:
        scaler.scale(F.cross_entropy(model(x), y)).backward()
    assert not torch.isfinite(g.norms()[2])
    g.clip_(0.5)  # no FloatingPointError: the scaler's step skips
    scaler.step(opt)
    scaler.update()
    for p, s in zip(model.parameters(), start, strict=True):
        torch.testing.assert_close(p.detach(), s, rtol=0, atol=0)
    assert scaler.get_scale() == 0.5


# -- model.double() inside the block ---------------------------------------------------


@pytest.mark.parametrize("materialize", [True, False])
def test_double_inside_the_block_gives_float64_results(materialize):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = batch()
    with per_sample_grads(model, loss_reduction="sum", materialize=materialize) as g:
        model.double()
        ce("sum")(model, x, y).backward()
    ref = reference.naive(model, ce("sum"), x, y)
    assert g.norms().dtype == torch.float64
    torch.testing.assert_close(g.norms(), reference.norms(ref), **TOL)
    want, c = reference.clipped(ref, 0.5, "sum")
    torch.testing.assert_close(g.clip_(0.5), c, **TOL)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[k], **TOL)


# -- nn.Linear subclasses whose forward differs ----------------------------------------


class Scaled(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * 2, self.bias)


class Transposed(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight.T + self.bias


class SlicedWeight(nn.Linear):  # Whisper's positional embedding slices its weight
    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x[..., :3], self.weight[:, :3], self.bias)


class Permuted(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.flip(0), self.bias.roll(1))


class Addmm(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        return torch.addmm(self.bias, x, self.weight.t())


class Einsum(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        return torch.einsum("ni,oi->no", x, self.weight) + self.bias


class DictOut(nn.Linear):
    def forward(self, x: Tensor) -> dict[str, Tensor]:  # type: ignore[override]
        return {"out": super().forward(x), "aux": self.weight.abs().sum()}


class TakeOut(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        out = self.inner(x)
        return out["out"] if isinstance(out, dict) else out


SUBCLASSES = [Scaled, Transposed, SlicedWeight, Permuted, Addmm, Einsum, DictOut]


@pytest.mark.parametrize("materialize", [True, False])
@pytest.mark.parametrize("cls", SUBCLASSES, ids=[c.__name__ for c in SUBCLASSES])
def test_linear_subclass_with_its_own_forward(cls, materialize):
    """Exact against the naive loop, or a GradhooksError naming the module (never a
    bare RuntimeError from a rule that assumed nn.Linear's forward)."""
    torch.manual_seed(0)
    model = nn.Sequential(TakeOut(cls(5, 4)), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = batch()
    ref = reference.naive(model, ce("sum"), x, y)
    try:
        with per_sample_grads(model, loss_reduction="sum", materialize=materialize) as g:
            ce("sum")(model, x, y).backward()
    except GradhooksError as err:
        assert f"'0.inner' ({cls.__name__})" in str(err), str(err)
        return
    torch.testing.assert_close(g.norms(), reference.norms(ref), **TOL)
    if materialize:
        for k in ref:
            torch.testing.assert_close(g[k], ref[k], **TOL)


# -- a module returning a container torch's pytree does not know -----------------------


@dataclasses.dataclass
class Output:
    y: Tensor
    aux: Tensor


class DataclassUnit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(5))

    def forward(self, x: Tensor) -> Output:
        return Output(x * self.w, x.sum(-1))


class DataclassRule(gradhooks.Rule):
    def per_sample(self, module: nn.Module, calls: Sequence[gradhooks.Call], names: Sequence[str]) -> dict[str, Tensor]:
        return {"w": sum(c.input * c.grad for c in calls)}  # type: ignore[dict-item]


class UsesOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.unit = DataclassUnit()
        self.head = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.unit(x).y)


@pytest.mark.parametrize("how", ["fallback", "register_rule"])
def test_unregistered_dataclass_output_names_the_cause(how):
    """Its tensors are invisible to the hooks: the error must say that (the type, and
    how to make it visible), not blame a gradient outside the module."""
    torch.manual_seed(0)
    model = UsesOutput().double()
    x = batch()[0]
    if how == "register_rule":
        gradhooks.register_rule(DataclassUnit, rule=DataclassRule())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", gradhooks.FallbackWarning)
            with pytest.raises(GradhooksError) as info:
                with per_sample_grads(model, loss_reduction="sum", fallback=how == "fallback"):
                    model(x).sum().backward()
    finally:
        if how == "register_rule":
            gradhooks.unregister_rule(DataclassUnit)
    msg = str(info.value)
    assert "'unit' (DataclassUnit)" in msg and "Output" in msg and "pytree" in msg, msg


# -- a rule that fails inside ----------------------------------------------------------


class IndexingRule(gradhooks.Rule):
    def per_sample(self, module: nn.Module, calls: Sequence[gradhooks.Call], names: Sequence[str]) -> dict[str, Tensor]:
        return {"w": calls[5].input}  # an IndexError: one call was recorded


@pytest.mark.parametrize("materialize", [True, False])
def test_failure_inside_a_rule_is_a_gradhooks_error_naming_the_module(materialize):
    gradhooks.register_rule(Scale, rule=IndexingRule())
    try:
        model = _scale_first()
        x, y = batch()
        with pytest.raises(GradhooksError) as info:
            with per_sample_grads(model, materialize=materialize) as g:
                ce()(model, x, y).backward()
            g.norms()
    finally:
        gradhooks.unregister_rule(Scale)
    msg = str(info.value)
    assert "'0' (Scale)" in msg and "IndexingRule" in msg and "IndexError" in msg, msg
