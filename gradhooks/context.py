"""The ``per_sample_grads`` context manager: which modules get hooks, the
hooks themselves, and the work done at exit.

Nothing is ever stored on the user's modules or parameters: all state lives on
the context object and the :class:`PerSampleGrads` it returns. Every handle is
removed in a ``finally`` block, and the hooks check an "active" flag, so hooks
that fire after the context has exited (graph built inside, backward run
outside) do nothing.
"""

from __future__ import annotations

import warnings
from types import TracebackType
from typing import Any, Literal, Protocol, cast

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from . import combine, selfcheck
from .capture import Call, GradHook, first_tensor, hook_target, output_tensors
from .combine import Covered, Site
from .distributed import world_of
from .errors import BatchSizeError, ContextStateError, UnseenGradientError, UnsupportedModuleError
from .registry import rule_for
from .result import PerSampleGrads
from .rule import Rule

__all__ = ["per_sample_grads", "PerSampleGradsContext", "LossReduction"]

LossReduction = Literal["mean", "sum"]


class GradScalerLike(Protocol):
    """What ``grad_scaler`` needs: ``torch.amp.GradScaler``'s ``get_scale``."""

    def get_scale(self) -> float: ...


class FallbackWarning(UserWarning):
    """Modules without a rule are being handled through ``torch.func`` (``fallback=True``)."""


def per_sample_grads(
    model: nn.Module,
    *,
    loss_reduction: LossReduction = "mean",
    materialize: bool = True,
    strict: bool = True,
    fallback: bool = False,
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
        strict: raise :class:`UnsupportedModuleError` on entry for modules with
            trainable parameters and no rule; ``False`` skips them with a warning.
        fallback: handle modules without a rule through ``torch.func``.
        grad_scaler: the ``torch.amp.GradScaler`` whose scaled loss is
            backpropagated inside the context. Results (``g[name]``, norms,
            ``dot``) are then of the unscaled gradients, clipping factors use
            the unscaled norms, and ``clip_`` writes ``p.grad`` in the scaler's
            (scaled) units so ``scaler.step(optimizer)`` works unchanged; a
            non-finite norm then leaves ``p.grad`` as backward left it (the
            scaler skips the step) instead of raising.
        reuse: an earlier materialized result whose tensors may be overwritten:
            this batch's per-sample gradients are written into its storage
            where shapes match (warm memory: no page faults of a fresh
            multi-GB allocation), and the earlier result becomes unusable.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"per_sample_grads: model must be a torch.nn.Module, got {type(model).__name__}")
    if loss_reduction not in ("mean", "sum"):
        raise ValueError(
            f"per_sample_grads: loss_reduction must be 'mean' or 'sum', got {loss_reduction!r} "
            "('mean' when the loss averages over the batch, as PyTorch losses do by default)"
        )
    for flag, value in (("materialize", materialize), ("strict", strict), ("fallback", fallback)):
        if not isinstance(value, bool):
            raise TypeError(f"per_sample_grads: {flag} must be True or False, got {value!r}")
    if grad_scaler is not None and not callable(getattr(grad_scaler, "get_scale", None)):
        raise TypeError(
            f"per_sample_grads: grad_scaler must be a torch.amp.GradScaler (or have get_scale()), got {grad_scaler!r}"
        )
    if reuse is not None and not isinstance(reuse, PerSampleGrads):
        raise TypeError(f"per_sample_grads: reuse must be an earlier PerSampleGrads result, got {type(reuse).__name__}")
    return PerSampleGradsContext(model, loss_reduction, materialize, strict, fallback, grad_scaler, reuse)


class _ForwardHook:
    """Forward hook of one site. A class, so a second context can recognise it."""

    __slots__ = ("ctx", "site")

    def __init__(self, ctx: PerSampleGradsContext, site: Site) -> None:
        self.ctx = ctx
        self.site = site

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        return self.ctx._on_forward(self.site, args, kwargs, output)


class _RefusalHook:
    """Forward hook on a module that has a rule able to refuse it but no covered
    parameter (a frozen BatchNorm): switched to a sample-coupling mode inside the
    context, it would corrupt every other layer's per-sample gradients."""

    __slots__ = ("ctx", "label", "rule")

    def __init__(self, ctx: PerSampleGradsContext, label: str, rule: Rule) -> None:
        self.ctx = ctx
        self.label = label
        self.rule = rule

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self.ctx._active and torch.is_grad_enabled():
            why = self.rule.refuse(module)
            if why:
                raise UnsupportedModuleError(f"{self.label}: {why}")


class _RootPreHook:
    """Forward pre-hook on the model: records the batch size of its input."""

    __slots__ = ("ctx",)

    def __init__(self, ctx: PerSampleGradsContext) -> None:
        self.ctx = ctx

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.ctx._on_root(args, kwargs)


def _ours(hook: object) -> bool:
    return isinstance(hook, (_ForwardHook, _RootPreHook, _RefusalHook))


def _already_active(model: nn.Module) -> bool:
    for m in model.modules():
        if any(_ours(h) for h in m._forward_hooks.values()):
            return True
        if any(_ours(h) for h in m._forward_pre_hooks.values()):
            return True
    return False


def _label(name: str, module: nn.Module) -> str:
    return f"'{name}' ({type(module).__name__})" if name else f"the model ({type(module).__name__})"


class PerSampleGradsContext:
    """What :func:`per_sample_grads` returns; ``__enter__`` gives the result object."""

    def __init__(
        self,
        model: nn.Module,
        loss_reduction: str,
        materialize: bool,
        strict: bool,
        fallback: bool,
        grad_scaler: GradScalerLike | None = None,
        reuse: PerSampleGrads | None = None,
    ) -> None:
        self.model = model
        self.reuse = reuse
        self.grad_scaler = grad_scaler
        self._world = world_of(model)
        self._synced: list[bool] = []
        self.loss_reduction = loss_reduction
        self.materialize = materialize
        self.strict = strict
        self.fallback = fallback
        self._handles: list[RemovableHandle] = []
        self._active = False
        self._used = False
        self._sites: list[Site] = []
        self._covered: list[Covered] = []
        self._before: dict[str, Tensor | None] = {}
        self._root_batches: list[int] = []
        self._result: PerSampleGrads | None = None

    # -- entry ---------------------------------------------------------------

    def _plan(self) -> None:
        """Choose the hooked modules (sites) and the covered parameters."""
        model = self.model
        for name, m in model.named_modules():
            if type(m).__name__ == "OptimizedModule" and type(m).__module__.startswith("torch._dynamo"):
                raise UnsupportedModuleError(
                    f"{_label(name, m)} is a torch.compile'd module: its compiled graph bypasses the "
                    "hooks of the modules inside, so per-sample gradients cannot be captured through "
                    "it. Use the eager module, which shares the parameters: "
                    "per_sample_grads(compiled._orig_mod) and call compiled._orig_mod(x) inside the "
                    "context; or compile submodules in place with module.compile(), which keeps hooks working."
                )
        refused = []
        for name, m in model.named_modules():
            rule = rule_for(m)
            why = rule.refuse(m) if rule is not None else None
            if why:
                refused.append(f"{_label(name, m)}: {why}")
        if refused:
            raise UnsupportedModuleError(
                "per-sample gradients do not exist for this model as configured:\n  " + "\n  ".join(refused)
            )

        unsupported: list[tuple[str, nn.Module]] = []
        claimed: list[str] = []  # prefixes of fallback subtrees
        for name, m in model.named_modules():
            if any(name == c or c == "" or name.startswith(c + ".") for c in claimed):
                continue
            own = [n for n, p in m.named_parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            rule = rule_for(m)
            if rule is not None:
                self._sites.append(Site(name, m, rule, own))
            elif self.fallback:
                from .rules.vmap import FallbackRule

                names = [n for n, p in m.named_parameters() if p.requires_grad]
                self._sites.append(Site(name, m, FallbackRule(_label(name, m)), names, fallback=True))
                claimed.append(name)
            else:
                unsupported.append((name, m))

        if unsupported and self.strict:
            listed = ", ".join(_label(n, m) for n, m in unsupported)
            raise UnsupportedModuleError(
                f"no per-sample rule for these modules that own trainable parameters: {listed}. "
                "Pass fallback=True to handle them through torch.func (valid when the module "
                "treats the samples of a batch independently), strict=False to skip them (their "
                "parameters are then left out), or add a rule with gradhooks.register_rule."
            )

        # strict=False: each unsupported module is skipped with its whole subtree, whose
        # parameters it may use functionally (MultiheadAttention uses its out_proj's).
        skipped = [n for n, _ in unsupported]
        self._sites = [
            s for s in self._sites if not any(k == "" or s.name == k or s.name.startswith(k + ".") for k in skipped)
        ]
        skipped_ids = {id(p) for _, m in unsupported for p in m.parameters()}
        owners: dict[int, list[tuple[Site, str]]] = {}
        for site in self._sites:
            for local in site.names:
                owners.setdefault(id(site.module.get_parameter(local)), []).append((site, local))
        for pname, p in model.named_parameters():
            if p.requires_grad and id(p) in owners and id(p) not in skipped_ids:
                self._covered.append(Covered(pname, p, owners[id(p)]))
        if unsupported:
            listed = ", ".join(_label(n, m) for n, m in unsupported)
            warnings.warn(
                f"per_sample_grads(strict=False): skipping modules without a per-sample rule, with their "
                f"submodules: {listed}; their parameters are absent from the result and clip_() leaves their p.grad alone",
                UserWarning,
                stacklevel=3,
            )
        fallbacks = [s for s in self._sites if s.fallback]
        if fallbacks:
            warnings.warn(
                "per_sample_grads(fallback=True): computing per-sample gradients through "
                f"torch.func for {', '.join(s.label for s in fallbacks)} (each module with its "
                "whole subtree; valid when it treats samples independently)",
                FallbackWarning,
                stacklevel=3,
            )

    def __enter__(self) -> PerSampleGrads:
        if self._used:
            raise ContextStateError("this per_sample_grads context was already entered; create a new one per batch")
        self._used = True
        if _already_active(self.model):
            raise ContextStateError(
                "this model (or a module inside it) is already inside a per_sample_grads "
                "context; exit that context first (one context per batch)"
            )
        self._plan()
        result = PerSampleGrads(self._covered, self.loss_reduction, self.materialize)
        result._fallback_modules = [s.name for s in self._sites if s.fallback]
        self._result = result
        with torch.no_grad():
            self._before = {
                c.name: (c.param.grad.detach().clone() if c.param.grad is not None else None) for c in self._covered
            }
        self._active = True
        try:
            self._handles.append(self.model.register_forward_pre_hook(_RootPreHook(self), with_kwargs=True))
            for site in self._sites:
                self._handles.append(site.module.register_forward_hook(_ForwardHook(self, site), with_kwargs=True))
            hooked = {id(s.module) for s in self._sites}
            for name, m in self.model.named_modules():
                rule = rule_for(m)
                if rule is not None and id(m) not in hooked and type(rule).refuse is not Rule.refuse:
                    self._handles.append(m.register_forward_hook(_RefusalHook(self, _label(name, m), rule)))
        except BaseException:
            self._remove_hooks()
            raise
        return result

    # -- hooks ---------------------------------------------------------------

    def _is_active(self) -> bool:
        return self._active

    def _on_root(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not self._active or not torch.is_grad_enabled():
            return
        x = first_tensor((args, kwargs))
        if x is not None and x.dim() > 0:
            self._root_batches.append(int(x.shape[0]))
        if self._world is not None:
            # DDP all-reduces during backward unless inside no_sync().
            self._synced.append(bool(getattr(self.model, "require_backward_grad_sync", True)))

    def _on_forward(self, site: Site, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        if not self._active or not torch.is_grad_enabled():
            return None
        if isinstance(output, Tensor):  # the common case, without pytree's overhead
            if not output.requires_grad:
                return None
            leaves: list[Any] = [output]
            spec = None
        else:
            leaves, spec = output_tensors(output)
            if not any(isinstance(o, Tensor) and o.requires_grad for o in leaves):
                return None
        if site.refusable:
            why = site.rule.refuse(site.module)
            if why:
                raise UnsupportedModuleError(f"{site.label}: {why}")
        call = Call(args, kwargs, leaves)
        call.memo["training"] = site.module.training
        replaced = False
        n = self._root_batches[-1] if self._root_batches else None
        if site.rule.broadcast_batch and call.batch_size == 1 and n is not None and n > 1:
            # A batch-1 input shared by the batch (position ids): expand the output
            # so each sample's gradient arrives separately. Values are unchanged.
            leaves = [
                o.expand(n, *o.shape[1:]) if isinstance(o, Tensor) and o.dim() > 0 and o.shape[0] == 1 else o
                for o in leaves
            ]
            call.out_meta = [(o.shape, o.dtype, o.device) if isinstance(o, Tensor) else None for o in leaves]
            replaced = True
        for i, o in enumerate(leaves):
            if isinstance(o, Tensor) and o.requires_grad:
                target = o if replaced else hook_target(o, call)
                self._handles.append(target.register_hook(GradHook(call, i, o.shape, self._is_active)))
        site.calls.append(call)
        if not replaced:
            return None
        return leaves[0] if spec is None else torch.utils._pytree.tree_unflatten(leaves, spec)

    # -- exit ----------------------------------------------------------------

    def _remove_hooks(self) -> None:
        self._active = False
        handles, self._handles = self._handles, []
        for h in reversed(handles):
            h.remove()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Literal[False]:
        result = cast(PerSampleGrads, self._result)
        try:
            self._remove_hooks()
        finally:
            if exc_type is not None:
                result._fail(
                    f"the per_sample_grads context exited by an exception ({exc_type.__name__}: {exc}); "
                    "it holds no result"
                )
        if exc_type is not None:
            return False
        try:
            self._finish(result)
        except BaseException as err:
            result._fail(
                f"the per_sample_grads context raised at exit ({type(err).__name__}); it holds no result"
            )
            raise
        return False

    def _batch_size(self) -> int:
        """N, and a check that every call that got a gradient agrees with it."""
        root = sorted(set(self._root_batches))
        if len(root) > 1:
            raise BatchSizeError(
                f"the model was called on inputs with different batch sizes {root} inside one "
                "per_sample_grads context; use one context per batch"
            )
        live = [(s, c) for s in self._sites for c in s.live_calls()]
        if root:
            n = root[0]
        else:
            sizes = {int(c.grad.shape[0]) for _, c in live}
            big = sorted(sizes - {1})
            if len(big) > 1:
                seen = ", ".join(f"{s.label} saw {c.batch_size}" for s, c in live)
                raise BatchSizeError(f"modules see different batch sizes: {seen}")
            n = big[0] if big else 1
        bad = []
        for site, call in live:
            ok_input = call.batch_size == n or (call.batch_size == 1 and site.rule.broadcast_batch)
            ok_grad = all(g is None or (g.dim() > 0 and g.shape[0] == n) for g in call.grads)
            if not (ok_input and ok_grad):
                size = call.batch_size if not ok_input else [tuple(g.shape) for g in call.grads if g is not None]
                bad.append(f"{site.label} saw {size}")
        if bad:
            src = "the model's input" if root else "the other modules"
            raise BatchSizeError(
                f"modules see different batch sizes (batch size {n} from {src}): {', '.join(bad)}. "
                "gradhooks takes dimension 0 of every hooked module's input and output as the "
                "batch; only an Embedding's index tensor may have batch size 1 (shared by the "
                "batch, e.g. position ids of shape (1, T))"
            )
        return n

    def _finish(self, result: PerSampleGrads) -> None:
        world = self._world
        try:
            state = self._local_finish(result)
        except BaseException as err:
            if world is not None:
                world.any_(True)  # release the other ranks, which raise too
            raise err
        if world is not None and world.any_(False):
            raise ContextStateError("per_sample_grads: another rank failed at exit (see its error)")
        if state is None:
            return
        n = state
        covered = self._covered
        if len(set(self._synced)) > 1:
            raise ContextStateError(
                "per_sample_grads: some forward passes of the DDP model ran inside no_sync() and some "
                "outside; use one or the other for the whole context"
            )
        synced = world is not None and bool(self._synced) and self._synced[0]
        selfcheck.verify(covered, self._before, world=world if synced else None)
        grad_scale = float(self.grad_scaler.get_scale()) if self.grad_scaler is not None else 1.0
        grads = None
        if self.materialize:
            # Every rule is linear in G: scale the captured G (small) instead of
            # the (N, *p.shape) results (large), then build them in one pass.
            factor = (float(n) if self.loss_reduction == "mean" else 1.0) / grad_scale
            if factor != 1.0:
                for site in self._sites:
                    for call in site.calls:
                        call.grads = [g * factor if g is not None else None for g in call.grads]
            grads = combine.per_sample(covered, n, self._reusable(n))
            for site in self._sites:
                for call in site.calls:
                    call.release()
                site.calls.clear()
        result._ready(n, self._before, grads, world=world, grad_scale=grad_scale)

    def _reusable(self, n: int) -> dict[str, Tensor]:
        """Buffers taken from ``reuse`` for this result's tensors, by shape/dtype/device."""
        old = self.reuse
        if old is None or old._state != "ready" or not old._materialize:
            return {}
        pool: dict[tuple[Any, ...], list[Tensor]] = {}
        for t in old._grads.values():
            if t.is_contiguous():
                pool.setdefault((tuple(t.shape), t.dtype, t.device), []).append(t)
        old._fail("its tensors were reused by a later per_sample_grads context (reuse=...)")
        taken = {}
        for cov in self._covered:
            key = ((n, *cov.param.shape), cov.param.dtype, cov.param.device)
            if pool.get(key):
                taken[cov.name] = pool[key].pop()
        return taken

    def _local_finish(self, result: PerSampleGrads) -> int | None:
        """Checks that involve no other rank: ``N``, or ``None`` when no backward
        reached the hooks."""
        covered = self._covered
        for site in self._sites:
            site.prune()
        if covered and not any(s.calls for s in self._sites):
            # Nothing reached the hooks. If p.grad changed anyway, that gradient came
            # from somewhere the hooks cannot see.
            changed = [
                c.name
                for c in covered
                if c.param.grad is not None
                and (self._before[c.name] is None or not torch.equal(c.param.grad, self._before[c.name]))
            ]
            if changed:
                raise UnseenGradientError(
                    f"gradient reached parameter(s) {changed} outside their hooked modules (no hooked "
                    "module's output received a gradient): the parameters are used where no hook "
                    "sees them (e.g. functionally, F.linear(x, layer.weight))"
                )
            result._no_backward()
            return None
        return self._batch_size() if covered else (self._root_batches[0] if self._root_batches else 0)
