"""The tracer: a ``TorchFunctionMode`` active inside a ``per_sample_grads`` block.

For every torch function called while it is active it keeps, for the tensors
involved (in a side table, never on the tensors):

* the batch :class:`~gradhooks.trace.layout.Layout` of tensors computed from
  the model's input (propagated by :mod:`gradhooks.trace.optable`);
* the :class:`~gradhooks.trace.derive.Origin` of batch-independent tensors
  computed from covered parameters (``Derived`` nodes).

An op where a parameter (or a tensor derived from one) meets a batched tensor
is a *use*: the handler registered for the function (``gradhooks/uses/``)
records what its rule needs and hooks the output. Everything else runs
unchanged. The cost is a dictionary lookup and a few Python calls per op.

State lives on the tracer (the context owns it). Hooks registered here go
through :meth:`Tracer.keep_handle` so the context removes them; they check
:attr:`Tracer.active`, so a hook firing after the context closed does nothing.
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from .derive import Derived, Origin, Source
from .layout import WHOLE, AnyLayout, Layout, Opaque
from .optable import _loss, _pointwise, classify, name_of, propagate

if TYPE_CHECKING:
    from ..context import Recording

__all__ = ["Tracer", "Handler", "HANDLERS", "register_handler"]

#: ``handler(tracer, func, args, kwargs, batched, origins) -> output`` for the
#: functions where a parameter's use is captured.
Handler = Callable[["Tracer", Any, tuple[Any, ...], dict[str, Any], dict[int, AnyLayout], dict[int, Origin]], Any]
HANDLERS: dict[Any, Handler] = {}
#: Handlers by op name (families such as the pointwise ops), used when the function
#: itself has none.
NAME_HANDLERS: dict[str, Handler] = {}


def register_handler(*funcs: Any, names: tuple[str, ...] = ()) -> Callable[[Handler], Handler]:
    def decorate(fn: Handler) -> Handler:
        for f in funcs:
            HANDLERS[f] = fn
        for n in names:
            NAME_HANDLERS[n] = fn
        return fn

    return decorate


def _transparent(func: Callable[..., Any]) -> Callable[..., Any]:
    """A copy of a Python torch function that skips its ``has_torch_function``
    re-dispatch, so the ops inside it run under the tracer (``F.multi_head_attention_forward``
    uses its parameters through ``F.linear`` and chunks of them). The copy has its own
    globals; nothing of torch's is changed."""
    g = dict(func.__globals__)
    g["has_torch_function"] = lambda *_: False
    body = types.FunctionType(func.__code__, g, func.__name__, func.__defaults__, func.__closure__)
    body.__kwdefaults__ = func.__kwdefaults__
    return body


_MHA = F.multi_head_attention_forward
_MHA_BODY = _transparent(_MHA)
_BACKWARD_BODY = _transparent(torch.autograd.backward)


class Tracer(TorchFunctionMode):
    """See the module docstring. ``rec``: the context's recording (sites, options)."""

    def __init__(self, rec: Recording) -> None:
        super().__init__()
        self.rec = rec
        self.n: int | None = None  # the batch size, from the model's input
        self._infos: dict[int, tuple[weakref.ref[Tensor], AnyLayout | None, Origin | None]] = {}
        self.sources: dict[int, Source] = {}
        #: ids of parameters a module-level rule covers while its forward runs (counts)
        self.masked: dict[int, int] = {}
        #: scalars that reduce the batch, by id: (tensor, "sum" or "mean", the op)
        self._reductions: dict[int, tuple[weakref.ref[Tensor], str, str]] = {}
        #: how each loss passed to backward() reduced the batch: ("sum" | "mean", op)
        self.loss_reductions: list[tuple[str, str]] = []

    # -- the side table ----------------------------------------------------------

    def layout_of(self, t: Tensor) -> AnyLayout | None:
        e = self._infos.get(id(t))
        return e[1] if e is not None and e[0]() is t else None

    def origin_of(self, t: Tensor) -> Origin | None:
        src = self.sources.get(id(t))
        if src is not None and src.param is t:
            return src
        e = self._infos.get(id(t))
        return e[2] if e is not None and e[0]() is t else None

    def set_layout(self, t: Tensor, lay: AnyLayout | None) -> None:
        if lay is None:
            self._infos.pop(id(t), None)
        else:
            self._infos[id(t)] = (weakref.ref(t), lay, None)

    def set_origin(self, t: Tensor, origin: Origin) -> None:
        self._infos[id(t)] = (weakref.ref(t), None, origin)

    def mark_batched(self, t: Tensor) -> None:
        """A tensor of the model's input: batched in dimension 0."""
        if self.layout_of(t) is None and self.origin_of(t) is None:
            n = self.n or 0
            self.set_layout(t, WHOLE if n <= 1 else Layout(0))

    def clear(self) -> None:
        self._infos.clear()

    # -- dispatch ----------------------------------------------------------------

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if not self.rec.active:
            return func(*args, **kwargs)
        if func is _MHA:
            with self:
                return _MHA_BODY(*args, **kwargs)
        name, prop = classify(func)
        if prop is None:
            if func is Tensor.backward or func is torch.autograd.backward:
                return self._backward(func, args, kwargs)
            return func(*args, **kwargs)
        batched, origins = self._scan(args, kwargs)
        if not batched and not origins:
            return func(*args, **kwargs)
        if name == "__setitem__":
            return self._setitem(func, args, kwargs, batched, origins)
        if name == "batch_norm" and batched and not origins and torch.is_grad_enabled():
            self._batch_stats(func, args, kwargs)
        if batched and origins and torch.is_grad_enabled():
            handler = HANDLERS.get(func) or NAME_HANDLERS.get(name)
            if handler is None and prop is _pointwise:
                handler = NAME_HANDLERS.get("<pointwise>")
            return self.rec.use(self, func, name, handler, args, kwargs, batched, origins)
        out = func(*args, **kwargs)
        if not batched:
            self.derive(func, args, kwargs, out, origins)
        elif prop is _pointwise and len(batched) == 1 and isinstance(out, Tensor) and args and isinstance(args[0], Tensor) and id(args[0]) in batched:
            # The common case (an activation): the batched first operand keeps its layout.
            if out is not args[0] and out.dim() == args[0].dim():
                self.set_layout(out, batched[id(args[0])])
            elif out is not args[0]:
                self.follow(func, args, kwargs, out, batched)
        else:
            self.follow(func, args, kwargs, out, batched)
        return out

    def _scan(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[dict[int, AnyLayout], dict[int, Origin]]:
        batched: dict[int, AnyLayout] = {}
        origins: dict[int, Origin] = {}
        infos, sources = self._infos, self.sources
        for group in (args, kwargs.values()):
            for a in group:
                if isinstance(a, Tensor):
                    items: Any = (a,)
                elif isinstance(a, (list, tuple)) and a and isinstance(a[0], Tensor):
                    items = a
                else:
                    continue
                for t in items:
                    if not isinstance(t, Tensor):
                        continue
                    key = id(t)
                    src = sources.get(key)
                    if src is not None and src.param is t:
                        if key not in self.masked:
                            origins[key] = src
                        continue
                    e = infos.get(key)
                    if e is None or e[0]() is not t:
                        continue
                    if e[1] is not None:
                        batched[key] = e[1]
                    elif e[2] is not None:
                        origins[key] = e[2]
        return batched, origins

    def follow(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any, batched: dict[int, AnyLayout]) -> None:
        """Record the layout of ``out`` (one output tensor or several)."""
        n = self.n if self.n is not None else 0
        lay = propagate(func, args, kwargs, out, batched, n)
        if isinstance(out, Tensor):
            if isinstance(lay, list):
                lay = lay[0]
            self.set_layout(out, lay)
            if isinstance(lay, Opaque) and lay.reduced and out.dim() == 0:
                self._note_reduction(func, kwargs, out)
            return
        if isinstance(out, (tuple, list)):
            leaves = [o for o in out if isinstance(o, Tensor)]
            lays = lay if isinstance(lay, list) else [lay] * len(leaves)
            for t, one in zip(leaves, lays, strict=False):
                self.set_layout(t, one)

    def derive(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any, origins: dict[int, Origin]) -> None:
        """Record batch-independent outputs computed from covered parameters."""
        outs = [out] if isinstance(out, Tensor) else [o for o in pytree.tree_leaves(out) if isinstance(o, Tensor)]
        live = [(i, o) for i, o in enumerate(outs) if o.requires_grad]
        if not live:
            return
        leaves, _ = pytree.tree_flatten((args, kwargs))
        parents = {i: origins[id(t)] for i, t in enumerate(leaves) if isinstance(t, Tensor) and id(t) in origins}
        for i, o in live:
            self.set_origin(o, Derived(func, args, kwargs, parents, None if isinstance(out, Tensor) else i))

    def _setitem(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], batched: dict[int, AnyLayout], origins: dict[int, Origin]) -> Any:
        from .indexing import setitem_layout

        target, index, value = args[0], args[1], args[2]
        if origins and torch.is_grad_enabled() and any(isinstance(v, Tensor) and id(v) in origins for v in (value,)):
            self.rec.unsupported(self, "__setitem__", origins, "writing a parameter-derived tensor into another tensor in place")
        out = func(*args, **kwargs)
        lay = setitem_layout(target, index, value, batched, self.n or 0) if (self.n or 0) > 1 else (WHOLE if batched else None)
        if lay is not None:
            self.set_layout(target, lay)
        return out

    def _batch_stats(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Batch norm with batch statistics couples the samples of a batch, frozen or not."""
        from ..rules.normalization import NO_STATS_REASON, TRAINING_REASON

        if func is F.batch_norm:
            rm = args[1] if len(args) > 1 else kwargs.get("running_mean")
            training = args[5] if len(args) > 5 else kwargs.get("training", False)
        else:  # torch.batch_norm(input, weight, bias, running_mean, running_var, training, ...)
            rm = args[3] if len(args) > 3 else kwargs.get("running_mean")
            training = args[5] if len(args) > 5 else kwargs.get("training", False)
        if training or rm is None:
            self.rec.problem(self, "coupled", "batch_norm", {}, TRAINING_REASON if training else NO_STATS_REASON)

    def _note_reduction(self, func: Any, kwargs: dict[str, Any], out: Tensor) -> None:
        """Remember how a scalar reduced the batch (``.sum()``, ``.mean()``, a loss
        function's ``reduction``), to compare with ``loss_reduction`` if it is the
        loss passed to ``backward()`` as it is."""
        name = name_of(func)
        kind = {"sum": "sum", "nansum": "sum", "mean": "mean", "nanmean": "mean"}.get(name)
        if kind is None and classify(func)[1] is _loss:
            kind = {"sum": "sum", "mean": "mean", "batchmean": "mean"}.get(kwargs.get("reduction", "mean"))
        if kind is not None:
            self._reductions[id(out)] = (weakref.ref(out), kind, name)

    def _loss_roots(self, roots: Any) -> None:
        for t in [roots] if isinstance(roots, Tensor) else list(roots or ()):
            got = self._reductions.get(id(t)) if isinstance(t, Tensor) else None
            if got is not None and got[0]() is t:
                self.loss_reductions.append((got[1], got[2]))
            else:
                self.loss_reductions.append(("other", ""))

    def _backward(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """``loss.backward()`` / ``torch.autograd.backward``, run with the tracer active:
        Python code that runs during backward (a reentrant checkpoint's
        recomputation) is traced too."""
        if func is Tensor.backward:
            names = ("gradient", "retain_graph", "create_graph", "inputs")
        else:
            names = ("grad_tensors", "retain_graph", "create_graph", "grad_variables", "inputs")
        opts: dict[str, Any] = dict(zip(names, args[1:], strict=False))
        opts.update(kwargs)
        self._loss_roots(args[0] if args else kwargs.get("tensors"))
        with self:
            _BACKWARD_BODY(
                args[0], opts.get("gradient", opts.get("grad_tensors")), opts.get("retain_graph"),
                opts.get("create_graph", False), inputs=opts.get("inputs"),
            )
