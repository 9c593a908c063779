"""Propagators: the batch layout of an op's output from the layouts of its inputs.

Every propagator receives ``(func, args, kwargs, out, batched, n)`` where
``batched`` maps ``id(tensor)`` of the inputs with a layout to that layout, and
returns the layout of the output (one for every tensor of a tuple output) or a
list with one entry per output tensor (``None``: batch-independent).
:mod:`gradhooks.trace.optable` maps op names to them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from . import layout as L
from .layout import AnyLayout, Layout, Opaque, Whole
from .names import name_of

Propagator = Callable[[Any, tuple[Any, ...], dict[str, Any], Any, dict[int, AnyLayout], int], Any]

# -- argument helpers ---------------------------------------------------------------


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], pos: int, name: str, default: Any = None) -> Any:
    if len(args) > pos:
        return args[pos]
    return kwargs.get(name, default)


def _self_layout(args: tuple[Any, ...], batched: dict[int, AnyLayout]) -> tuple[Tensor, AnyLayout]:
    t = args[0]
    return t, batched[id(t)]


def _ints(value: Any) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


# -- propagators ---------------------------------------------------------------------


def _pointwise(func, args, kwargs, out, batched, n):
    leaves = [a for a in args if isinstance(a, Tensor)] + [v for v in kwargs.values() if isinstance(v, Tensor)]
    for a in args:
        if isinstance(a, (list, tuple)):
            leaves.extend(t for t in a if isinstance(t, Tensor))
    ref = out if isinstance(out, Tensor) else leaves[0]
    parts = [(t.dim(), batched[id(t)]) for t in leaves if id(t) in batched]
    return L.broadcast(ref.dim(), parts, ref.shape)


def _same(func, args, kwargs, out, batched, n):
    """Layout of ``self`` only (``to(other)``, ``type_as(other)``: other gives just a dtype)."""
    return batched.get(id(args[0]), Opaque("an op on a batch-independent tensor with a batched argument"))


def _reduce_spec(name: str) -> tuple[int, str, bool]:
    """(position of ``dim``, its keyword, default keepdim) per reduction."""
    if name in ("norm", "vector_norm"):
        return 2, "dim", False
    return 1, "dim", False


def _reduce(func, args, kwargs, out, batched, n):
    name = name_of(func)
    if name in ("max", "min") and len(args) > 1 and isinstance(args[1], Tensor):
        return _pointwise(func, args, kwargs, out, batched, n)  # elementwise maximum/minimum
    t = args[0]
    lay = batched.get(id(t))
    if not isinstance(lay, Layout):
        return lay if lay is not None else _pointwise(func, args, kwargs, out, batched, n)
    pos, key, _ = _reduce_spec(name)
    dims = _arg(args, kwargs, pos, key, None)
    if isinstance(dims, bool):  # std/var(unbiased) without dim
        dims = None
    if dims is None and "axis" in kwargs:
        dims = kwargs["axis"]
    keepdim = bool(_arg(args, kwargs, pos + 1, "keepdim", False))
    if isinstance(dims, (int, list, tuple)) and (dims == [] or dims == ()):
        dims = None
    return L.reduce(lay, _ints(dims), keepdim, t.dim(), name)


_ALONG_DEFAULT = {"softmax": None, "log_softmax": None, "softmin": None, "topk": -1, "sort": -1, "argsort": -1,
                  "normalize": 1, "glu": -1, "diff": -1, "cumsum": None, "cumprod": None, "cummax": None,
                  "cummin": None, "logcumsumexp": None, "gumbel_softmax": -1, "kthvalue": -1,
                  "cosine_similarity": 1, "msort": 0}
_ALONG_POS = {"topk": 2, "normalize": 2, "diff": 2, "kthvalue": 2, "cosine_similarity": 2, "msort": 99}


def _along(func, args, kwargs, out, batched, n):
    """Ops along one dimension that keep the others (softmax, cumsum, sort, topk)."""
    name = name_of(func)
    t = args[0]
    lay = batched.get(id(t))
    if name == "cosine_similarity":
        parts = [(a.dim(), batched[id(a)]) for a in args[:2] if isinstance(a, Tensor) and id(a) in batched]
        lay = L.broadcast(max(a.dim() for a in args[:2]), parts, ())
    if not isinstance(lay, Layout):
        return lay if lay is not None else Opaque(name)
    dim = _arg(args, kwargs, _ALONG_POS.get(name, 1), "dim", _ALONG_DEFAULT.get(name))
    if dim is None:
        return Opaque(f"{name} without an explicit dim")
    ndim = max(t.dim(), 1)
    if dim % ndim == lay.dim:
        return Opaque(f"{name} along the batch dimension")
    if name == "cosine_similarity" and dim % ndim < lay.dim:
        return lay.moved(lay.dim - 1)
    return lay


def _batch0(func, args, kwargs, out, batched, n):
    """Ops that treat dimension 0 as their own batch (conv, pooling, interpolation):
    the output's dimension 0 is the input's."""
    lays = [batched[id(a)] for a in args if isinstance(a, Tensor) and id(a) in batched]
    lays += [batched[id(v)] for v in kwargs.values() if isinstance(v, Tensor) and id(v) in batched]
    first = lays[0]
    if isinstance(first, (Opaque, Whole)):
        return first
    for lay in lays:
        if not isinstance(lay, Layout) or lay.dim != 0 or not lay.same_structure(first):
            return Opaque(f"{name_of(func)} needs the batch in dimension 0")
    return first


def _norm_last(func, args, kwargs, out, batched, n):
    """layer_norm / rms_norm: statistics over the trailing ``normalized_shape``."""
    t, lay = _self_layout(args, batched)
    if not isinstance(lay, Layout):
        return lay
    shape = _arg(args, kwargs, 1, "normalized_shape")
    count = 1 if isinstance(shape, int) else len(shape)
    if lay.dim >= t.dim() - count:
        return Opaque(f"{name_of(func)} normalizes over the batch dimension")
    return lay


def _norm_batch0(func, args, kwargs, out, batched, n):
    """group/instance/batch norm: per-row statistics need the batch in dimension 0;
    batch norm with batch statistics mixes the rows (the use handler refuses it)."""
    t, lay = _self_layout(args, batched)
    if isinstance(lay, Layout) and lay.dim != 0:
        return Opaque(f"{name_of(func)} needs the batch in dimension 0")
    return lay


def _matmul(func, args, kwargs, out, batched, n):
    from .products import matmul_layout

    return matmul_layout(name_of(func), args, kwargs, out, batched, n)


def _lookup(func, args, kwargs, out, batched, n):
    """``torch.embedding(weight, indices)``: the indices' layout."""
    lay = batched.get(id(args[1]))
    return lay if lay is not None else Opaque("a lookup in a batched table")


def _free(func, args, kwargs, out, batched, n):
    return None


def _loss(func, args, kwargs, out, batched, n):
    reduction = kwargs.get("reduction", "mean")
    if reduction != "none":
        return Opaque(f"{name_of(func)} reduced over the batch", reduced=True)
    name = name_of(func)
    if name in ("cross_entropy", "nll_loss", "multi_margin_loss", "multilabel_margin_loss"):
        t, lay = args[0], batched.get(id(args[0]))
        if isinstance(lay, Layout) and t.dim() >= 2:
            if lay.dim == 1:
                return Opaque("the class dimension is the batch")
            return lay.moved(lay.dim - 1) if lay.dim > 1 else lay
        return lay if lay is not None else batched.get(id(args[1]), Opaque(name))
    return _pointwise(func, args, kwargs, out, batched, n)
