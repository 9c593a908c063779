"""Propagators of ops that move, select or combine elements: reshapes, permutes,
expands, splits, concatenation, indexing, padding (see
:mod:`gradhooks.trace.propagators` for the calling convention)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import layout as L
from .layout import Layout, Opaque, Whole
from .names import name_of
from .propagators import Propagator, _arg, _ints, _self_layout


def _reshape(func, args, kwargs, out, batched, n):
    t, lay = _self_layout(args, batched)
    if not isinstance(lay, Layout):
        return lay
    return L.reshape(lay, t.shape, out.shape, n)


def _permute_dims(name: str, args: tuple[Any, ...], kwargs: dict[str, Any], ndim: int) -> list[int]:
    order = list(range(ndim))
    if name in ("transpose", "swapaxes", "swapdims"):
        a = _arg(args, kwargs, 1, "dim0", None)
        b = _arg(args, kwargs, 2, "dim1", None)
        if a is None:
            a, b = kwargs["axis0"], kwargs["axis1"]  # the op ran, so it had one pair
        a, b = a % ndim, b % ndim
        order[a], order[b] = order[b], order[a]
    elif name in ("t", "__get__T", "numpy_T"):
        order = order[::-1] if name != "t" or ndim == 2 else order
    elif name == "__get__mT" or name == "__get__mH":
        order[-1], order[-2] = order[-2], order[-1]
    elif name == "permute":
        dims = args[1:] if len(args) > 1 else kwargs["dims"]
        if len(dims) == 1 and isinstance(dims[0], (list, tuple, torch.Size)):
            dims = dims[0]
        order = [d % ndim for d in dims]
    else:  # movedim / moveaxis
        src = _ints(_arg(args, kwargs, 1, "source"))
        dst = _ints(_arg(args, kwargs, 2, "destination"))
        assert src is not None and dst is not None
        src = [s % ndim for s in src]
        dst = [d % ndim for d in dst]
        rest = iter([d for d in range(ndim) if d not in src])
        order = [0] * ndim
        placed = dict(zip(dst, src, strict=False))
        order = [placed[j] if j in placed else next(rest) for j in range(ndim)]
    return order


def _permute(func, args, kwargs, out, batched, n):
    t, lay = _self_layout(args, batched)
    if not isinstance(lay, Layout):
        return lay
    return L.permute(lay, _permute_dims(name_of(func), args, kwargs, t.dim()))


def _expand(func, args, kwargs, out, batched, n):
    t, lay = _self_layout(args, batched)
    if not isinstance(lay, Layout):
        return lay
    return L.insert_dims(lay, out.dim() - t.dim())


def _dim_op(name: str, default: int = 0) -> Propagator:
    """``select``/``unbind`` (the dim disappears) and ``narrow``/``split``/``chunk``
    (the dim is cut): fine away from the batch dimension."""
    pos = {"select": 1, "unbind": 1, "narrow": 1, "split": 2, "chunk": 2, "tensor_split": 2, "split_with_sizes": 2}[name]

    def prop(func, args, kwargs, out, batched, n):
        t, lay = _self_layout(args, batched)
        if not isinstance(lay, Layout):
            return lay
        dim = _arg(args, kwargs, pos, "dim", default) % t.dim()
        if dim == lay.dim:
            what = "one sample" if name in ("select", "unbind") else "part of the batch"
            return Opaque(f"{name} took {what} along the batch dimension")
        if name in ("select", "unbind") and dim < lay.dim:
            return lay.moved(lay.dim - 1)
        return lay

    return prop


def _tensor_unfold(func, args, kwargs, out, batched, n):
    """``Tensor.unfold(dim, size, step)``: windows along one dim, appended last."""
    t, lay = _self_layout(args, batched)
    if not isinstance(lay, Layout):
        return lay
    if _arg(args, kwargs, 1, "dimension") % t.dim() == lay.dim:
        return Opaque("unfold along the batch dimension")
    return lay


def _flip_roll(func, args, kwargs, out, batched, n):
    t, lay = _self_layout(args, batched)
    if not isinstance(lay, Layout):
        return lay
    name = name_of(func)
    dims = _ints(_arg(args, kwargs, 1 if name == "flip" else 2, "dims", None))
    if dims is None:
        return Opaque(f"{name} over all dimensions")
    if lay.dim in [d % t.dim() for d in dims]:
        return Opaque(f"{name} along the batch dimension")
    return lay


def _tri(func, args, kwargs, out, batched, n):
    t, lay = _self_layout(args, batched)
    if isinstance(lay, Layout) and lay.dim >= t.dim() - 2:
        return Opaque(f"{name_of(func)} over the batch dimension")
    return lay


def _pad(func, args, kwargs, out, batched, n):
    t, lay = _self_layout(args, batched)
    if not isinstance(lay, Layout):
        return lay
    pad = _arg(args, kwargs, 1, "pad", ())
    if lay.dim >= t.dim() - len(pad) // 2:
        return Opaque("padding along the batch dimension")
    return lay


def _cat(func, args, kwargs, out, batched, n):
    # torch.cat skips 1-d empty tensors (the legacy placeholder of an empty cache)
    tensors = [t for t in _arg(args, kwargs, 0, "tensors") if not (t.dim() == 1 and t.numel() == 0)]
    dim = _arg(args, kwargs, 1, "dim", 0)
    name = name_of(func)
    ndim = tensors[0].dim()
    lays = [(t, batched[id(t)]) for t in tensors if id(t) in batched]
    first = lays[0][1]
    if isinstance(first, (Opaque, Whole)):
        return first
    if name == "stack":
        dim = dim % (ndim + 1)
        moved = [lay.moved(lay.dim + (1 if dim <= lay.dim else 0)) for _, lay in lays if isinstance(lay, Layout)]
    else:
        dim = dim % max(ndim, 1)
        moved = [lay for _, lay in lays if isinstance(lay, Layout)]
    if len(moved) != len(lays):
        return Opaque(f"{name} of tensors with unknown batch layouts")
    if any(m.dim != moved[0].dim or not m.same_structure(moved[0]) for m in moved):
        return Opaque(f"{name} of tensors whose batch dimensions differ")
    if name != "stack" and moved[0].dim == dim:
        if len(lays) != len(tensors) or not moved[0].plain:
            return Opaque(f"{name} along the batch dimension with batch-independent parts")
        rows = torch.arange(n, device=out.device).repeat(len(tensors))
        return Layout(dim, rows=rows)
    return moved[0]


def _getitem(func, args, kwargs, out, batched, n):
    """Basic indexing (ints, slices, None, Ellipsis) and one advanced index tensor."""
    from .indexing import getitem_layout

    return getitem_layout(args[0], args[1], out, batched, n)


def _index_select(func, args, kwargs, out, batched, n):
    t = args[0]
    dim = _arg(args, kwargs, 1, "dim") % max(t.dim(), 1)
    idx = _arg(args, kwargs, 2, "index")
    lay_t, lay_i = batched.get(id(t)), batched.get(id(idx))
    if isinstance(lay_t, (Opaque, Whole)):
        return lay_t
    if lay_t is not None and (lay_i is None or dim == lay_t.dim):
        # Along the batch dimension only the index's values matter (they name the
        # rows taken), even when they were computed from the batch (a sort of lengths).
        if dim != lay_t.dim:
            return lay_t
        if idx.dim() != 1 or not (lay_t.plain or lay_t.rows is not None):
            return Opaque("index_select along a merged batch dimension")
        idx = idx.to(torch.long)
        # row r is the sample of input row idx[r]
        return L.with_rows(dim, idx if lay_t.rows is None else lay_t.rows[idx], n)
    if lay_t is None and isinstance(lay_i, Layout) and lay_i.plain and idx.dim() == 1:
        return Layout(dim)
    return lay_i if isinstance(lay_i, (Opaque, Whole)) else Opaque("index_select with a batched index")


def _gather(func, args, kwargs, out, batched, n):
    t, idx = args[0], _arg(args, kwargs, 2, "index")
    dim = _arg(args, kwargs, 1, "dim") % max(t.dim(), 1)
    lays = [batched[id(a)] for a in (t, idx) if isinstance(a, Tensor) and id(a) in batched]
    if any(isinstance(x, (Opaque, Whole)) for x in lays):
        return next(x for x in lays if isinstance(x, (Opaque, Whole)))
    bdims = {x.dim for x in lays}
    if len(bdims) != 1 or dim in bdims or not all(x.plain for x in lays):
        return Opaque("gather across the batch dimension")
    b = bdims.pop()
    if t.shape[b] != idx.shape[b]:
        return Opaque("gather with a broadcast batch")
    return Layout(b)
