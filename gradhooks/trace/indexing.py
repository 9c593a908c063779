"""The batch through ``t[index]`` and ``t[index] = value``.

Indexing follows NumPy's rules: ints, slices, ``None`` and ``Ellipsis`` are basic
items; tensors and lists are advanced indices, whose broadcast dimensions go
where the first of them stands if they are adjacent, else in front. The batch
survives a full slice, moves with the dimensions around it, and is lost to an
int (one sample) or a partial slice. Two advanced patterns keep it:
``x[arange(N), idx]`` (one row per sample, e.g. the last token of each
sequence) and a boolean mask over the batch dimension (the selected elements
remember their sample). A batch-independent table indexed by a batched index
(``table[ids]``) is batched where the index is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import layout as L
from .layout import AnyLayout, Layout, Opaque, Whole

__all__ = ["getitem_layout", "setitem_layout"]


def _is_advanced(item: Any) -> bool:
    if isinstance(item, Tensor):
        return item.dim() > 0 or item.dtype == torch.bool
    return isinstance(item, (list, tuple))


def _consumes(item: Any) -> int:
    if item is None or item is Ellipsis:
        return 0
    if isinstance(item, Tensor) and item.dtype == torch.bool:
        return max(item.dim(), 1) if item.dim() else 0
    if isinstance(item, bool):
        return 0
    return 1


@dataclass
class _Walk:
    """How ``t[items]`` maps input dims: ``kept[i]`` the output dim of input dim ``i``
    (basic items), ``adv`` the advanced items as ``(input dim, item)``, ``block`` the
    output position of the advanced dimensions, ``items`` per input dim."""

    kept: dict[int, int]
    item_at: dict[int, Any]
    adv: list[tuple[int, Any]]
    block: int
    block_ndim: int
    out_ndim: int


def _walk(ndim: int, index: Any) -> _Walk:
    items = list(index) if isinstance(index, tuple) else [index]
    used = sum(_consumes(it) for it in items)
    if Ellipsis in [it for it in items if not isinstance(it, Tensor)]:
        pos = next(k for k, it in enumerate(items) if not isinstance(it, Tensor) and it is Ellipsis)
        items[pos : pos + 1] = [slice(None)] * (ndim - used)
    else:
        items += [slice(None)] * (ndim - used)
    kept: dict[int, int] = {}
    item_at: dict[int, Any] = {}
    adv: list[tuple[int, Any]] = []
    adv_slots: list[int] = []  # item positions of advanced items
    out = 0
    dim = 0
    first_block = None
    for k, it in enumerate(items):
        if it is None or isinstance(it, bool):
            out += 1
            continue
        if _is_advanced(it):
            if first_block is None:
                first_block = out
            adv.append((dim, it))
            adv_slots.append(k)
            item_at[dim] = it
            dim += _consumes(it)
            continue
        item_at[dim] = it
        if isinstance(it, slice):
            kept[dim] = out
            out += 1
        dim += 1
    shapes = []
    for _, it in adv:
        if isinstance(it, Tensor):
            shapes.append((int(it.sum()),) if it.dtype == torch.bool else tuple(it.shape))
        else:
            shapes.append(tuple(torch.as_tensor(it).shape))
    block_ndim = len(torch.broadcast_shapes(*shapes)) if shapes else 0
    adjacent = not adv_slots or adv_slots == list(range(adv_slots[0], adv_slots[-1] + 1))
    block = (first_block or 0) if adjacent else 0
    if adv:
        kept = {i: (o + block_ndim if o >= block else o) for i, o in kept.items()}
    return _Walk(kept, item_at, adv, block, block_ndim, out + block_ndim)


def _full(item: slice, size: int) -> bool:
    return item.indices(size) == (0, size, 1)


def getitem_layout(t: Tensor, index: Any, out: Tensor, batched: dict[int, AnyLayout], n: int) -> AnyLayout | None:
    """Layout of ``t[index]`` (``None``: batch-independent)."""
    src = batched.get(id(t))
    walk = _walk(t.dim(), index)
    index_lays = [(it, batched[id(it)]) for _, it in walk.adv if isinstance(it, Tensor) and id(it) in batched]
    for _, lay in index_lays:
        if isinstance(lay, (Opaque, Whole)):
            return lay
    if isinstance(src, (Opaque, Whole)):
        return src
    if src is None:
        return _table_lookup(walk, index_lays)
    d = src.dim
    item = walk.item_at.get(d, slice(None))
    if isinstance(item, slice):
        if not _full(item, t.shape[d]):
            return Opaque("a slice of the batch")
        if index_lays:
            return Opaque("an index that depends on the batch, applied to a batched tensor")
        return src.moved(walk.kept[d])
    if not _is_advanced(item):
        return Opaque("indexing selected one sample")
    if isinstance(item, Tensor) and item.dtype == torch.bool and src.plain:
        return _mask_rows(item, d, walk)
    if isinstance(item, Tensor) and src.plain and walk.block_ndim == 1 and item.dim() == 1 and item.numel() == n:
        if id(item) not in batched and torch.equal(item, torch.arange(n, device=item.device)):
            if all(isinstance(lay, Layout) and lay.dim == 0 and lay.plain for _, lay in index_lays):
                return Layout(walk.block)  # x[arange(N), idx]: one entry per sample
    return Opaque("an advanced index along the batch dimension")


def _table_lookup(walk: _Walk, index_lays: list[tuple[Tensor, AnyLayout]]) -> AnyLayout | None:
    """A batch-independent tensor indexed by batched index tensors."""
    if not index_lays:
        return None
    if any(isinstance(it, Tensor) and it.dtype == torch.bool for _, it in walk.adv):
        return Opaque("a boolean mask that depends on the batch")
    parts = [(it.dim(), lay) for it, lay in index_lays]
    lay = L.broadcast(walk.block_ndim, parts, ())
    if not isinstance(lay, Layout):
        return lay
    return lay.moved(walk.block + lay.dim)


def _mask_rows(mask: Tensor, d: int, walk: _Walk) -> AnyLayout:
    """``x[mask]`` with a boolean mask over dims starting at ``d0 <= d``: each selected
    element remembers its sample (``mask.nonzero()`` column of the batch dim)."""
    d0 = next(i for i, it in walk.adv if it is mask)
    coords = mask.nonzero()
    rows = coords[:, d - d0].to(torch.long)
    return Layout(walk.block, rows=rows)


def setitem_layout(t: Tensor, index: Any, value: Any, batched: dict[int, AnyLayout], n: int) -> AnyLayout | None:
    """Layout of ``t`` after ``t[index] = value`` (``None``: unchanged)."""
    src = batched.get(id(t))
    val = batched.get(id(value)) if isinstance(value, Tensor) else None
    walk = _walk(t.dim(), index)
    if any(isinstance(it, Tensor) and id(it) in batched for _, it in walk.adv):
        return Opaque("writing at indices that depend on the batch")
    if val is None:
        return None
    if isinstance(val, (Opaque, Whole)):
        return val
    if walk.adv:
        return Opaque("writing a batched value through an advanced index")
    j = val.dim + walk.out_ndim - value.dim()
    target = next((i for i, o in walk.kept.items() if o == j), None)
    if target is None:
        return Opaque("writing a batched value across the batch dimension")
    item = walk.item_at.get(target, slice(None))
    if not (isinstance(item, slice) and _full(item, t.shape[target])):
        return Opaque("writing a batched value into part of a dimension")
    new = val.moved(target)
    if src is None:
        return new
    if isinstance(src, Layout) and src.dim == target and src.same_structure(new):
        return None
    return Opaque("writing a batched value whose batch dimension differs from the target's")
