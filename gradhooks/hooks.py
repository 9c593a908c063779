"""The module hooks a context installs (all removed at exit by the context).

* On the model: a pre-hook and an always-called forward hook that track the
  call depth. The outermost call's input is the batch: its batch size is N,
  and its tensors of batch size N are marked batched in dimension 0. When that
  call ends, a use the library cannot handle (``strict=True``) is raised.
* On every module whose rule can refuse its configuration (BatchNorm): a check
  at each call (a frozen BatchNorm switched to training mode inside).
* On a module with a module-level rule (``register_rule``, a fallback unit):
  a forward hook that records the call and hooks its outputs' gradients.

Each hook is an instance of a class of ours, so :func:`already_active` can
tell a model that is inside another context.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from .capture import Call, GradHook, detach_tree, hook_target
from .errors import BatchSizeError, UnsupportedModuleError
from .plan import ModuleSite
from .sites import Site
from .trace.derive import Chain
from .trace.layout import Layout, Opaque, Whole

if TYPE_CHECKING:
    from .finish import Options, State

__all__ = ["install", "already_active"]


class _Enter:
    """Forward pre-hook: the call depth; the outermost call marks the batch."""

    __slots__ = ("state",)

    def __init__(self, state: State) -> None:
        self.state = state

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        st = self.state
        if not st.rec.active:
            return
        if st.depth == 0 and torch.is_grad_enabled():
            _mark_batch(st, module, args, kwargs)
        st.depth += 1


class _Leave:
    """Forward hook (always called): the depth; raises pending unsupported uses."""

    __slots__ = ("state",)

    def __init__(self, state: State) -> None:
        self.state = state

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        st = self.state
        if not st.rec.active:
            return
        st.depth = max(0, st.depth - 1)
        if st.depth == 0 and st.pending_unsupported:
            raise UnsupportedModuleError(st.unsupported_message())


def _mark_batch(st: State, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    leaves = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, Tensor) and t.dim() > 0]
    if not leaves:
        return
    tr = st.tracer
    first = tr.layout_of(leaves[0])
    if not isinstance(first, (Layout, Whole)):  # a batched input already agrees with tr.n
        n = int(leaves[0].shape[0])
        if tr.n is None:
            tr.n = n
        elif n != tr.n:
            st.batch_sizes.add(n)
    if st.world is not None:
        st.synced.append(bool(getattr(module, "require_backward_grad_sync", True)))
        if st.rec.one_backward and st.synced[-1] and torch.is_grad_enabled():
            from .errors import GradhooksError

            raise GradhooksError(
                "per_sample_grads(one_backward=True) on a DistributedDataParallel model needs ddp.no_sync(): "
                "DDP's reducer waits for gradients that this mode never computes. Use "
                "`with ddp.no_sync(), per_sample_grads(ddp, one_backward=True) as g:`; g.clip_() does the one all-reduce."
            )
    for t in leaves:
        if t.shape[0] == tr.n:
            if isinstance(tr.layout_of(t), Opaque):
                tr.set_layout(t, None)  # a tensor computed from an earlier batch, given as a new one
            tr.mark_batched(t)


class _Mask:
    """Pre-hook and always-called forward hook of a module-level site: during its
    forward, the tracer does not treat its parameters as uses (its rule covers them)."""

    __slots__ = ("state", "ids", "enter")

    def __init__(self, state: State, ids: frozenset[int], enter: bool) -> None:
        self.state = state
        self.ids = ids
        self.enter = enter

    def __call__(self, module: nn.Module, *rest: Any) -> None:
        masked = self.state.tracer.masked
        for i in self.ids:
            masked[i] = masked.get(i, 0) + (1 if self.enter else -1)
            if masked[i] <= 0:
                del masked[i]


class _ModuleSiteHook:
    """Forward hook of a module-level rule: records the call, hooks the outputs."""

    __slots__ = ("state", "site", "spec")

    def __init__(self, state: State, site: Site, spec: ModuleSite) -> None:
        self.state = state
        self.site = site
        self.spec = spec

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        st = self.state
        if not st.rec.active or not torch.is_grad_enabled():
            return None
        why = self.spec.rule.refuse(module)
        if why:
            raise UnsupportedModuleError(f"{self.spec.label}: {why}")
        leaves, spec = pytree.tree_flatten(output)
        if not any(isinstance(o, Tensor) and o.requires_grad for o in leaves):
            hidden = _hidden_container(leaves)
            if hidden is not None:
                raise UnsupportedModuleError(
                    f"{self.spec.label} returned a {hidden}, a container torch's pytree does not know, so the "
                    "gradients of the tensors inside it cannot be captured. Register it "
                    "(torch.utils._pytree.register_dataclass, or register_pytree_node) or return a tuple or dict."
                )
            return None
        tr = st.tracer
        in_leaves = pytree.tree_leaves((args, kwargs))
        batched = [i for i, t in enumerate(in_leaves) if isinstance(t, Tensor) and tr.layout_of(t) is not None]
        bad = [i for i in batched if not _plain0(tr.layout_of(in_leaves[i]))]
        replaced = False
        if bad or not batched:
            if not batched and self.spec.rule.broadcast_batch and tr.n is not None and tr.n > 1:
                leaves = [o.expand(tr.n, *o.shape[1:]) if isinstance(o, Tensor) and o.dim() and o.shape[0] == 1 else o for o in leaves]
                replaced = True
            else:
                what = "no input that carries the batch" if not batched else "the batch outside dimension 0 of its input"
                st.rec.problems.append(_problem(self.spec, what))
                return None
        call = Call(detach_tree(args), detach_tree(kwargs), leaves)
        call.memo["batched_leaves"] = batched
        for t in in_leaves:  # an in-place change after the block would make later queries wrong
            if isinstance(t, Tensor):
                call.keep_version(t)
        for p in self.spec.module.parameters():  # rules may read the weights (the fallback replays them)
            call.keep_version(p)
        for i, o in enumerate(leaves):
            if isinstance(o, Tensor) and o.requires_grad:
                lay = tr.layout_of(o)
                if not replaced and not _plain0(lay):
                    why = f" ({lay.why})" if isinstance(lay, Opaque) else ""
                    st.rec.problems.append(_problem(self.spec, f"an output whose batch is not in dimension 0{why}"))
                    return None
                if replaced:
                    tr.set_layout(o, Layout(0))
                target = o if replaced else hook_target(o, in_leaves)
                shape = o.shape
                st.rec.keep(target.register_hook(GradHook(call, i, lambda g, s=shape: g.reshape(s), st.rec.is_active)))
        self.site.calls.append(call)
        if not replaced:
            return None
        return leaves[0] if spec.num_leaves == 1 and isinstance(output, Tensor) else pytree.tree_unflatten(leaves, spec)


class _Refuse:
    """Forward pre-hook on a module whose rule can refuse its configuration (BatchNorm):
    switched to a sample-coupling mode inside the context, it would corrupt every
    other layer's per-sample gradients, even when its own parameters are frozen."""

    __slots__ = ("state", "label", "rule")

    def __init__(self, state: State, label: str, rule: Any) -> None:
        self.state = state
        self.label = label
        self.rule = rule

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self.state.rec.active and torch.is_grad_enabled():
            why = self.rule.refuse(module)
            if why:
                raise UnsupportedModuleError(f"{self.label}: {why}")


def _hidden_container(leaves: list[Any]) -> str | None:
    """The type name of an output leaf that is an object holding tensors that need a
    gradient (an unregistered dataclass), else ``None``."""
    for leaf in leaves:
        if isinstance(leaf, Tensor) or not hasattr(leaf, "__dict__"):
            continue
        if any(isinstance(v, Tensor) and v.requires_grad for v in vars(leaf).values()):
            return type(leaf).__name__
    return None


def _plain0(lay: Any) -> bool:
    return isinstance(lay, Whole) or (isinstance(lay, Layout) and lay.dim == 0 and lay.plain)


def _problem(spec: ModuleSite, what: str) -> Any:
    from .recording import Problem

    sources = []
    return Problem("layout", spec.label, type(spec.module).__name__, f"its rule needs the batch in dimension 0; the call had {what}", sources)


def _ours(hook: object) -> bool:
    return isinstance(hook, (_Enter, _Leave, _ModuleSiteHook, _Refuse, _Mask))


def already_active(model: nn.Module) -> bool:
    """Whether ``model`` (or a module inside it, or one containing it) is inside an
    open context: one of its parameters is traced by an active tracer of ours on
    this thread's torch function mode stack, or it carries our hooks."""
    from torch.overrides import _get_current_function_mode_stack

    from .trace.tracer import Tracer

    tracers = [m for m in _get_current_function_mode_stack() if isinstance(m, Tracer) and m.rec.active]
    if tracers and any(id(p) in t.sources for t in tracers for p in model.parameters()):
        return True
    for d in (model._forward_hooks, model._forward_pre_hooks):
        if any(_ours(h) for h in d.values()):
            return True
    return False


def install(model: nn.Module, state: State, options: Options) -> None:
    """Register every hook of the context (handles kept on ``state.rec``)."""
    rec = state.rec
    plan = state.plan
    rec.keep(model.register_forward_pre_hook(_Enter(state), with_kwargs=True))
    rec.keep(model.register_forward_hook(_Leave(state), with_kwargs=True, always_call=True))
    for label, m, rule in plan.refusable:
        rec.keep(m.register_forward_pre_hook(_Refuse(state, label, rule)))
    by_id = {id(s.param): s for s in plan.covered}
    for spec in plan.module_sites:
        chains = {local: Chain(by_id[id(spec.module.get_parameter(local))]) for local in spec.names}
        site = Site(spec.rule, spec.module, spec.label, list(spec.names), chains, module_level=True, fallback=spec.fallback)
        rec.sites[("module", id(spec.module))] = site
        ids = frozenset(id(spec.module.get_parameter(local)) for local in spec.names)
        rec.keep(spec.module.register_forward_pre_hook(_Mask(state, ids, True)))
        rec.keep(spec.module.register_forward_hook(_ModuleSiteHook(state, site, spec), with_kwargs=True))
        rec.keep(spec.module.register_forward_hook(_Mask(state, ids, False), always_call=True))


def batch_size_error(sizes: set[int], n: int) -> BatchSizeError:
    got = sorted(sizes | {n})
    return BatchSizeError(
        f"the model was called on inputs with different batch sizes {got} inside one per_sample_grads "
        "context; use one context per batch"
    )
