"""Parameters that meet the batch by broadcasting: elementwise ops (RMSNorm's
``weight * x``, Gemma's ``(1 + weight) * x``, a layer scale, ``x + pos_embed``,
``x + wpe(arange(T))``), concatenation with an expanded cls token, an
attention mask or a product whose batch-independent operand broadcasts over
the batch.

Each such operand ``c`` is replaced, for this op only, by ``c`` expanded along
the batch dimension of the op's output (same values; in the one-backward mode
a detached copy): backward then delivers the gradient of every sample's copy
separately, ``(N, *c.shape)`` after summing the other broadcast dimensions,
which is exactly each sample's gradient with respect to ``c``. An operand
that already has the batch's size along that dimension (``cls.expand(N, 1, D)``)
is replaced by the tensor it was expanded from. The per-sample gradients are
kept (:mod:`gradhooks.rules.dense`) and mapped to the parameters ``c`` was
computed from by its chain.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..capture import Attach
from ..trace import layout as L
from ..trace.derive import IDENTITY_NAMES, Chain, Derived, Origin, Source
from ..trace.layout import AnyLayout, Layout, Opaque, Whole
from ..trace.tracer import Tracer, register_handler
from .common import arg, dense_site

_EXPANDS = frozenset({"expand", "expand_as", "broadcast_to"})


def _peel(tr: Tracer, c: Tensor, ac: int) -> tuple[Tensor, Origin] | None:
    """The tensor ``c`` was expanded from along dim ``ac`` (through copies/casts)."""
    node = tr.origin_of(c)
    while isinstance(node, Derived) and len(node.parents) == 1:
        parent_t = node.leaves[node.slots[0]]
        if node.name in _EXPANDS:
            pad = c.dim() - parent_t.dim()
            if ac - pad < 0 or parent_t.shape[ac - pad] == 1:
                return parent_t, node.parents[0]
            return None
        if node.name not in IDENTITY_NAMES and node.name not in ("contiguous", "clone"):
            return None
        node = node.parents[0]
    return None


def _per_sample(grad: Tensor, e: int, lay: Layout | Whole, n: int, aligned: tuple[int, ...], src_shape: torch.Size) -> Tensor:
    """The gradient of the expanded operand -> ``(N, *src.shape)``: batch first, a
    sample's several rows (merged layouts) and the other broadcast dims summed."""
    if isinstance(lay, Whole):
        return grad.sum_to_size(aligned).reshape(1, *src_shape)
    u = L.batch_first(grad, lay, n)
    if lay.rows is not None:
        u = u.sum(1)
    elif not lay.plain:
        u = u.sum((1 + e, 2 + e))  # batch_first put (outer, inner) there
    target = (n, *aligned[:e], *aligned[e + 1 :])
    return u.sum_to_size(target).reshape(n, *src_shape)


def _substitute(tr: Tracer, c: Tensor, origin: Origin, ndim: int, out_lay: AnyLayout, sizes: list[int], peel: bool) -> Tensor | None:
    """The stand-in for operand ``c`` (batch-independent, from parameters) in an op
    whose output has ``ndim`` dims, batch layout ``out_lay`` and shape ``sizes``."""
    rec, n = tr.rec, tr.n or 0
    if isinstance(out_lay, Whole):
        src, src_origin, e, lay, target = c, origin, 0, out_lay, list(c.shape)
        aligned = tuple(c.shape)
    else:
        assert isinstance(out_lay, Layout)
        e = out_lay.dim - (ndim - c.dim()) if peel else out_lay.dim
        extent = sizes[out_lay.dim]
        if peel:
            if e < 0 or c.shape[e] != extent:
                return None
            got = _peel(tr, c, e)
            if got is None:
                return _rowwise(tr, c, origin, e, out_lay.moved(e))
            src, src_origin = got
            target = list(c.shape)
            aligned = (1,) * (c.dim() - src.dim()) + tuple(src.shape)
        else:
            src, src_origin = c, origin
            aligned = (1,) * (ndim - c.dim()) + tuple(c.shape)
            if aligned[e] != 1:
                got = _peel(tr, c, e - (ndim - c.dim()))
                if got is None:
                    return _rowwise(tr, c, origin, e - (ndim - c.dim()), out_lay.moved(e - (ndim - c.dim())))
                src, src_origin = got
                aligned = (1,) * (ndim - src.dim()) + tuple(src.shape)
            target = list(aligned)
            target[e] = extent
        lay = out_lay.moved(e)
    view = src.reshape(aligned)
    if rec.one_backward:
        stand_in = Attach.apply(view.detach().expand(target), rec.anchor)
    else:
        stand_in = view.expand(target)
    if stand_in.dtype != c.dtype:
        stand_in = stand_in.to(c.dtype)
    site, call = dense_site(tr, ("dense", id(src_origin)), {"value": (src, src_origin)})
    shape = src.shape

    def on_grad(grad: Tensor) -> None:
        call.add_grad(0, _per_sample(grad, e, lay, n, aligned, shape))

    rec.hook_tensor(stand_in, on_grad)
    return stand_in


def _rowwise(tr: Tracer, c: Tensor, origin: Origin, e: int, lay: Layout) -> Tensor:
    """``c`` already has the batch's size along its dim ``e`` (e.g. a lookup at
    ``arange(T).repeat(N, 1)``): index ``j`` of that dim meets sample ``sample[j]``,
    so sample n's gradient of ``c`` is the gradient with only its rows kept.
    Kept as ``(N, *p.shape)`` when ``c`` is a lookup or view of one parameter
    ``p`` no larger than ``c`` (a position table), else ``(N, *c.shape)``."""
    rec, n = tr.rec, tr.n or 0
    stand_in = Attach.apply(c.detach(), rec.anchor) if rec.one_backward else c.view_as(c)
    extent = c.shape[e]
    j = torch.arange(extent, device=c.device)
    sample = lay.rows if lay.rows is not None else (j // lay.inner) % n
    keep = sample >= 0  # explicit rows may belong to no sample
    chain = Chain(origin)
    index = None if chain.identity or chain.sources[0].param.numel() > c.numel() else chain.flat_index()
    if index is not None:
        on_grad = _scatter_rows(tr, chain.sources[0], index, e, sample, keep)
    else:
        site, call = dense_site(tr, ("dense", id(origin)), {"value": (c, origin)})

        def keep_rows(grad: Tensor) -> None:
            g = grad.movedim(e, 0)
            u = g.new_zeros((n, *g.shape))
            u[sample[keep], j[keep]] = g[keep]
            call.add_grad(0, u.movedim(1, 1 + e))

        on_grad = keep_rows
    rec.hook_tensor(stand_in, on_grad)
    return stand_in


def _scatter_rows(tr: Tracer, src: Source, index: Tensor, e: int, sample: Tensor, keep: Tensor) -> Callable[[Tensor], None]:
    """Gradient hook adding row ``j`` of ``c``'s gradient into sample ``sample[j]``'s
    gradient of ``src``, at the elements ``index`` (``c``-shaped) names."""
    p, n = src.param, tr.n or 0
    _, call = dense_site(tr, ("dense", id(src)), {"value": (p, src)})
    size = p.numel()
    rows = index.movedim(e, 0)[keep]
    target = (sample[keep].view(-1, *[1] * (rows.dim() - 1)) * size + rows).reshape(-1)

    def on_grad(grad: Tensor) -> None:
        g = grad.movedim(e, 0)[keep].reshape(-1)
        u = g.new_zeros(n * size)
        u.index_add_(0, target, g)
        call.add_grad(0, u.view(n, *p.shape))

    return on_grad


def _fail(tr: Tracer, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], batched: dict[int, AnyLayout], origins: dict[int, Origin], why: str) -> Any:
    tr.rec.problem(tr, "layout", getattr(func, "__name__", str(func)), origins, why)
    return tr.rec.plain(tr, func, args, kwargs, batched, origins)


_NOT_EXPANDED = "a batch-independent tensor computed from parameters does not broadcast along the batch dimension"


def _replace(a: Any, repl: dict[int, Tensor]) -> Any:
    if isinstance(a, Tensor):
        return repl.get(id(a), a)
    if isinstance(a, (list, tuple)) and a and isinstance(a[0], Tensor):
        return type(a)(repl.get(id(t), t) for t in a) if isinstance(a, list) else tuple(repl.get(id(t), t) for t in a)
    return a


def _run(tr: Tracer, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], batched: dict[int, AnyLayout],
         repl: dict[int, Tensor]) -> Any:
    new_args = tuple(_replace(a, repl) for a in args)
    new_kwargs = {k: _replace(v, repl) for k, v in kwargs.items()}
    out = func(*new_args, **new_kwargs)
    tr.follow(func, new_args, new_kwargs, out, batched)
    return out


def _tensors(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Tensor]:
    found = []
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, Tensor):
            found.append(a)
        elif isinstance(a, (list, tuple)):
            found.extend(t for t in a if isinstance(t, Tensor))
    return found


def _broadcast(tr: Tracer, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], batched: dict[int, AnyLayout],
               origins: dict[int, Origin], operands: list[Tensor], ndim: int, sizes: list[int], peel: bool, leading: bool = False) -> Any:
    parts = [(t.dim(), batched[id(t)]) for t in _tensors(args, kwargs) if id(t) in batched]
    out_lay = L.broadcast(ndim, parts, sizes) if (tr.n or 0) > 1 else L.WHOLE
    if isinstance(out_lay, Opaque):
        return _fail(tr, func, args, kwargs, batched, origins, out_lay.why)
    if leading and isinstance(out_lay, Layout) and out_lay.dim >= ndim - 2:
        return _fail(tr, func, args, kwargs, batched, origins, "the batch is in a matrix dimension of the product")
    repl: dict[int, Tensor] = {}
    for c in operands:
        stand_in = _substitute(tr, c, origins[id(c)], ndim, out_lay, sizes, peel)
        if stand_in is None:
            return _fail(tr, func, args, kwargs, batched, origins, _NOT_EXPANDED)
        repl[id(c)] = stand_in
    return _run(tr, func, args, kwargs, batched, repl)


@register_handler(names=("<pointwise>", "where", "masked_fill", "lerp", "addcmul", "addcdiv", "clamp", "clip"))
def pointwise(tr: Tracer, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], batched: dict[int, AnyLayout], origins: dict[int, Origin]) -> Any:
    tensors = _tensors(args, kwargs)
    sizes = list(torch.broadcast_shapes(*[t.shape for t in tensors]))
    operands = [t for t in tensors if id(t) in origins]
    return _broadcast(tr, func, args, kwargs, batched, origins, operands, len(sizes), sizes, peel=False)


@register_handler(names=("<broadcast-matmul>",))
def broadcast_matmul(tr: Tracer, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], batched: dict[int, AnyLayout], origins: dict[int, Origin]) -> Any:
    """``x @ c`` with ``c`` of three or more dims broadcasting over the batch."""
    tensors = [t for t in _tensors(args, kwargs)][:2]
    if any(t.dim() < 3 for t in tensors if id(t) in origins):
        return _fail(tr, func, args, kwargs, batched, origins, "a product with a parameter vector")
    lead = list(torch.broadcast_shapes(*[t.shape[:-2] for t in tensors]))
    ndim = len(lead) + 2
    sizes = lead + [0, 0]
    operands = [t for t in tensors if id(t) in origins]
    return _broadcast(tr, func, args, kwargs, batched, origins, operands, ndim, sizes, peel=False, leading=True)


@register_handler(F.scaled_dot_product_attention)
def attention_mask(tr: Tracer, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], batched: dict[int, AnyLayout], origins: dict[int, Origin]) -> Any:
    """A learned attention bias passed as ``attn_mask``."""
    q, k, v = args[0], arg(args, kwargs, 1, "key"), arg(args, kwargs, 2, "value")
    mask = arg(args, kwargs, 3, "attn_mask")
    if any(id(t) in origins for t in (q, k, v)) or not isinstance(mask, Tensor) or id(mask) not in origins:
        tr.rec.unsupported(tr, "scaled_dot_product_attention", origins, "a parameter used as query, key or value")
        return tr.rec.plain(tr, func, args, kwargs, batched, origins)
    scores = list(q.shape[:-1]) + [k.shape[-2]]
    return _broadcast(tr, func, args, kwargs, batched, origins, [mask], len(scores), scores, peel=False, leading=True)


@register_handler(torch.cat, torch.concat, torch.concatenate, torch.stack)
def concatenate(tr: Tracer, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], batched: dict[int, AnyLayout], origins: dict[int, Origin]) -> Any:
    """``cat([cls.expand(N, 1, D), x], 1)``: the expanded operand becomes ``cls``
    expanded by us."""
    tensors = [t for t in arg(args, kwargs, 0, "tensors") if not (t.dim() == 1 and t.numel() == 0)]
    dim = arg(args, kwargs, 1, "dim", 0)
    stack = func is torch.stack
    ndim = tensors[0].dim() + (1 if stack else 0)
    dim = dim % ndim
    parts = [(t.dim(), batched[id(t)]) for t in tensors if id(t) in batched]
    lay = parts[0][1]
    if isinstance(lay, Opaque):
        return _fail(tr, func, args, kwargs, batched, origins, lay.why)
    if isinstance(lay, Layout):
        e = lay.dim + (1 if stack and dim <= lay.dim else 0)
        if e == dim:
            return _fail(tr, func, args, kwargs, batched, origins, "concatenating parameters along the batch dimension")
    repl: dict[int, Tensor] = {}
    n = tr.n or 0
    for c in tensors:
        if id(c) not in origins:
            continue
        if isinstance(lay, Whole) or n <= 1:
            stand_in = _substitute(tr, c, origins[id(c)], c.dim(), L.WHOLE, list(c.shape), peel=False)
        else:
            assert isinstance(lay, Layout)
            e_c = lay.dim  # in c's own dims: cat keeps them; stack inserts ``dim``
            stand_in = _substitute(tr, c, origins[id(c)], c.dim(), lay.moved(e_c), list(c.shape), peel=True)
        if stand_in is None:
            return _fail(tr, func, args, kwargs, batched, origins, _NOT_EXPANDED)
        repl[id(c)] = stand_in
    return _run(tr, func, args, kwargs, batched, repl)


@register_handler(F.prelu)
def prelu(tr: Tracer, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], batched: dict[int, AnyLayout], origins: dict[int, Origin]) -> Any:
    """``prelu(x, w)`` as ``where(x > 0, x, w * x)`` with ``w`` along the channel dim 1
    (the same values and gradients, also at 0)."""
    x, w = args[0], arg(args, kwargs, 1, "weight")
    if id(w) not in origins or id(x) not in batched:
        tr.rec.unsupported(tr, "prelu", origins, "prelu with a batched weight")
        return tr.rec.plain(tr, func, args, kwargs, batched, origins)
    shape = [1] * x.dim()
    if w.numel() > 1:
        shape[1] = w.numel()
    w_view = w.reshape(shape)  # the mode is off inside a handler: record it by hand
    tr.derive(Tensor.reshape, (w, shape), {}, w_view, {id(w): origins[id(w)]})
    origin = tr.origin_of(w_view)
    assert origin is not None
    prod = pointwise(tr, torch.mul, (w_view, x), {}, {id(x): batched[id(x)]}, {id(w_view): origin})
    out = torch.where(x > 0, x, prod)
    tr.set_layout(out, tr.layout_of(prod))
    return out
