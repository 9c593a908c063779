"""The batch through products: ``linear``, ``matmul`` and friends, ``einsum``,
``scaled_dot_product_attention``.

A batch dimension that a product contracts over mixes the samples (its output
is :class:`~gradhooks.layout.Opaque`); one that indexes rows, columns or
broadcast batch dimensions moves to the matching output dimension.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .layout import AnyLayout, Layout, Opaque, Whole

__all__ = ["matmul_layout"]


def _lay(batched: dict[int, AnyLayout], t: Any) -> AnyLayout | None:
    return batched.get(id(t)) if isinstance(t, Tensor) else None


def _combine(found: list[Layout], what: str) -> AnyLayout | None:
    if not found:
        return None
    first = found[0]
    for lay in found[1:]:
        if lay.dim != first.dim or not lay.same_structure(first):
            return Opaque(f"{what} combined operands whose batch dimensions differ")
    return first


def _mat_operand(lay: AnyLayout | None, ndim: int, out_ndim: int, left: bool, what: str) -> AnyLayout | None:
    """Where operand ``a`` (left) or ``b`` of ``a @ b`` puts its batch in the output."""
    if lay is None or isinstance(lay, (Opaque, Whole)):
        return lay
    if ndim == 1:
        return Opaque(f"{what} contracted over the batch dimension")
    d = lay.dim
    contracted, kept = (ndim - 1, ndim - 2) if left else (ndim - 2, ndim - 1)
    if d == contracted:
        return Opaque(f"{what} contracted over the batch dimension")
    if d == kept:
        return lay.moved(out_ndim - 2 if left else out_ndim - 1)
    return lay.moved(d + out_ndim - ndim)


def _matmul(a: Tensor, b: Tensor, out: Tensor, batched: dict[int, AnyLayout], what: str) -> AnyLayout | None:
    out_ndim = out.dim()
    la = _mat_operand(_lay(batched, a), a.dim(), out_ndim + (1 if b.dim() == 1 else 0), True, what)
    lb = _mat_operand(_lay(batched, b), b.dim(), out_ndim + (1 if a.dim() == 1 else 0), False, what)
    if b.dim() == 1 and isinstance(la, Layout) and la.dim == out_ndim:
        return Opaque(f"{what}: unexpected layout")
    if a.dim() == 1 and isinstance(lb, Layout):
        lb = lb.moved(lb.dim - 1) if lb.dim > out_ndim - 1 else lb
    for lay in (la, lb):
        if isinstance(lay, (Opaque, Whole)):
            return lay
    return _combine([x for x in (la, lb) if isinstance(x, Layout)], what)


def _einsum(args: tuple[Any, ...], batched: dict[int, AnyLayout]) -> AnyLayout | None:
    eq = args[0].replace(" ", "")
    ops = list(args[1:])
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = list(ops[0])
    if "->" not in eq or "." in eq:
        return Opaque("einsum with an implicit output or '...'")
    ins, out = eq.split("->")
    letters: list[tuple[str, Layout]] = []
    for sub, op in zip(ins.split(","), ops, strict=False):
        lay = _lay(batched, op)
        if lay is None:
            continue
        if isinstance(lay, (Opaque, Whole)):
            return lay
        letters.append((sub[lay.dim], lay))
    if not letters:
        return None
    if len({c for c, _ in letters}) != 1:
        return Opaque("einsum combined operands whose batch dimensions differ")
    c, lay = letters[0]
    if c not in out:
        return Opaque("einsum summed over the batch dimension")
    return _combine([x.moved(out.index(c)) for _, x in letters], "einsum")


def _leading(ops: list[Any], out: Tensor, batched: dict[int, AnyLayout], what: str) -> AnyLayout | None:
    """Operands whose batch must sit in their leading (broadcast) dimensions."""
    found = []
    for t in ops:
        lay = _lay(batched, t)
        if lay is None:
            continue
        if isinstance(lay, (Opaque, Whole)):
            return lay
        if lay.dim >= t.dim() - 2:
            return Opaque(f"{what} with the batch in a matrix dimension")
        found.append(lay.moved(lay.dim + out.dim() - t.dim()))
    return _combine(found, what)


def matmul_layout(name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any, batched: dict[int, AnyLayout], n: int) -> Any:
    if name == "linear" or name == "bilinear":
        xs = [args[0]] + ([args[1]] if name == "bilinear" else [])
        ws = [a for a in args[len(xs):] if isinstance(a, Tensor)] + [v for v in kwargs.values() if isinstance(v, Tensor)]
        if any(_lay(batched, w) is not None for w in ws):
            return Opaque(f"{name} with a weight that depends on the batch")
        found = []
        for x in xs:
            lay = _lay(batched, x)
            if lay is None:
                continue
            if isinstance(lay, (Opaque, Whole)):
                return lay
            if lay.dim == x.dim() - 1:
                return Opaque(f"{name} over the batch dimension (features)")
            found.append(lay.moved(lay.dim + out.dim() - x.dim()))
        return _combine(found, name)
    if name in ("matmul", "rmatmul", "mm", "bmm"):
        a, b = (args[1], args[0]) if name == "rmatmul" else (args[0], args[1])
        return _matmul(a, b, out, batched, name)
    if name in ("addmm", "baddbmm"):
        c, a, b = args[0], args[1], args[2]
        prod = _matmul(a, b, out, batched, name)
        lc = _lay(batched, c)
        if lc is None:
            return prod
        if isinstance(lc, (Opaque, Whole)):
            return lc
        moved = lc.moved(lc.dim + out.dim() - c.dim())
        if prod is None:
            return moved
        return _combine([x for x in (prod, moved) if isinstance(x, Layout)], name) if isinstance(prod, Layout) else prod
    if name == "mv":
        la = _lay(batched, args[0])
        if _lay(batched, args[1]) is not None or (isinstance(la, Layout) and la.dim == 1):
            return Opaque("mv contracted over the batch dimension")
        return la
    if name == "einsum":
        return _einsum(args, batched)
    if name == "scaled_dot_product_attention":
        ops = [args[i] if len(args) > i else kwargs.get(k) for i, k in enumerate(("query", "key", "value", "attn_mask"))]
        return _leading([t for t in ops if isinstance(t, Tensor)], out, batched, name)
    if name in ("outer", "ger"):
        la, lb = _lay(batched, args[0]), _lay(batched, args[1])
        found = [x for x in (la, lb.moved(1) if isinstance(lb, Layout) else lb) if x is not None]
        if any(isinstance(x, (Opaque, Whole)) for x in found):
            return next(x for x in found if isinstance(x, (Opaque, Whole)))
        return _combine([x for x in found if isinstance(x, Layout)], name)  # all of them, after the check above
    return Opaque(f"{name} contracted over the batch dimension")
