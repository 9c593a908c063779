"""What one context records while it is open: the sites, the problems, the hooks.

The tracer (:mod:`gradhooks.trace.tracer`) calls :meth:`Recording.use` for every
op where a covered parameter meets the batch; the handlers in
``gradhooks/uses/`` build their sites through :meth:`Recording.site`, pass the
parameter to the op through :meth:`Recording.operand` and hook the op's output
through :meth:`Recording.watch`. Problems found during the forward (a use the
library cannot attribute, an op it has no rule for) are collected here and
raised by the context: an unsupported use at the end of the model's forward,
an attribution problem at exit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from .capture import Attach, Call, FuncHook, GradHook, hook_target
from .sites import Site
from .trace.derive import Chain, Origin, Source
from .trace.layout import AnyLayout, Opaque

if TYPE_CHECKING:
    from .trace.tracer import Handler, Tracer

__all__ = ["Recording", "Problem", "label_for"]


@dataclass
class Problem:
    """A use the library could not handle: ``kind`` ``"unsupported"`` (no rule),
    ``"layout"`` (cannot be attributed) or ``"coupled"`` (batch statistics)."""

    kind: str
    label: str
    op: str
    why: str
    sources: list[Source]


class Recording:
    """Sites, problems and hook handles of one open context."""

    def __init__(self, *, one_backward: bool, labels: dict[int, str]) -> None:
        self.active = False
        self.one_backward = one_backward
        self.labels = labels  # id(Source) -> "'fc1' (Linear)"
        self.sites: dict[Any, Site] = {}
        self.problems: list[Problem] = []
        #: (label, op, why) of parameters combined with a reduced loss (penalties).
        self.notes: list[tuple[str, str, str]] = []
        self.handles: list[RemovableHandle] = []
        self.anchor = torch.zeros((), requires_grad=True) if one_backward else None
        self.skipped: set[int] = set()  # id(Source) left out by strict=False

    def is_active(self) -> bool:
        return self.active

    def keep(self, handle: RemovableHandle) -> None:
        self.handles.append(handle)

    # -- sites ---------------------------------------------------------------------

    def label_of(self, origin: Origin) -> str:
        return label_for(self.labels, origin)

    # -- the dispatch of a use -------------------------------------------------------

    def use(
        self,
        tr: Tracer,
        func: Any,
        name: str,
        handler: Handler | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        batched: dict[int, AnyLayout],
        origins: dict[int, Origin],
    ) -> Any:
        opaque = next((lay for lay in batched.values() if isinstance(lay, Opaque)), None)
        if handler is None:
            self.problem(tr, "unsupported", name, origins, f"no per-sample rule for {name!r} with a parameter operand")
            return self.plain(tr, func, args, kwargs, batched, origins)
        if opaque is not None and opaque.reduced:
            # A parameter combined with a loss (a weight penalty): no per-sample meaning.
            # Its gradient reaches p.grad through backward, and the exit check names it.
            self.notes.append((self.label_of(next(iter(origins.values()))), name, opaque.why))
            out = func(*args, **kwargs)
            tr.follow(func, args, kwargs, out, batched)
            return out
        if opaque is not None:
            self.problem(tr, "layout", name, origins, f"its batched operand's samples cannot be told apart ({opaque.why})")
        elif (tr.n or 0) > 0:
            return handler(tr, func, args, kwargs, batched, origins)
        return self.plain(tr, func, args, kwargs, batched, origins)

    def plain(self, tr: Tracer, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], batched: dict[int, AnyLayout], origins: dict[int, Origin]) -> Any:
        """Run the op without capturing (in the one-backward mode with its parameters
        detached, so ``p.grad`` stays as it was)."""
        if self.one_backward:
            args, kwargs = _detach_sourced(args, kwargs, origins)
        out = func(*args, **kwargs)
        if self.anchor is not None and isinstance(out, Tensor) and not out.requires_grad and out.is_floating_point():
            out = Attach.apply(out, self.anchor)  # so that backward still runs (and the error is ours)
        tr.follow(func, args, kwargs, out, batched)
        return out

    def problem(self, tr: Tracer, kind: str, op: str, origins: dict[int, Origin], why: str) -> None:
        sources: list[Source] = []
        for o in origins.values():
            for s in [o] if isinstance(o, Source) else o.sources():
                if s not in sources:
                    sources.append(s)
        label = ", ".join(dict.fromkeys(self.labels.get(id(s), repr(s.name)) for s in sources))
        prob = Problem(kind, label, op, why, sources)
        self.problems.append(prob)

    def unsupported(self, tr: Tracer, op: str, origins: dict[int, Origin], why: str) -> None:
        self.problem(tr, "unsupported", op, origins, why)

    # -- helpers for the handlers ------------------------------------------------------

    def operand(self, t: Tensor, origin: Origin | None, site: Site, local: str, *, track: bool = True) -> Tensor:
        """The tensor to pass to the op for a parameter (or derived) operand ``t``.

        One-backward mode: ``t`` detached, so backward computes no gradient for it.
        Default mode: an alias whose gradient (what autograd sends through this
        use) is added to ``site.tracked[local]`` with ``t``'s origin, for the exit check."""
        if self.one_backward:
            return t.detach()
        if not track:  # e.g. a sparse gradient, which a view's backward cannot reshape
            return t
        alias = t.view_as(t)
        if alias.requires_grad and origin is not None:

            def add_use(grad: Tensor) -> None:
                prev = site.tracked.get(local)
                site.tracked[local] = (origin, grad.clone() if prev is None else prev[1].add_(grad))

            self.keep(alias.register_hook(FuncHook(add_use, self.is_active)))
        return alias

    def watch(self, out: Tensor, call: Call, index: int, inputs: list[Any]) -> Tensor:
        """Hook ``out`` so that its gradient lands in ``call.grads[index]`` (reshaped
        to ``out``'s shape). Returns the tensor the op should return: ``out``, or in
        the one-backward mode, when nothing before it needs a gradient, ``out``
        attached to the graph so that its gradient is computed at all."""
        if not out.requires_grad:
            if self.anchor is None:
                return out
            out = Attach.apply(out, self.anchor)
        call.out_meta[index] = (out.shape, out.dtype, out.device)
        target = hook_target(out, inputs)
        shape = out.shape
        transform = (lambda g: g) if target is out else (lambda g: g.reshape(shape))
        self.keep(target.register_hook(GradHook(call, index, transform, self.is_active)))
        return out

    def watch_fn(self, out: Tensor, fn: Callable[[Tensor], None], inputs: list[Any]) -> Tensor:
        """Like :meth:`watch`, calling ``fn(grad)`` (the gradient as it arrives at
        the hooked tensor: reshape it to ``out.shape`` before use)."""
        if not out.requires_grad:
            if self.anchor is None:
                return out
            out = Attach.apply(out, self.anchor)
        self.keep(hook_target(out, inputs).register_hook(FuncHook(fn, self.is_active)))
        return out

    def hook_tensor(self, t: Tensor, fn: Callable[[Tensor], None]) -> None:
        self.keep(t.register_hook(FuncHook(fn, self.is_active)))

    def chain(self, origin: Origin) -> Chain:
        return Chain(origin)


def label_for(labels: dict[int, str], origin: Origin) -> str:
    """How messages name the parameters behind ``origin``: ``"'fc1' (Linear)"``."""
    srcs = [origin] if isinstance(origin, Source) else origin.sources()
    return ", ".join(dict.fromkeys(labels.get(id(s), repr(s.name)) for s in srcs))


def _detach_sourced(args: tuple[Any, ...], kwargs: dict[str, Any], origins: dict[int, Origin]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    def fix(a: Any) -> Any:
        if isinstance(a, Tensor):
            return a.detach() if id(a) in origins else a
        if isinstance(a, (list, tuple)) and a and isinstance(a[0], Tensor):
            return type(a)(fix(t) for t in a) if isinstance(a, list) else tuple(fix(t) for t in a)
        return a

    return tuple(fix(a) for a in args), {k: fix(v) for k, v in kwargs.items()}
