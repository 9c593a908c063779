"""Convolutions with a weight (``nn.Conv1d/2d/3d``, ``F.conv*d``): ``C = conv(X, W) + b`` with ``X: (N, C, *S)``, ``C: (N, O, *L)``.

Sample n's weight gradient is ``sum_t g_nt u_nt^T`` per group, ``u_nt`` the
input patch (``C/groups * K`` values) that output position ``t`` saw. Two exact
forms, chosen per call by the measured rule :func:`use_unfold`:

* the conv weight-gradient with the batch folded into the groups
  (``N * groups`` groups, ``(1, N*C, *S)`` against ``(1, N*O, *L)``) returns
  ``(N*O, C/groups, *K)``, i.e. ``(N, *W.shape)``; no patch tensor;
* patches ``U: (N, groups, C/groups * K, T)`` (blocks of :data:`PATCH_ELEMS`)
  and one batched matmul with ``G``.

Both do the same ``T i o`` multiply-adds per sample and group; how fast CPU
(oneDNN) runs the folded grouped conv varies by 10x with the shape, so the
choice follows measurements (``docs/measurements.md``). The bias gradient is
``sum_t g_nt``.

Padding: equal sides go to the conv as ``padding``; uneven ``"same"`` padding
pads ``X`` first, then convolves with padding 0 (the modules' ``reflect``,
``replicate`` and ``circular`` modes call ``F.pad`` before the conv, which the
tracer follows like any other op).

Without materializing, the squared norm is either the Gram form
``sum_groups <U U^T, G G^T>`` over output positions (cost ``T^2 (i + o)``
per sample and group, ``i = C/groups * K``, ``o = O/groups``) or the
materialized layer for a block of samples (cost ``T i o``), whichever the
measured cost model :data:`GRAM_COST` says is cheaper. Calls (repeated calls,
tied convs of identical geometry) are pooled along ``t``, which includes the
cross terms exactly. The clipped sum is one weight-gradient call on ``c * G``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..capture import Call
from ..errors import InvalidArgumentError
from ..registry import register_rule
from ..rule import CHUNK_ELEMS, Rule, accumulation_dtype, squared_norms_of

__all__ = ["ConvModule", "ConvRule", "geometry_key", "GRAM_COST", "PATCH_ELEMS", "UNFOLD_CHANNELS", "UNFOLD_POSITIONS"]

#: Cost of one Gram multiply-add relative to one of the materialized per-sample
#: weight gradient: the Gram form is used when ``GRAM_COST * T^2 (i + o) < T i o``
#: (per sample and group). Measured: docs/measurements.md.
GRAM_COST = 0.6

#: Patches for the unfolded per-sample weight gradient are built a block of samples
#: at a time, at most this many elements.
PATCH_ELEMS = 1 << 21

#: The per-sample weight gradient of a call is built from patches and a batched
#: matmul (not the folded grouped conv) when a group has at least 2 outputs and
#: fewer than ``UNFOLD_CHANNELS`` inputs or the call fewer than ``UNFOLD_POSITIONS``
#: output positions (measured: docs/measurements.md).
UNFOLD_CHANNELS = 8
UNFOLD_POSITIONS = 128


class ConvModule(Protocol):
    """What the rule reads of its ``module``: a conv call's geometry under ``nn.Conv*``'s
    attribute names (:class:`gradhooks.uses.conv.ConvGeometry`)."""

    weight: Tensor
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    in_channels: int
    out_channels: int
    padding_mode: str
    _reversed_padding_repeated_twice: list[int]

    def get_parameter(self, name: str) -> Tensor: ...


def _spatial(module: ConvModule) -> int:
    return len(module.kernel_size)


def _check_batched(module: ConvModule, x: Tensor) -> None:
    d = _spatial(module)
    if x.dim() != d + 2:
        raise InvalidArgumentError(
            f"{type(module).__name__} received an input of shape {tuple(x.shape)}; per_sample_grads "
            f"needs batched input (N, C, {', '.join('S' + str(k) for k in range(d))}) with the batch "
            "in dimension 0. Unbatched conv input is not supported: add a batch dimension "
            "(x.unsqueeze(0))."
        )


def _pad_pairs(module: ConvModule) -> list[tuple[int, int]]:
    """``(left, right)`` padding per spatial dimension, in dimension order."""
    rev = list(module._reversed_padding_repeated_twice)
    d = _spatial(module)
    return [(rev[2 * (d - 1 - k)], rev[2 * (d - 1 - k) + 1]) for k in range(d)]


def _padded(module: ConvModule, x: Tensor) -> Tensor:
    """``X`` padded explicitly exactly as the module pads it: ``(N, C, *S_padded)``."""
    pairs = _pad_pairs(module)
    if not any(a or b for a, b in pairs):
        return x
    mode = module.padding_mode
    return F.pad(x, module._reversed_padding_repeated_twice, mode="constant" if mode == "zeros" else mode)


def _conv_input(module: ConvModule, call: Call, dtype: torch.dtype) -> tuple[Tensor, Tensor, list[int]]:
    """``(X, G, padding)`` to pass to a conv of the module's geometry: symmetric zero
    padding stays an argument, any other padding is applied to ``X`` here."""
    x = call.input
    _check_batched(module, x)
    g = call.grad.to(dtype)
    x = x.to(dtype)
    pairs = _pad_pairs(module)
    if module.padding_mode == "zeros" and all(a == b for a, b in pairs):
        return x, g, [a for a, _ in pairs]
    return _padded(module, x), g, [0] * len(pairs)


def _weight_grad(module: ConvModule, x: Tensor, g: Tensor, padding: list[int], per_sample: bool) -> Tensor:
    """Conv weight gradient ``(O, C/groups, *K)``; with ``per_sample`` the batch is
    folded into the groups and the result is ``(N, O, C/groups, *K)``."""
    w_shape = tuple(module.weight.shape)
    groups = module.groups
    d = len(padding)
    if per_sample:
        n = x.shape[0]
        x = x.reshape(1, -1, *x.shape[2:])
        g = g.reshape(1, -1, *g.shape[2:])
        groups, w_shape = groups * n, (n * w_shape[0], *w_shape[1:])
    weight = g.new_empty(1).expand(w_shape)
    got = torch.ops.aten.convolution_backward(
        g, x, weight, None, list(module.stride), padding, list(module.dilation), False, [0] * d, groups, (False, True, False)
    )[1]
    return got.reshape(-1, *module.weight.shape) if per_sample else got


def _patches(module: ConvModule, xp: Tensor) -> Tensor:
    """Explicitly padded ``X`` ``(N, C, *S)`` -> patches ``(N, groups, C/groups * K, T)``.

    Built from strided views and one copy, positions innermost (faster than
    ``F.unfold``). Always contiguous: a strided view (one input channel in 1d)
    makes CPU matmuls much slower."""
    d = _spatial(module)
    u = xp
    for k, (size, step, dil) in enumerate(zip(module.kernel_size, module.stride, module.dilation, strict=False)):
        u = u.unfold(2 + k, dil * (size - 1) + 1, step)
    u = u[(Ellipsis, *(slice(None, None, dil) for dil in module.dilation))]  # (N, C, *L, *K)
    n, c = u.shape[:2]
    positions = u.shape[2 : 2 + d].numel()
    u = u.permute(0, 1, *range(2 + d, 2 + 2 * d), *range(2, 2 + d))  # (N, C, *K, *L)
    return u.contiguous().view(n, module.groups, -1, positions)


def use_unfold(module: ConvModule, positions: int) -> bool:
    """Whether patches + batched matmul beat the folded grouped conv for the per-sample
    weight gradient of a call with ``positions`` output positions (measured rule)."""
    inputs = module.in_channels // module.groups
    outputs = module.out_channels // module.groups
    return outputs >= 2 and (inputs < UNFOLD_CHANNELS or positions < UNFOLD_POSITIONS)


def _unfolded_weight_grad(module: ConvModule, xp: Tensor, g: Tensor) -> Tensor:
    """Explicitly padded ``X`` ``(N, C, *S)``, ``G`` ``(N, O, *L)`` -> per-sample weight
    grads ``(N, *W.shape)``: ``G U^T`` per sample and group, patches built a block of
    samples at a time."""
    n, groups = g.shape[0], module.groups
    o, i, t = g.shape[1] // groups, module.weight[0].numel(), g.shape[2:].numel()
    out = g.new_empty(n, *module.weight.shape)
    view = out.view(n, groups, o, i)
    rows = max(1, PATCH_ELEMS // (groups * i * t))
    for s in range(0, n, rows):
        u = _patches(module, xp[s : s + rows])  # (b, groups, i, T)
        gb = g[s : s + rows].reshape(-1, groups, o, t)
        if i < o:
            # (U G^T)^T: faster for few inputs (CPU matmul), one small copy.
            view[s : s + rows] = torch.matmul(u, gb.transpose(2, 3)).transpose(2, 3)
        else:
            torch.matmul(gb, u.transpose(2, 3), out=view[s : s + rows])
    return out


def _per_sample_weight_grad(module: ConvModule, x: Tensor, g: Tensor, padding: list[int]) -> Tensor:
    """``(N, *W.shape)`` from :func:`_conv_input`'s ``(X, G, padding)``, by the form
    :func:`use_unfold` picks for this call."""
    if use_unfold(module, g.shape[2:].numel()):
        return _unfolded_weight_grad(module, _padded(module, x) if any(padding) else x, g)
    return _weight_grad(module, x, g, padding, per_sample=True)


def _gram_squared_norms(module: ConvModule, xs: list[Tensor], gs: list[Tensor]) -> Tensor:
    """``(N,)``: ``sum_groups <U U^T, G G^T>`` over the calls' positions pooled.
    ``xs``: explicitly padded inputs ``(N, C, *S)``; ``gs``: output grads ``(N, O, *L)``."""
    groups = module.groups
    n = gs[0].shape[0]
    lens = [g[0, 0].numel() for g in gs]
    t = sum(lens)
    i = module.weight[0].numel()
    rows = max(1, CHUNK_ELEMS // (groups * t * max(i, 2 * t)))
    out = []
    for s in range(0, n, rows):
        us = [_patches(module, x[s : s + rows]) for x in xs]  # (b, groups, i, T_c)
        g_parts = [g[s : s + rows].reshape(-1, groups, g.shape[1] // groups, l_) for g, l_ in zip(gs, lens, strict=False)]
        u = us[0] if len(us) == 1 else torch.cat(us, 3)
        g = g_parts[0] if len(g_parts) == 1 else torch.cat(g_parts, 3)
        gram = torch.matmul(u.transpose(2, 3), u).mul_(torch.matmul(g.transpose(2, 3), g))
        out.append(gram.sum((1, 2, 3)))
    return torch.cat(out)


def _materialized_squared_norms(module: ConvModule, calls: Sequence[tuple[Tensor, Tensor, list[int]]]) -> Tensor:
    """``(N,)``: squared norms of the per-sample weight grads summed over calls, built
    a block of samples at a time."""
    n = calls[0][1].shape[0]
    rows = max(1, CHUNK_ELEMS // module.weight.numel())
    out = []
    for s in range(0, n, rows):
        acc: Tensor | None = None
        for x, g, pad in calls:
            t = _per_sample_weight_grad(module, x[s : s + rows], g[s : s + rows], pad)
            acc = t if acc is None else acc.add_(t)
        assert acc is not None
        out.append(squared_norms_of(acc))
    return torch.cat(out)


def use_gram(module: ConvModule, positions: Sequence[int]) -> bool:
    """Whether the Gram form is cheaper than materializing for these calls' positions."""
    t = sum(positions)
    i = module.weight[0].numel()
    o = module.weight.shape[0] // module.groups
    return GRAM_COST * t * t * (i + o) < t * i * o


def _weight_squared_norms(module: ConvModule, calls: Sequence[Call], dtype: torch.dtype, gram: bool | None = None) -> Tensor:
    """``(N,)``: ``||sum_calls per-sample weight grad||^2``, cheapest exact form
    (``gram`` forces one)."""
    prepared = [_conv_input(module, c, dtype) for c in calls]
    if gram is None:
        gram = use_gram(module, [g[0, 0].numel() for _, g, _ in prepared])
    if not gram:
        return _materialized_squared_norms(module, prepared)
    xs = [x if not any(pad) else _padded(module, c.input.to(dtype)) for (x, _, pad), c in zip(prepared, calls, strict=False)]
    return _gram_squared_norms(module, xs, [g for _, g, _ in prepared])


def _bias_sum(g: Tensor) -> Tensor:
    """``(N, O, *L) -> (N, O)``: sum over positions."""
    return g.reshape(g.shape[0], g.shape[1], -1).sum(2)


@register_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class ConvRule(Rule):
    """Per-sample gradients of a convolution with a weight (``F.conv1d/2d/3d``).
    ``module``: the op's geometry under ``nn.Conv*``'s attribute names."""

    by_ops = True
    subclass_forward_ok = True

    def per_sample(self, module: ConvModule, calls: Sequence[Call], names: Sequence[str]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for name in names:
            dtype = module.get_parameter(name).dtype
            acc: Tensor | None = None
            for call in calls:
                if name == "weight":
                    x, g, pad = _conv_input(module, call, dtype)
                    t = _per_sample_weight_grad(module, x, g, pad)
                else:  # a bias's calls may come from convs of any geometry (tied biases)
                    t = _bias_sum(call.grad.to(dtype))
                acc = t if acc is None else acc.add_(t)
            assert acc is not None  # calls is never empty
            out[name] = acc
        return out

    def squared_norms(self, module: ConvModule, calls: Sequence[Call], names: Sequence[str]) -> dict[str, Tensor]:
        acc = accumulation_dtype(module.get_parameter(names[0]).dtype)
        out: dict[str, Tensor] = {}
        for name in names:
            if name == "weight":
                out[name] = _weight_squared_norms(module, calls, acc)
            else:
                b = _bias_sum(calls[0].grad.to(acc))
                for call in calls[1:]:
                    b = b + _bias_sum(call.grad.to(acc))
                out[name] = b.square().sum(1)
        return out

    def weighted_sum_into(
        self, module: ConvModule, calls: Sequence[Call], names: Sequence[str], weights: Tensor, out: dict[str, Tensor]
    ) -> None:
        acc = out[names[0]].dtype
        for call in calls:
            if "weight" in names:
                x, g, pad = _conv_input(module, call, acc)
            else:  # tied biases may pool convs of different geometry
                g = call.grad.to(acc)
            w = weights.to(device=g.device, dtype=acc)
            scale = w.reshape(-1, *[1] * (g.dim() - 1))
            if "weight" in names:
                # (c G) against X == G against (c X): scale the smaller one.
                if g.numel() <= x.numel():
                    out["weight"].add_(_weight_grad(module, x, g * scale, pad, per_sample=False))
                else:
                    out["weight"].add_(_weight_grad(module, x * scale, g, pad, per_sample=False))
            if "bias" in names:
                out["bias"].addmv_(_bias_sum(g).T, w)

    def dots(
        self, module: ConvModule, calls: Sequence[Call], names: Sequence[str], others: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        acc = accumulation_dtype(module.get_parameter(names[0]).dtype)
        out: dict[str, Tensor] = {}
        for call in calls:
            if "weight" in names:
                x, g, pad = _conv_input(module, call, acc)
            else:
                g = call.grad.to(acc)
            for name in names:
                m = others[name].to(device=g.device, dtype=acc)
                if name == "weight":
                    # <sum_t g_t u_t^T, M> = sum_t <g_t, M u_t> = <G, conv(X, M)>.
                    y = _conv(module, x, m, pad)
                    t = torch.einsum("nk,nk->n", y.flatten(1), g.flatten(1))
                else:
                    t = _bias_sum(g) @ m
                out[name] = t if name not in out else out[name] + t
        return out

    def can_pool(self, module: ConvModule, other: Any, name: str) -> bool:
        # A bias's gradient is G summed over positions, whatever the geometry; pooled
        # weight calls are computed with ``module``'s geometry, so it must be identical.
        if isinstance(other, nn.Module) or not callable(getattr(other, "key", None)):
            return False  # only the tracer's call geometries (gradhooks.uses.conv.ConvGeometry)
        return name == "bias" or geometry_key(other) == geometry_key(module)


def geometry_key(module: ConvModule) -> tuple[object, ...]:
    """Everything besides the weight that decides which input values meet which tap."""
    return (
        tuple(module.kernel_size),
        tuple(module.stride),
        tuple(module.dilation),
        module.groups,
        module.padding_mode,
        tuple(_pad_pairs(module)),
    )


def _conv(module: ConvModule, x: Tensor, weight: Tensor, padding: list[int]) -> Tensor:
    """The module's convolution (stride, dilation, groups) of ``x`` with ``weight``."""
    conv = (F.conv1d, F.conv2d, F.conv3d)[_spatial(module) - 1]
    return conv(x, weight, None, module.stride, padding, module.dilation, module.groups)
