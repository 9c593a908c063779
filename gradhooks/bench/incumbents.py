"""The baselines and the incumbents, each timed as its user's step (see
:mod:`gradhooks.bench.runner` for the timed region).

Per-sample methods (``naive``, ``torch.func``, ``opacus``, ``backpack``) end
with every per-sample tensor in hand and the ``(N,)`` norms computed from
them (:func:`~gradhooks.bench.runner.norms_of`); clipping methods
(``opacus-clip``, ``opacus-ghost``) end with the norms and the clipped mean
gradient in ``p.grad``, through Opacus' own optimizer with zero noise.
Each method works on its own deep copy of the model (Opacus wraps it,
BackPACK's ``extend`` leaves hooks on it for good).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .configs import Case
from .ours import MAX_NORM
from .runner import Outcome, Runner, Unsupported, grads, norms_of, trainable

__all__ = ["PREPARE"]

#: Attributes Opacus sets on parameters (named, not written as ``p.grad_sample``: a
#: ``Parameter`` declares no such attribute).
GRAD_SAMPLE, NORM_SAMPLE = "grad_sample", "_norm_sample"


def prepare_plain(case: Case, cap: int) -> Runner:
    model = copy.deepcopy(case.model)

    def step() -> None:
        case.loss(model(case.x), case.y).backward()

    return Runner(step, lambda _: Outcome(batch_grad=grads(model)), model)


def prepare_naive(case: Case, cap: int) -> Runner:
    """One ``autograd.grad`` per sample, for the first ``min(cap, N)`` samples."""
    model = copy.deepcopy(case.model)
    params = trainable(model)
    k = min(cap, case.n)

    def step() -> tuple[dict[str, Tensor], Tensor]:
        rows: list[tuple[Tensor, ...]] = []
        for i in range(k):  # the naive baseline: deliberately a loop over samples
            loss = case.loss(model(case.x[i : i + 1]), case.y[i : i + 1])
            rows.append(torch.autograd.grad(loss, list(params.values()), allow_unused=True, materialize_grads=True))
        got = {name: torch.stack([r[j] for r in rows]) for j, name in enumerate(params)}
        return got, norms_of(got, k)

    note = f"extrapolated from {k} of {case.n} samples" if k < case.n else ""
    return Runner(step, lambda raw: Outcome(per_sample=raw[0], norms=raw[1]), model, scale=case.n / k, note=note)


def prepare_torch_func(case: Case, cap: int) -> Runner:
    """``vmap(grad(...))`` over ``functional_call``: per-sample gradients instead of
    the batch gradient (no ``p.grad``)."""
    from torch.func import functional_call, grad, vmap

    model = copy.deepcopy(case.model)
    buffers = dict(model.named_buffers())

    def one(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(model, (params, buffers), (x.unsqueeze(0),))
        return case.loss(out, y.unsqueeze(0), "mean")

    per_sample = vmap(grad(one), in_dims=(None, 0, 0))

    def step() -> tuple[dict[str, Tensor], Tensor]:
        params = {k: p.detach() for k, p in trainable(model).items()}
        got = per_sample(params, case.x, case.y)
        return got, norms_of(got, case.n)

    return Runner(step, lambda raw: Outcome(per_sample=raw[0], norms=raw[1]), model)


def _grad_sample_module(model: torch.nn.Module, factory: Callable[..., Any], **kwargs: Any) -> Any:
    try:
        return factory(model, **kwargs)
    except NotImplementedError as err:  # Opacus: "Model contains a trainable layer ... not support"
        raise Unsupported(f"Opacus: {str(err).splitlines()[0][:140]}") from err


def prepare_opacus(case: Case, cap: int) -> Runner:
    """``GradSampleModule`` (hooks): ``p.grad_sample`` and ``p.grad``, then the norms."""
    from opacus import GradSampleModule

    model = copy.deepcopy(case.model)
    wrapped = _grad_sample_module(model, GradSampleModule, loss_reduction="mean", batch_first=True)
    params = trainable(model)

    def step() -> tuple[dict[str, Tensor], Tensor]:
        case.loss(wrapped(case.x), case.y).backward()
        got = {k: getattr(p, GRAD_SAMPLE) for k, p in params.items()}
        return got, norms_of(got, case.n)

    def drop() -> None:
        for p in params.values():
            setattr(p, GRAD_SAMPLE, None)

    outcome = lambda raw: Outcome(per_sample=raw[0], norms=raw[1], batch_grad=grads(model))  # noqa: E731
    return Runner(step, outcome, model, extra_clear=[drop])


def prepare_opacus_clip(case: Case, cap: int) -> Runner:
    """Opacus' DP-SGD step in hooks mode: ``GradSampleModule``, then ``DPOptimizer``'s
    per-sample clipping (its ``pre_step``: clip, accumulate, zero noise, divide by N):
    the clipped mean gradient in ``p.grad``."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    model = copy.deepcopy(case.model)
    wrapped = _grad_sample_module(model, GradSampleModule, loss_reduction="mean", batch_first=True)
    params = trainable(model)
    opt = DPOptimizer(torch.optim.SGD(list(params.values()), lr=0.0), noise_multiplier=0.0,
                      max_grad_norm=MAX_NORM, expected_batch_size=case.n, loss_reduction="mean")

    def step() -> dict[str, Tensor]:
        case.loss(wrapped(case.x), case.y).backward()
        kept = {k: getattr(p, GRAD_SAMPLE) for k, p in params.items()}  # for outcome() only
        opt.pre_step()  # DPOptimizer.step() without the update: clip, add (zero) noise, divide by N
        return kept

    def outcome(kept: dict[str, Tensor]) -> Outcome:
        return Outcome(norms=norms_of(kept, case.n), clipped=grads(model))

    return Runner(step, outcome, model, extra_clear=[lambda: opt.zero_grad(set_to_none=True)])


class _Criterion:
    """A loss with a mutable ``reduction`` attribute, as Opacus's DPLoss wrapper expects."""

    def __init__(self, loss: Callable[[Tensor, Tensor, str], Tensor]) -> None:
        self.loss = loss
        self.reduction = "mean"

    def __call__(self, out: Tensor, y: Tensor) -> Tensor:
        return self.loss(out, y, self.reduction)


def prepare_opacus_ghost(case: Case, cap: int) -> Runner:
    """Opacus ghost clipping: ``GradSampleModuleFastGradientClipping`` with
    ``DPLossFastGradientClipping`` (two backward passes: norms, then the clipped sum),
    then its optimizer's ``pre_step`` (zero noise, divide by N): the clipped mean."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    model = copy.deepcopy(case.model)
    wrapped = _grad_sample_module(model, GradSampleModuleFastGradientClipping, max_grad_norm=MAX_NORM,
                                  use_ghost_clipping=True, loss_reduction="mean")
    params = trainable(model)
    opt = DPOptimizerFastGradientClipping(torch.optim.SGD(list(params.values()), lr=0.0), noise_multiplier=0.0,
                                          max_grad_norm=MAX_NORM, expected_batch_size=case.n, loss_reduction="mean")
    criterion = DPLossFastGradientClipping(wrapped, opt, _Criterion(case.loss), loss_reduction="mean")

    def step() -> Tensor:
        criterion(wrapped(case.x), case.y).backward()
        opt.pre_step()  # DPOptimizer.step() without the update: clip, add (zero) noise, divide by N
        return wrapped.per_sample_gradient_norms

    def drop() -> None:
        opt.zero_grad(set_to_none=True)
        for p in params.values():
            if hasattr(p, NORM_SAMPLE):
                setattr(p, NORM_SAMPLE, None)

    return Runner(step, lambda norms: Outcome(norms=norms, clipped=grads(model)), model, extra_clear=[drop])


def _unsupported(model: torch.nn.Module, attr: str) -> str:
    """Module types owning a parameter that BackPACK left without ``attr``."""
    types = sorted(
        {type(m).__name__ for m in model.modules() for p in m.parameters(recurse=False) if getattr(p, attr, None) is None}
    )
    return ", ".join(types)


def _backpack(extension: str, attr: str) -> Callable[[Case, int], Runner]:
    """BackPACK's ``BatchGrad`` (per-sample gradients, divided by N: it differentiates
    the mean loss; norms scaled back) or ``BatchL2Grad`` (squared norms only)."""

    def prepare(case: Case, cap: int) -> Runner:
        import backpack  # pyright: ignore[reportMissingImports]
        from backpack import extensions  # pyright: ignore[reportMissingImports]

        model = backpack.extend(copy.deepcopy(case.model))
        params = trainable(model)
        make = getattr(extensions, extension)

        def step() -> tuple[dict[str, Tensor], Tensor]:
            loss = case.loss(model(case.x), case.y)
            with backpack.backpack(make()):
                loss.backward()
            got = {k: getattr(p, attr, None) for k, p in params.items()}
            if any(t is None for t in got.values()):
                raise Unsupported(f"BackPACK {extension} does not support {_unsupported(model, attr)}")
            kept: dict[str, Tensor] = {k: t for k, t in got.items() if t is not None}
            if attr == "grad_batch":
                return kept, norms_of(kept, case.n, scale=float(case.n))
            return kept, torch.stack(list(kept.values())).sum(0).sqrt() * case.n

        def outcome(raw: tuple[dict[str, Tensor], Tensor]) -> Outcome:
            if attr == "grad_batch":
                per_sample = {k: t * case.n for k, t in raw[0].items()}
                return Outcome(per_sample=per_sample, norms=raw[1], batch_grad=grads(model))
            return Outcome(norms=raw[1])

        def drop() -> None:
            for p in params.values():
                if hasattr(p, attr):
                    delattr(p, attr)

        return Runner(step, outcome, model, extra_clear=[drop])

    return prepare


#: ``(name, description, prepare, needs)`` in table order.
PREPARE: list[tuple[str, str, Callable[[Case, int], Runner], tuple[str, ...]]] = [
    ("naive", "autograd.grad per sample (capped, extrapolated), then the norms", prepare_naive, ()),
    ("torch.func", "vmap(grad(functional_call)): per-sample grads (no p.grad), then the norms", prepare_torch_func, ()),
    ("opacus", "Opacus GradSampleModule hooks: p.grad_sample, then the norms", prepare_opacus, ("opacus",)),
    ("opacus-clip", "Opacus hooks + DPOptimizer per-sample clipping (zero noise): clipped mean in p.grad",
     prepare_opacus_clip, ("opacus",)),
    ("opacus-ghost", "Opacus ghost clipping (two backward passes) + DPOptimizer: norms, clipped mean in p.grad",
     prepare_opacus_ghost, ("opacus",)),
    ("backpack", "BackPACK BatchGrad: p.grad_batch, then the norms", _backpack("BatchGrad", "grad_batch"), ("backpack",)),
    ("backpack-l2", "BackPACK BatchL2Grad: per-sample norms only (no clipped gradient)",
     _backpack("BatchL2Grad", "batch_l2"), ("backpack",)),
]
