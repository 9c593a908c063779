"""The ``per_sample_grads`` context manager: hook lifecycle only.

``__enter__`` plans (:mod:`gradhooks.plan`), snapshots ``p.grad``, installs the
module hooks (:mod:`gradhooks.hooks`) and activates the tracer;
``__exit__`` deactivates and removes everything in a ``finally`` block, then
hands the recording to :mod:`gradhooks.finish`. Nothing is stored on the
user's modules or parameters; hooks that fire after the context closed do
nothing (they check the recording's ``active`` flag).
"""

from __future__ import annotations

from types import TracebackType
from typing import Literal, Protocol, cast

import torch
from torch import Tensor, nn

from . import finish, fsdp, hooks
from .distributed import world_of
from .errors import ArgumentTypeError, ContextStateError, InvalidArgumentError
from .plan import FallbackWarning, make_plan
from .recording import Recording
from .result import PerSampleGrads
from .selfcheck import Snapshot
from .sites import Covered
from .trace.tracer import Tracer

__all__ = ["per_sample_grads", "PerSampleGradsContext", "LossReduction", "FallbackWarning"]

LossReduction = Literal["mean", "sum"]


class GradScalerLike(Protocol):
    """What ``grad_scaler`` needs: ``torch.amp.GradScaler``'s ``get_scale``."""

    def get_scale(self) -> float: ...


def per_sample_grads(
    model: nn.Module,
    *,
    loss_reduction: LossReduction = "mean",
    materialize: bool = True,
    strict: bool = True,
    fallback: bool = False,
    one_backward: bool = False,
    grad_scaler: GradScalerLike | None = None,
    reuse: PerSampleGrads | None = None,
) -> PerSampleGradsContext:
    """Capture per-sample gradients of ``model`` for one batch.

    Use as ``with per_sample_grads(model) as g:``, run the forward pass and
    ``loss.backward()`` inside; after the block ``g[name]`` is ``(N, *p.shape)``,
    ``g.norms()`` is ``(N,)`` and ``g.clip_(max_norm)`` sets ``p.grad`` to the
    reduction of the clipped per-sample gradients.

    Args:
        model: any ``nn.Module`` (or ``DistributedDataParallel``); never changed.
        loss_reduction: ``"mean"`` if the loss averages over the batch, ``"sum"``
            if it sums.
        materialize: build ``(N, *p.shape)`` tensors at exit; ``False`` keeps
            only the captured inputs and output gradients (norms and ``clip_``
            stay exact, ``g[name]`` raises).
        strict: raise :class:`UnsupportedModuleError` for parameters whose use the
            library cannot handle; ``False`` leaves those modules' direct
            parameters out, with a warning.
        fallback: handle modules without a rule through ``torch.func``, each with
            its whole subtree.
        one_backward: backward computes no gradient for covered parameters, only
            what the rules need; ``p.grad`` is written by ``clip_`` / ``privatize_``
            (and, with ``materialize=True``, at exit: the per-sample gradients'
            reduction). Exact detection of any gradient from elsewhere.
        grad_scaler: the ``torch.amp.GradScaler`` whose scaled loss is
            backpropagated inside the context: results are unscaled, ``clip_``
            writes ``p.grad`` in the scaler's units, an overflow leaves ``p.grad``
            for ``scaler.step`` to skip.
        reuse: an earlier materialized result whose storage this one may overwrite.
    """
    if not isinstance(model, nn.Module):
        raise ArgumentTypeError(f"per_sample_grads: model must be a torch.nn.Module, got {type(model).__name__}")
    if loss_reduction not in ("mean", "sum"):
        raise InvalidArgumentError(
            f"per_sample_grads: loss_reduction must be 'mean' or 'sum', got {loss_reduction!r} "
            "('mean' when the loss averages over the batch, as PyTorch losses do by default)"
        )
    for flag, value in (("materialize", materialize), ("strict", strict), ("fallback", fallback), ("one_backward", one_backward)):
        if not isinstance(value, bool):
            raise ArgumentTypeError(f"per_sample_grads: {flag} must be True or False, got {value!r}")
    if grad_scaler is not None and not callable(getattr(grad_scaler, "get_scale", None)):
        raise ArgumentTypeError(f"per_sample_grads: grad_scaler must be a torch.amp.GradScaler (or have get_scale()), got {grad_scaler!r}")
    if reuse is not None and not isinstance(reuse, PerSampleGrads):
        raise ArgumentTypeError(f"per_sample_grads: reuse must be an earlier PerSampleGrads result, got {type(reuse).__name__}")
    options = finish.Options(loss_reduction, materialize, strict, fallback, one_backward, grad_scaler, reuse)
    return PerSampleGradsContext(model, options)


class PerSampleGradsContext:
    """What :func:`per_sample_grads` returns; ``__enter__`` gives the result object."""

    def __init__(self, model: nn.Module, options: finish.Options) -> None:
        self.model = model
        self.options = options
        self._used = False
        self._result: PerSampleGrads | None = None
        self._state: finish.State | None = None

    def __enter__(self) -> PerSampleGrads:
        if self._used:
            raise ContextStateError("this per_sample_grads context was already entered; create a new one per batch")
        self._used = True
        if hooks.already_active(self.model):
            raise ContextStateError(
                "this model (or a module inside it) is already inside a per_sample_grads "
                "context; exit that context first (one context per batch)"
            )
        opts = self.options
        plan = make_plan(self.model, fallback=opts.fallback)
        sharding = fsdp.sharding_of(self.model, plan, opts)  # FSDP2: refusals on entry, None otherwise
        # On entry every Source still holds its Parameter (only an FSDP2 exit swaps it).
        covered = [Covered(s.name, cast(nn.Parameter, s.param), s) for s in plan.covered]
        result = PerSampleGrads({c.name: c.param for c in covered}, opts.loss_reduction, opts.materialize)
        result._fallback_modules = plan.fallback_modules
        with torch.no_grad():
            before: dict[str, Tensor | None] = {c.name: (c.param.grad.detach().clone() if c.param.grad is not None else None) for c in covered}
        rec = Recording(one_backward=opts.one_backward, labels=plan.labels)
        tracer = Tracer(rec)
        tracer.sources = dict(plan.traced)
        state = finish.State(plan, covered, before, {c.name: Snapshot.of(c.param) for c in covered}, rec, tracer, world_of(self.model))
        state.strict = opts.strict
        state.sharding = sharding
        self._state, self._result = state, result
        try:
            hooks.install(self.model, state, opts)
            if sharding is not None:
                sharding.install(state)  # after FSDP's own pre-hooks: binds the unsharded parameters
            rec.active = True
            tracer.__enter__()
        except BaseException:
            self._close()
            raise
        return result

    def _close(self) -> None:
        state = self._state
        assert state is not None
        try:
            if state.rec.active:
                state.rec.active = False
                state.tracer.__exit__(None, None, None)
        finally:
            handles, state.rec.handles = state.rec.handles, []
            for h in reversed(handles):
                h.remove()
            state.tracer.clear()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> Literal[False]:
        result = self._result
        assert result is not None and self._state is not None
        try:
            self._close()
        finally:
            if exc_type is not None:
                result._fail(f"the per_sample_grads context exited by an exception ({exc_type.__name__}: {exc}); it holds no result")
        if exc_type is not None:
            return False
        try:
            finish.finish(self._state, result, self.options)
        except BaseException as err:
            result._fail(f"the per_sample_grads context raised at exit ({type(err).__name__}); it holds no result")
            raise
        return False
