"""Batch provenance: which rows of a tensor belong to which sample.

Every tensor computed from the model's input carries a :class:`Layout` (kept by
the tracer, never on the tensor): the dimension that holds the batch, and how
the batch sits in it. A tensor computed without the batch (a position table
``wpe(arange(T))``, a parameter, a mask built from ``arange``) has no layout:
it is batch-independent, whatever its dimension 0 happens to equal.

``Layout(dim, outer, inner)``: dimension ``dim`` has size ``outer * N * inner``
and index ``(a * N + n) * inner + b`` belongs to sample ``n`` (a reshape that
folds the batch together with other dimensions, e.g. GPT-2's
``x.view(-1, x.size(-1))``, gives ``inner = T``). ``rows``, when present, names
the sample of each index along ``dim`` explicitly (a permutation of the batch,
packed sequences, boolean selection). :data:`WHOLE` is the layout of every
batch tensor when N is 1 (or 0): all of it belongs to the one sample.
:class:`Opaque` marks a batch tensor whose per-sample structure is lost (a
reduction over the batch, an op the tracer cannot follow): fine as a loss,
an error wherever a parameter meets it.

The functions here are pure: shapes and layouts in, layouts out; and the
canonical views rules compute with (batch first).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import ArgumentTypeError, InvalidArgumentError

__all__ = [
    "Layout",
    "Opaque",
    "WHOLE",
    "Whole",
    "AnyLayout",
    "batch_first",
    "split_batch",
    "reshape",
    "permute",
    "broadcast",
    "reduce",
    "insert_dims",
    "with_rows",
]


class Layout:
    """The batch sits in dimension ``dim``: size ``outer * N * inner`` (or ``len(rows)``)."""

    __slots__ = ("dim", "outer", "inner", "rows")

    def __init__(self, dim: int, outer: int = 1, inner: int = 1, rows: Tensor | None = None) -> None:
        self.dim = dim
        self.outer = outer
        self.inner = inner
        self.rows = rows

    @property
    def plain(self) -> bool:
        """Dimension ``dim`` is exactly the batch, in sample order."""
        return self.outer == 1 and self.inner == 1 and self.rows is None

    def moved(self, dim: int) -> Layout:
        return self if dim == self.dim else Layout(dim, self.outer, self.inner, self.rows)

    def same_structure(self, other: Layout) -> bool:
        """Whether ``other`` puts the samples in the same places along its batch dimension."""
        if self.outer != other.outer or self.inner != other.inner:
            return False
        if self.rows is None or other.rows is None:
            return self.rows is None and other.rows is None
        return self.rows is other.rows or torch.equal(self.rows, other.rows)

    def __repr__(self) -> str:
        extra = "" if self.plain else (f", rows={tuple(self.rows.shape)}" if self.rows is not None else f", outer={self.outer}, inner={self.inner}")
        return f"Layout(dim={self.dim}{extra})"


def with_rows(dim: int, rows: Tensor, n: int) -> Layout:
    """``Layout(dim, rows=rows)``, or the plain layout when the rows are the samples
    in order (a permutation undone)."""
    if rows.numel() == n and torch.equal(rows, torch.arange(n, device=rows.device)):
        return Layout(dim)
    return Layout(dim, rows=rows)


class Whole:
    """N is 1 (or 0): every element of the tensor belongs to the one sample."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "WHOLE"


WHOLE = Whole()


class Opaque:
    """Computed from the batch, but which rows belong to which sample is lost.
    ``reduced``: by a reduction over the batch (a loss): a parameter meeting it
    (a weight penalty added to the loss) is a gradient with no per-sample meaning."""

    __slots__ = ("why", "reduced")

    def __init__(self, why: str, reduced: bool = False) -> None:
        self.why = why
        self.reduced = reduced

    def __repr__(self) -> str:
        return f"Opaque({self.why!r})"


AnyLayout = Layout | Whole | Opaque


def _norm(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


# -- propagation -----------------------------------------------------------------


def reshape(layout: Layout, in_shape: Sequence[int], out_shape: Sequence[int], n: int) -> AnyLayout:
    """Layout after a row-major reshape (``view``, ``reshape``, ``flatten``,
    ``unflatten``, ``squeeze``, ``unsqueeze``) from ``in_shape`` to ``out_shape``.

    The batch is one digit of the row-major index, with place value
    ``P = inner * prod(in_shape[dim+1:])`` and radix N; it stays attributable when
    one output dimension holds that whole digit."""
    if layout.rows is not None:
        # Explicit rows survive only if the batch dimension itself is kept as is.
        size = in_shape[layout.dim]
        after = math.prod(in_shape[layout.dim + 1 :])
        suffix = 1
        for e in range(len(out_shape) - 1, -1, -1):
            if suffix == after and out_shape[e] == size:
                return layout.moved(e)
            suffix *= out_shape[e]
        return Opaque("a reshape split or merged the rows of a reordered batch")
    place = layout.inner * math.prod(in_shape[layout.dim + 1 :])
    digit = place * n
    suffix = 1
    for e in range(len(out_shape) - 1, -1, -1):
        size = out_shape[e]
        span = suffix * size
        if place % suffix == 0 and span % digit == 0 and suffix <= place:
            inner = place // suffix
            return Layout(e, size // (inner * n), inner)
        suffix = span
    return Opaque("a reshape split the batch dimension across dimensions")


def permute(layout: Layout, dims: Sequence[int]) -> Layout:
    """Layout after ``permute(dims)``: output dim ``j`` is input dim ``dims[j]``."""
    ndim = len(dims)
    return layout.moved([_norm(d, ndim) for d in dims].index(layout.dim))


def insert_dims(layout: Layout, count: int) -> Layout:
    """Layout after ``count`` new leading dimensions (broadcasting, ``expand``)."""
    return layout.moved(layout.dim + count)


def broadcast(out_ndim: int, parts: Sequence[tuple[int, AnyLayout]], sizes: Sequence[int]) -> AnyLayout:
    """Layout of an elementwise op's output from its batched inputs' ``(ndim, layout)``
    (inputs without a layout are batch-independent and need no entry). ``sizes``:
    the output shape. Inputs right-align; their batch dimensions must coincide."""
    out: Layout | None = None
    for ndim, lay in parts:
        if isinstance(lay, Opaque):
            return lay  # keeps ``reduced``: a loss plus a penalty is still a loss
        if isinstance(lay, Whole):
            return lay
        moved = lay.moved(lay.dim + out_ndim - ndim)
        if out is None:
            out = moved
        elif out.dim != moved.dim or not out.same_structure(moved):
            return Opaque("an elementwise op combined tensors whose batch dimensions differ")
    if out is None:
        raise InvalidArgumentError("broadcast needs at least one batched input")
    return out


def reduce(layout: Layout, dims: Sequence[int] | None, keepdim: bool, ndim: int, what: str) -> AnyLayout:
    """Layout after reducing over ``dims`` (``None``: all). Reducing over the batch
    dimension mixes the samples."""
    if dims is None:
        return Opaque(f"{what} over all dimensions, the batch included", reduced=True)
    norm = {_norm(d, ndim) for d in dims}
    if layout.dim in norm:
        return Opaque(f"{what} over the batch dimension", reduced=True)
    if keepdim:
        return layout
    return layout.moved(layout.dim - sum(1 for d in norm if d < layout.dim))


# -- canonical views ---------------------------------------------------------------


def batch_first(t: Tensor, layout: AnyLayout, n: int) -> Tensor:
    """``t`` as ``(N, ...)``: dimension 0 the batch, the other dimensions in order
    (an ``outer``/``inner`` factor becomes a dimension of its own; explicit rows are
    gathered per sample into a zero-padded dimension). For :data:`WHOLE`, a new
    leading dimension of size N (= 1)."""
    if isinstance(layout, Whole):
        return t.unsqueeze(0)
    if not isinstance(layout, Layout):
        raise ArgumentTypeError(f"no per-sample layout: {layout!r}")
    d = layout.dim
    if layout.rows is not None:
        return _gather_rows(t.movedim(d, 0), layout.rows, n)
    if layout.plain:
        return t.movedim(d, 0) if d else t
    parts = [s for s in (layout.outer, n, layout.inner)]
    u = t.unflatten(d, parts).movedim(d + 1, 0)  # (N, *t.shape[:d], outer, inner, *t.shape[d+1:])
    return u


def split_batch(t: Tensor, layout: AnyLayout, n: int) -> list[Tensor]:
    """For ops that treat dimension 0 as their batch (conv, group norm): ``t``'s
    batch in dimension 0, split into views ``(N, *t.shape[1:])`` whose rows are the
    samples in order; an ``outer``/``inner`` factor gives several views (a sample's
    several rows). Raises ``ValueError`` if the batch is not in dimension 0."""
    if isinstance(layout, Whole):
        return [t[r : r + 1] for r in range(t.shape[0])] if t.dim() else [t]
    if not isinstance(layout, Layout) or layout.dim != 0 or layout.rows is not None:
        raise InvalidArgumentError("the batch is not in dimension 0")
    if layout.plain:
        return [t]
    u = t.view(layout.outer, n, layout.inner, *t.shape[1:])
    return [u[a, :, b] for a in range(layout.outer) for b in range(layout.inner)]


def _gather_rows(t: Tensor, rows: Tensor, n: int) -> Tensor:
    """``t`` ``(R, *rest)`` with row ``r`` belonging to sample ``rows[r]`` (-1: none)
    -> ``(N, K, *rest)``, zero-padded, ``K`` the most rows of one sample."""
    keep = rows >= 0
    rows_k = rows[keep]
    tk = t[keep]
    if rows_k.numel() == 0:
        return t.new_zeros((n, 0, *t.shape[1:]))
    order = torch.argsort(rows_k, stable=True)
    sorted_rows = rows_k[order]
    counts = torch.bincount(sorted_rows, minlength=n)
    k = int(counts.max())
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(sorted_rows.numel(), device=rows.device) - starts[sorted_rows]
    out = t.new_zeros((n, k, *t.shape[1:]))
    out[sorted_rows, slot] = tk[order]
    return out
