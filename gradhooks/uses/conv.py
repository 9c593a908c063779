"""Convolutions with a weight: ``F.conv1d/2d/3d(x, W, b, stride, padding, dilation, groups)``.

``x`` must have the batch in dimension 0 (rows of several per sample, as when a
model folds frames into the batch, become several calls of the rule). The
modules' non-zero padding modes call ``F.pad`` first, which the tracer follows.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from ..rules.conv import ConvRule, geometry_key
from ..trace.derive import Origin
from ..trace.layout import AnyLayout, Layout
from ..trace.tracer import Tracer, register_handler
from .common import arg, new_site, record

CONV = ConvRule()


@register_handler(F.conv1d, F.conv2d, F.conv3d)
def conv(tr: Tracer, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], batched: dict[int, AnyLayout], origins: dict[int, Origin]) -> Any:
    rec = tr.rec
    x, w, b = args[0], arg(args, kwargs, 1, "weight"), arg(args, kwargs, 2, "bias")
    rest = [arg(args, kwargs, i, k, d) for i, k, d in ((3, "stride", 1), (4, "padding", 0), (5, "dilation", 1), (6, "groups", 1))]
    lx = batched.get(id(x))
    if lx is None or any(isinstance(t, Tensor) and id(t) in batched for t in (w, b)):
        rec.unsupported(tr, func.__name__, origins, "a convolution whose weight depends on the batch")
        return rec.plain(tr, func, args, kwargs, batched, origins)
    if x.dim() != w.dim():
        rec.problem(tr, "layout", func.__name__, origins, f"an unbatched input of shape {tuple(x.shape)} (the "
                    f"convolution needs batched input (N, C, ...) with the batch in dimension 0; add one with x.unsqueeze(0))")
        return rec.plain(tr, func, args, kwargs, batched, origins)
    if isinstance(lx, Layout) and (lx.dim != 0 or lx.rows is not None):
        rec.problem(tr, "layout", func.__name__, origins, "a convolution needs the batch in dimension 0 of its input")
        return rec.plain(tr, func, args, kwargs, batched, origins)
    geometry = ConvGeometry(w.detach(), b.detach() if isinstance(b, Tensor) else None, *rest)  # its key is needed
    operands = {}
    wo = origins.get(id(w))
    bo = origins.get(id(b)) if isinstance(b, Tensor) else None
    if wo is not None:
        operands["weight"] = (w, wo)
    if bo is not None:
        operands["bias"] = (b, bo)
    key = ("conv", geometry.key(), *(id(o) for _, o in operands.values()))
    site = new_site(tr, key, CONV, lambda: geometry, operands)
    w_op = rec.operand(w, wo, site, "weight") if wo is not None else w
    b_op = rec.operand(b, bo, site, "bias") if bo is not None else b
    call = record(site, x, lx, lx, "split")
    out = func(x, w_op, b_op, *rest)
    tr.set_layout(out, lx)
    call.memo["out_layout"] = lx
    watched = rec.watch(out, call, 0, [x])
    if watched is not out:
        tr.set_layout(watched, lx)
    return watched


def _tuple(value: int | tuple[int, ...] | list[int], d: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value),) * d


class ConvGeometry:
    """A ``conv{1,2,3}d`` call's arguments under ``nn.Conv*``'s attribute names, for
    :class:`ConvRule`. ``padding``: ints, tuple, ``"valid"`` or ``"same"`` (uneven
    ``"same"`` padding puts the extra element on the right, as PyTorch does)."""

    padding_mode = "zeros"
    transposed = False

    def __init__(self, weight: Tensor, bias: Tensor | None, stride: Any, padding: Any, dilation: Any, groups: int) -> None:
        d = weight.dim() - 2
        self.weight = weight
        self.bias = bias
        self.kernel_size = tuple(weight.shape[2:])
        self.stride = _tuple(stride, d)
        self.dilation = _tuple(dilation, d)
        self.groups = int(groups)
        self.out_channels = weight.shape[0]
        self.in_channels = weight.shape[1] * self.groups
        if isinstance(padding, str):
            pairs = [(0, 0)] * d if padding == "valid" else [_same_pair(k, dil) for k, dil in zip(self.kernel_size, self.dilation, strict=False)]
        else:
            pairs = [(p, p) for p in _tuple(padding, d)]
        self.padding = tuple(a for a, _ in pairs)
        rev: list[int] = []
        for a, b in reversed(pairs):
            rev += [a, b]
        self._reversed_padding_repeated_twice = rev

    def get_parameter(self, name: str) -> Tensor:
        return getattr(self, name)

    def key(self) -> tuple[object, ...]:
        return geometry_key(self)


def _same_pair(kernel: int, dilation: int) -> tuple[int, int]:
    total = dilation * (kernel - 1)
    return total // 2, total - total // 2
