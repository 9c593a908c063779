"""Linear uses of a weight: ``F.linear(x, W, b)``, and products with a
batch-independent matrix that are one in disguise.

* ``F.linear(x, W, b)``: ``x`` ``(..., in)`` with the batch anywhere but the last
  dimension (a transposed sequence ``(T, N, in)`` included).
* ``addmm(b, x, W)`` / ``mm(x, W)`` / ``x @ W``: the same with the weight stored
  ``(in, out)`` (GPT-2's ``Conv1D``): the rule works on ``W^T``, a view the
  chain maps back.
* ``W @ x`` with ``x`` ``(..., in, cols)`` batched outside ``in``: linear on
  ``x^T`` (the rule sees the last two dimensions swapped).

The rule is :class:`~gradhooks.rules.linear.LinearRule`; products of a batched
tensor with a batch-independent tensor of more dimensions are elementwise
broadcasts in disguise and go to :mod:`gradhooks.uses.elementwise`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..rules.linear import LinearRule
from ..trace.derive import Derived, Origin
from ..trace.layout import AnyLayout, Layout, Whole
from ..trace.tracer import NAME_HANDLERS, Tracer, register_handler
from .common import Geometry, arg, new_site, record

LINEAR = LinearRule()


def _transposed(origin: Origin, w: Tensor) -> Derived:
    """``W.t()`` as a derived tensor of ``W``'s origin (the rule's weight)."""
    return Derived(torch.t, (w,), {}, {0: origin}, None)


def _linear_use(
    tr: Tracer,
    func: Any,
    call_args: tuple[Any, ...],
    call_kwargs: dict[str, Any],
    x: Tensor,
    lx: AnyLayout,
    weight: tuple[Tensor, Origin] | None,
    bias: tuple[Tensor, Origin] | None,
    replace: dict[int, str],
    canon: str,
) -> Any:
    """Capture one linear use and run the op. ``replace``: positions in ``call_args``
    of the weight/bias operands (by local name) to pass through ``rec.operand``."""
    rec = tr.rec
    operands = {}
    if weight is not None:
        operands["weight"] = weight
    if bias is not None:
        operands["bias"] = bias
    key = ("linear", canon, *(id(o) for _, o in operands.values()))
    site = new_site(tr, key, LINEAR, lambda: Geometry(weight=weight[0] if weight else None, bias=bias[0] if bias else None), operands)
    args = list(call_args)
    for pos, local in replace.items():
        args[pos] = rec.operand(args[pos], tr.origin_of(args[pos]), site, local)
    call = record(site, x, lx, lx, canon)
    out = func(*args, **call_kwargs)
    if canon == "first" and out.dim() == x.dim():
        lay = lx  # (..., in) -> (..., out): the batch stays where it is
        tr.set_layout(out, lay)
    else:
        tr.follow(func, tuple(args), call_kwargs, out, {id(x): lx})
        lay = tr.layout_of(out)
    call.memo["out_layout"] = lay
    watched = rec.watch(out, call, 0, [x])
    if watched is not out:
        tr.set_layout(watched, lay)
    return watched


def _feature_problem(tr: Tracer, name: str, origins: dict[int, Origin]) -> None:
    tr.rec.problem(tr, "layout", name, origins, "the batch is in the dimension the product sums over (features)")


@register_handler(F.linear)
def linear(tr: Tracer, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], batched: dict[int, AnyLayout], origins: dict[int, Origin]) -> Any:
    x, w, b = args[0], arg(args, kwargs, 1, "weight"), arg(args, kwargs, 2, "bias")
    lx = batched.get(id(x))
    if lx is None or any(isinstance(t, Tensor) and id(t) in batched for t in (w, b)):
        return _unsupported(tr, func, args, kwargs, batched, origins, "linear with a weight that depends on the batch")
    if isinstance(lx, Layout) and lx.dim == x.dim() - 1:
        _feature_problem(tr, "linear", origins)
        return tr.rec.plain(tr, func, args, kwargs, batched, origins)
    wo = origins.get(id(w)) if isinstance(w, Tensor) else None
    bo = origins.get(id(b)) if isinstance(b, Tensor) else None
    replace = {i: local for i, local, o in ((1, "weight", wo), (2, "bias", bo)) if o is not None}
    return _linear_use(tr, func, (x, w, b), {}, x, lx, (w, wo) if wo else None, (b, bo) if bo else None, replace, "first")


def _matrix_right(tr: Tracer, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], x: Tensor, w: Tensor, wo: Origin,
                  bias: tuple[Tensor, Origin] | None, replace: dict[int, str], origins: dict[int, Origin]) -> Any:
    """``x @ W`` with ``W`` ``(in, out)``: the rule's weight is ``W^T``."""
    lx = tr.layout_of(x)
    assert lx is not None  # the caller found x batched
    if isinstance(lx, Layout) and lx.dim == x.dim() - 1:
        _feature_problem(tr, getattr(func, "__name__", "matmul"), origins)
        return tr.rec.plain(tr, func, args, kwargs, {id(x): lx}, origins)
    wt = w.t()
    return _linear_use(tr, func, args, kwargs, x, lx, (wt, _transposed(wo, w)), bias, replace, "first")


def _matrix_left(tr: Tracer, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], w: Tensor, wo: Origin, x: Tensor,
                 replace: dict[int, str], origins: dict[int, Origin]) -> Any:
    """``W @ x`` with ``x`` ``(..., in, cols)``: linear on ``x^T``."""
    lx = tr.layout_of(x)
    assert lx is not None  # the caller found x batched
    if x.dim() < 2 or (isinstance(lx, Layout) and lx.dim == x.dim() - 2):
        _feature_problem(tr, getattr(func, "__name__", "matmul"), origins)
        return tr.rec.plain(tr, func, args, kwargs, {id(x): lx}, origins)
    return _linear_use(tr, func, args, kwargs, x, lx, (w, wo), None, replace, "first_t")


def _unsupported(tr: Tracer, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], batched: dict[int, AnyLayout],
                 origins: dict[int, Origin], why: str) -> Any:
    tr.rec.unsupported(tr, getattr(func, "__name__", str(func)), origins, why)
    return tr.rec.plain(tr, func, args, kwargs, batched, origins)


def _product(tr: Tracer, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], batched: dict[int, AnyLayout],
             origins: dict[int, Origin], a: Tensor, b: Tensor, pos: tuple[int, int], bias: tuple[Tensor, Origin, int] | None) -> Any:
    ao, bo = origins.get(id(a)), origins.get(id(b))
    a_b, b_b = id(a) in batched, id(b) in batched
    replace = {}
    bias_pair = None
    if bias is not None:
        replace[bias[2]] = "bias"
        bias_pair = (bias[0], bias[1])
    if a_b and bo is not None and b.dim() == 2 and ao is None:
        replace[pos[1]] = "weight"
        return _matrix_right(tr, func, args, kwargs, a, b, bo, bias_pair, replace, origins)
    if b_b and ao is not None and a.dim() == 2 and bo is None and bias is None:
        replace[pos[0]] = "weight"
        return _matrix_left(tr, func, args, kwargs, a, ao, b, replace, origins)
    if bias is None and ((a_b and bo is not None) or (b_b and ao is not None)):
        dense = NAME_HANDLERS.get("<broadcast-matmul>")
        if dense is not None:
            return dense(tr, func, args, kwargs, batched, origins)
    return _unsupported(tr, func, args, kwargs, batched, origins, "a product of a batched tensor with a parameter in this arrangement")


@register_handler(torch.matmul, Tensor.matmul, Tensor.__matmul__, torch.mm, Tensor.mm)
def matmul(tr: Tracer, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], batched: dict[int, AnyLayout], origins: dict[int, Origin]) -> Any:
    a, b = args[0], arg(args, kwargs, 1, "other", arg(args, kwargs, 1, "mat2"))
    return _product(tr, func, args, kwargs, batched, origins, a, b, (0, 1), None)


@register_handler(Tensor.__rmatmul__)
def rmatmul(tr: Tracer, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], batched: dict[int, AnyLayout], origins: dict[int, Origin]) -> Any:
    b, a = args[0], args[1]  # a @ b
    return _product(tr, func, args, kwargs, batched, origins, a, b, (1, 0), None)


@register_handler(torch.addmm, Tensor.addmm)
def addmm(tr: Tracer, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], batched: dict[int, AnyLayout], origins: dict[int, Origin]) -> Any:
    c, a, b = args[0], arg(args, kwargs, 1, "mat1"), arg(args, kwargs, 2, "mat2")
    if kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1 or id(c) in batched:
        return _unsupported(tr, func, args, kwargs, batched, origins, "addmm with beta/alpha or a batched input")
    co = origins.get(id(c))
    bias = (c, co, 0) if co is not None else None
    if bias is not None and c.dim() != 1:
        return _unsupported(tr, func, args, kwargs, batched, origins, "addmm with a parameter input that is not a bias vector")
    if isinstance(batched.get(id(a)), Whole) or isinstance(batched.get(id(a)), Layout):
        return _product(tr, func, args, kwargs, batched, origins, a, b, (1, 2), bias)
    return _unsupported(tr, func, args, kwargs, batched, origins, "addmm with the batch in its second matrix")
