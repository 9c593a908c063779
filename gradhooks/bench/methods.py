"""The methods compared: plain backward, gradhooks, and the incumbents.

A :class:`Method` prepares a :class:`Runner` on its own deep copy of the model
(Opacus wraps it, BackPACK's ``extend`` leaves hooks on it for good, so no two
methods share one). ``Runner.step()`` is the timed region: forward, loss,
backward and the method's per-sample work; it returns the method's raw result,
which stays alive until ``clear()`` (untimed), so peak memory includes it.
``outcome(raw)`` turns it, untimed, into comparable per-sample quantities
(e.g. BackPACK's ``grad_batch`` is the per-sample gradient divided by N).
"""

from __future__ import annotations

import copy
import importlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .configs import Case

__all__ = ["Method", "Outcome", "Runner", "METHODS", "select_methods", "MAX_NORM", "quiet_incumbents"]

#: Clipping bound of the ghost methods.
MAX_NORM = 1.0

#: The incumbents' own warnings, harmless here: BackPACK on container modules,
#: Opacus's full backward hooks on a first layer whose input needs no gradient.
INCUMBENT_CHATTER = ("Extension saving to", "Full backward hook is firing")


def quiet_incumbents() -> None:
    """Ignore :data:`INCUMBENT_CHATTER` (inside ``warnings.catch_warnings()`` to scope it)."""
    for text in INCUMBENT_CHATTER:
        warnings.filterwarnings("ignore", message=text)


@dataclass
class Outcome:
    """What a step produced, in per-sample units: per-sample gradients ``(N, *p.shape)``,
    norms ``(N,)``, clipped mean gradients ``p.shape``, or the batch gradient."""

    per_sample: dict[str, Tensor] | None = None
    norms: Tensor | None = None
    clipped: dict[str, Tensor] | None = None
    batch_grad: dict[str, Tensor] | None = None


@dataclass
class Runner:
    """A prepared method: ``step()`` (timed), ``clear()`` (untimed), ``outcome(raw)``.

    ``scale``: the step covers ``1/scale`` of the batch (the capped naive loop);
    its time is multiplied by ``scale``."""

    step: Callable[[], Any]
    outcome: Callable[[Any], Outcome]
    model: nn.Module
    scale: float = 1.0
    note: str = ""
    extra_clear: list[Callable[[], None]] = field(default_factory=list)
    #: Bytes the method keeps between steps (``reuse=``'s storage), added to its peak.
    held_bytes: int = 0

    def clear(self) -> None:
        """Untimed, between steps: ``p.grad = None`` (as ``zero_grad()``) and method state."""
        for f in self.extra_clear:
            f()
        for p in self.model.parameters():
            p.grad = None


@dataclass
class Method:
    """A named method; ``needs``: modules that must import, else "not installed"."""

    name: str
    description: str
    prepare: Callable[[Case, int], Runner]
    needs: tuple[str, ...] = ()

    def missing(self) -> str | None:
        """``None`` when usable, else why not (e.g. ``"not installed (opacus)"``)."""
        for mod in self.needs:
            try:
                importlib.import_module(mod)
            except Exception as err:  # ImportError, or a broken install
                return f"not installed ({mod}: {type(err).__name__})"
        return None


def _names(model: nn.Module) -> dict[str, nn.Parameter]:
    return {k: p for k, p in model.named_parameters() if p.requires_grad}


def _grads(model: nn.Module) -> dict[str, Tensor]:
    return {k: p.grad for k, p in _names(model).items()}


def prepare_plain(case: Case, cap: int) -> Runner:
    model = copy.deepcopy(case.model)

    def step() -> None:
        case.loss(model(case.x), case.y).backward()

    return Runner(step, lambda _: Outcome(batch_grad=_grads(model)), model)


def prepare_gradhooks(case: Case, cap: int) -> Runner:
    from gradhooks import per_sample_grads

    model = copy.deepcopy(case.model)

    def step() -> Any:
        with per_sample_grads(model) as g:
            case.loss(model(case.x), case.y).backward()
        return g

    return Runner(step, lambda g: Outcome(per_sample=dict(g)), model)


def prepare_gradhooks_reuse(case: Case, cap: int) -> Runner:
    """A training loop's steady state: each step passes the previous result as
    ``reuse=``, so the per-sample tensors are written into warm storage."""
    from gradhooks import per_sample_grads

    model = copy.deepcopy(case.model)
    held: dict[str, Any] = {"prev": None}

    def step() -> Any:
        with per_sample_grads(model, reuse=held["prev"]) as g:
            case.loss(model(case.x), case.y).backward()
        held["prev"] = g
        return g

    return Runner(step, lambda g: Outcome(per_sample=dict(g)), model, held_bytes=case.result_bytes())


def prepare_gradhooks_ghost(case: Case, cap: int) -> Runner:
    from gradhooks import per_sample_grads

    model = copy.deepcopy(case.model)

    def step() -> Any:
        with per_sample_grads(model, materialize=False) as g:
            case.loss(model(case.x), case.y).backward()
        norms = g.norms()
        g.clip_(MAX_NORM)
        return norms

    return Runner(step, lambda norms: Outcome(norms=norms, clipped=_grads(model)), model)


def prepare_gradhooks_1bw(case: Case, cap: int) -> Runner:
    """Materialized, one backward: backward computes no weight gradient; p.grad is the
    per-sample gradients' mean, written at exit."""
    from gradhooks import per_sample_grads

    model = copy.deepcopy(case.model)

    def step() -> Any:
        with per_sample_grads(model, one_backward=True) as g:
            case.loss(model(case.x), case.y).backward()
        return g

    return Runner(step, lambda g: Outcome(per_sample=dict(g)), model)


def prepare_gradhooks_ghost_1bw(case: Case, cap: int) -> Runner:
    """materialize=False, one backward: norms, then clip_ writes p.grad."""
    from gradhooks import per_sample_grads

    model = copy.deepcopy(case.model)

    def step() -> Any:
        with per_sample_grads(model, materialize=False, one_backward=True) as g:
            case.loss(model(case.x), case.y).backward()
        norms = g.norms()
        g.clip_(MAX_NORM)
        return norms

    return Runner(step, lambda norms: Outcome(norms=norms, clipped=_grads(model)), model)


def prepare_naive(case: Case, cap: int) -> Runner:
    """One ``autograd.grad`` per sample, for the first ``min(cap, N)`` samples."""
    model = copy.deepcopy(case.model)
    params = _names(model)
    k = min(cap, case.n)

    def step() -> dict[str, Tensor]:
        rows: list[tuple[Tensor, ...]] = []
        for i in range(k):  # the naive baseline: deliberately a loop over samples
            loss = case.loss(model(case.x[i : i + 1]), case.y[i : i + 1])
            rows.append(torch.autograd.grad(loss, list(params.values())))
        return {name: torch.stack([r[j] for r in rows]) for j, name in enumerate(params)}

    note = f"extrapolated from {k} of {case.n} samples" if k < case.n else ""
    return Runner(step, lambda got: Outcome(per_sample=got), model, scale=case.n / k, note=note)


def prepare_torch_func(case: Case, cap: int) -> Runner:
    from torch.func import functional_call, grad, vmap

    model = copy.deepcopy(case.model)
    buffers = dict(model.named_buffers())

    def one(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(model, (params, buffers), (x.unsqueeze(0),))
        return case.loss(out, y.unsqueeze(0), "mean")

    per_sample = vmap(grad(one), in_dims=(None, 0, 0))

    def step() -> dict[str, Tensor]:
        params = {k: p.detach() for k, p in _names(model).items()}
        return per_sample(params, case.x, case.y)

    return Runner(step, lambda got: Outcome(per_sample=got), model)


def prepare_opacus(case: Case, cap: int) -> Runner:
    from opacus import GradSampleModule

    model = copy.deepcopy(case.model)
    wrapped = GradSampleModule(model, loss_reduction="mean", batch_first=True)
    params = _names(model)

    def step() -> dict[str, Tensor]:
        case.loss(wrapped(case.x), case.y).backward()
        return {k: p.grad_sample for k, p in params.items()}

    def drop() -> None:
        for p in params.values():
            p.grad_sample = None

    return Runner(step, lambda got: Outcome(per_sample=got), model, extra_clear=[drop])


class _Criterion:
    """A loss with a mutable ``reduction`` attribute, as Opacus's DPLoss wrapper expects."""

    def __init__(self, loss: Callable[[Tensor, Tensor, str], Tensor]) -> None:
        self.loss = loss
        self.reduction = "mean"

    def __call__(self, out: Tensor, y: Tensor) -> Tensor:
        return self.loss(out, y, self.reduction)


def prepare_opacus_ghost(case: Case, cap: int) -> Runner:
    """Opacus ghost clipping: ``GradSampleModuleFastGradientClipping`` with
    ``DPLossFastGradientClipping`` (two backward passes: norms, then the clipped sum).
    Leaves ``p.grad = sum_n c_n g_n``; its optimizer would divide by N at ``step()``."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    model = copy.deepcopy(case.model)
    wrapped = GradSampleModuleFastGradientClipping(
        model, max_grad_norm=MAX_NORM, use_ghost_clipping=True, loss_reduction="mean"
    )
    params = _names(model)
    opt = DPOptimizerFastGradientClipping(
        torch.optim.SGD(list(params.values()), lr=0.0),
        noise_multiplier=0.0,
        max_grad_norm=MAX_NORM,
        expected_batch_size=case.n,
        loss_reduction="mean",
    )
    criterion = DPLossFastGradientClipping(wrapped, opt, _Criterion(case.loss), loss_reduction="mean")

    def step() -> Tensor:
        criterion(wrapped(case.x), case.y).backward()
        return wrapped.per_sample_gradient_norms

    def outcome(norms: Tensor) -> Outcome:
        return Outcome(norms=norms, clipped={k: g / case.n for k, g in _grads(model).items()})

    def drop() -> None:
        for p in params.values():
            for attr in ("_norm_sample", "grad_sample"):
                if hasattr(p, attr):
                    setattr(p, attr, None)

    return Runner(step, outcome, model, extra_clear=[drop])


def _unsupported(model: nn.Module, attr: str) -> str:
    """Module types owning a parameter that BackPACK left without ``attr``."""
    types = sorted(
        {type(m).__name__ for m in model.modules() for p in m.parameters(recurse=False) if getattr(p, attr, None) is None}
    )
    return ", ".join(types)


def _backpack(extension: str, attr: str) -> Callable[[Case, int], Runner]:
    def prepare(case: Case, cap: int) -> Runner:
        import backpack
        from backpack import extensions

        model = backpack.extend(copy.deepcopy(case.model))
        params = _names(model)
        make = getattr(extensions, extension)

        def step() -> dict[str, Tensor]:
            loss = case.loss(model(case.x), case.y)
            with backpack.backpack(make()):
                loss.backward()
            got = {k: getattr(p, attr, None) for k, p in params.items()}
            if any(t is None for t in got.values()):
                raise NotImplementedError(f"BackPACK {extension} does not support {_unsupported(model, attr)}")
            return got

        def outcome(got: dict[str, Tensor]) -> Outcome:
            # BackPACK differentiates the mean loss: its quantities carry 1/N.
            if attr == "grad_batch":
                return Outcome(per_sample={k: t * case.n for k, t in got.items()})
            return Outcome(norms=torch.stack(list(got.values())).sum(0).sqrt() * case.n)

        def drop() -> None:
            for p in params.values():
                if hasattr(p, attr):
                    delattr(p, attr)

        return Runner(step, outcome, model, extra_clear=[drop])

    return prepare


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("plain", "batched forward + backward (the 1.0 baseline)", prepare_plain),
        Method("gradhooks", "per_sample_grads(materialize=True): all per-sample grads, exit included", prepare_gradhooks),
        Method("gradhooks-reuse", "as gradhooks, with reuse= the previous step's result (training loop)", prepare_gradhooks_reuse),
        Method("gradhooks-ghost", "materialize=False, then g.norms() and g.clip_(1.0)", prepare_gradhooks_ghost),
        Method("gradhooks-1bw", "materialize=True, one_backward=True: all per-sample grads, no weight gradients in backward", prepare_gradhooks_1bw),
        Method("gradhooks-ghost-1bw", "materialize=False, one_backward=True, then g.norms() and g.clip_(1.0)", prepare_gradhooks_ghost_1bw),
        Method("naive", "autograd.grad per sample (capped, extrapolated)", prepare_naive),
        Method("torch.func", "vmap(grad(...)) with functional_call", prepare_torch_func),
        Method("opacus", "GradSampleModule hooks: p.grad_sample", prepare_opacus, ("opacus",)),
        Method("opacus-ghost", "GradSampleModuleFastGradientClipping ghost clipping: norms + clipped p.grad", prepare_opacus_ghost, ("opacus",)),
        Method("backpack", "BackPACK BatchGrad: p.grad_batch", _backpack("BatchGrad", "grad_batch"), ("backpack",)),
        Method("backpack-l2", "BackPACK BatchL2Grad: per-sample squared norms only", _backpack("BatchL2Grad", "batch_l2"), ("backpack",)),
    ]
}


def select_methods(spec: str | None) -> list[str]:
    """Comma-separated method names; ``None`` or ``all``: every method. ``plain`` is
    always included (every ratio is to it)."""
    if not spec or spec == "all":
        return list(METHODS)
    names = [p.strip() for p in spec.split(",") if p.strip()]
    for name in names:
        if name not in METHODS:
            raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return ["plain", *[n for n in names if n != "plain"]]
