"""``nn.Conv1d/2d/3d``: ``C = conv(X, W) + b`` with ``X: (N, C, *S)``, ``C: (N, O, *L)``.

Sample n's weight gradient is ``sum_t g_nt u_nt^T`` per group, ``u_nt`` the
input patch (``C/groups * K`` values) that output position ``t`` saw. Two exact
forms, chosen per call by the measured rule :func:`use_unfold`:

* the conv weight-gradient with the batch folded into the groups
  (``N * groups`` groups, ``(1, N*C, *S)`` against ``(1, N*O, *L)``) returns
  ``(N*O, C/groups, *K)``, i.e. ``(N, *W.shape)``; no patch tensor;
* patches ``U: (N, groups, C/groups * K, T)`` (blocks of :data:`PATCH_ELEMS`)
  and one batched matmul with ``G``.

Both do the same ``T i o`` multiply-adds per sample and group; how fast CPU
(oneDNN) runs the folded grouped conv varies by 10x with the shape. Measured
(2 threads, float32, min of 7, N = 128 / 32 for 3d; ms grouped -> patches):
``3->32 k3`` on 32x32 (``T = 900``) 16.4 -> 2.9, ``1->8 k3`` on 28x28 5.9 -> 0.6,
``64->128 k3 s2`` on 16x16 (``T = 49``) 40.5 -> 17.7, ``128->256 k3 s2`` on
8x8 (``T = 9``) 147 -> 48; but ``16->32 k3`` on 32x32 7.7 -> 10.9, ``32->64 k3 s2`` on 30x30
(``T = 196``) 8.3 -> 9.6, depthwise ``32 k3`` on 16x16 1.1 -> 2.6. The bias
gradient is ``sum_t g_nt``.

Padding: ``"zeros"`` with equal sides goes to the conv as ``padding``; every
other case (``"same"`` with an even kernel, ``reflect``/``replicate``/
``circular``) pads ``X`` first, as the module does, with
``module._reversed_padding_repeated_twice``, then convolves with padding 0.

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

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..capture import Call
from ..registry import register_rule
from ..rule import Rule, accumulation_dtype, long_sum_slack, squared_norms_of

__all__ = ["ConvRule", "CHUNK_ELEMS", "GRAM_COST", "PATCH_ELEMS", "UNFOLD_CHANNELS", "UNFOLD_POSITIONS"]

#: Temporaries are built a block of samples at a time, at most this many elements.
CHUNK_ELEMS = 1 << 24

#: Cost of one Gram multiply-add relative to one of the materialized per-sample
#: weight gradient: the Gram form is used when ``GRAM_COST * T^2 (i + o) < T i o``
#: (per sample and group). Measured on CPU (float32, 2 threads, N = 128 / 32 for 3d,
#: 86 shapes around the crossover: 1d/2d/3d, 3-256 channels, groups 1-64, T = 4-256,
#: twice) against the materialized form of :func:`use_unfold`: 0.6-0.7 lose 0.1% of
#: the time against always picking the faster form, no pick worse than 1.42x (a 1 ms
#: case); 1.0 (the value measured against the grouped conv alone) loses 16%, up to
#: 1.5x on 128-256 channels (e.g. ``128->128 k3`` on 12x12: 63 ms Gram, 94 ms
#: materialized), 0.4 loses 7%.
GRAM_COST = 0.6

#: Patches for the unfolded per-sample weight gradient are built a block of samples
#: at a time, at most this many elements (measured: 2^19-2^23 within 15% of each
#: other, 2^25 up to 1.6x slower).
PATCH_ELEMS = 1 << 21

#: The per-sample weight gradient of a call is built from patches and a batched
#: matmul (not the folded grouped conv) when a group has at least 2 outputs and
#: fewer than ``UNFOLD_CHANNELS`` inputs or the call fewer than ``UNFOLD_POSITIONS``
#: output positions. Measured on CPU (float32, 2 threads, 57 shapes: 1d/2d/3d,
#: 1-256 channels, groups 1-128 incl. depthwise, T = 4-2744): 6% more time in all
#: than always picking the faster form (grouped conv always: 133% more, patches
#: always: 8% more but 4x slower for depthwise), no pick worse than 1.6x (a
#: 0.3 ms case); thresholds of 100-150 positions do the same within 0.1%.
UNFOLD_CHANNELS = 8
UNFOLD_POSITIONS = 128


def _spatial(module: nn.Module) -> int:
    return len(module.kernel_size)  # type: ignore[arg-type]


def _check_batched(module: nn.Module, x: Tensor) -> None:
    d = _spatial(module)
    if x.dim() != d + 2:
        raise ValueError(
            f"{type(module).__name__} received an input of shape {tuple(x.shape)}; per_sample_grads "
            f"needs batched input (N, C, {', '.join('S' + str(k) for k in range(d))}) with the batch "
            "in dimension 0. Unbatched conv input is not supported: add a batch dimension "
            "(x.unsqueeze(0))."
        )


def _pad_pairs(module: nn.Module) -> list[tuple[int, int]]:
    """``(left, right)`` padding per spatial dimension, in dimension order."""
    rev = list(module._reversed_padding_repeated_twice)  # type: ignore[arg-type]
    d = _spatial(module)
    return [(rev[2 * (d - 1 - k)], rev[2 * (d - 1 - k) + 1]) for k in range(d)]


def _padded(module: nn.Module, x: Tensor) -> Tensor:
    """``X`` padded explicitly exactly as the module pads it: ``(N, C, *S_padded)``."""
    pairs = _pad_pairs(module)
    if not any(a or b for a, b in pairs):
        return x
    mode = module.padding_mode
    return F.pad(x, module._reversed_padding_repeated_twice, mode="constant" if mode == "zeros" else mode)  # type: ignore[arg-type]


def _conv_input(module: nn.Module, call: Call, dtype: torch.dtype) -> tuple[Tensor, Tensor, list[int]]:
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


def _weight_grad(module: nn.Module, x: Tensor, g: Tensor, padding: list[int], per_sample: bool) -> Tensor:
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


def _patches(module: nn.Module, xp: Tensor) -> Tensor:
    """Explicitly padded ``X`` ``(N, C, *S)`` -> patches ``(N, groups, C/groups * K, T)``.

    Built from strided views and one copy, positions innermost (measured 3-10x
    faster than ``F.unfold`` and than a positions-major layout). Always contiguous:
    a strided view (one input channel in 1d) makes CPU matmuls up to 50x slower."""
    d = _spatial(module)
    u = xp
    for k, (size, step, dil) in enumerate(zip(module.kernel_size, module.stride, module.dilation)):
        u = u.unfold(2 + k, dil * (size - 1) + 1, step)
    u = u[(Ellipsis, *(slice(None, None, dil) for dil in module.dilation))]  # (N, C, *L, *K)
    n, c = u.shape[:2]
    positions = u.shape[2 : 2 + d].numel()
    u = u.permute(0, 1, *range(2 + d, 2 + 2 * d), *range(2, 2 + d))  # (N, C, *K, *L)
    return u.contiguous().view(n, module.groups, -1, positions)


def use_unfold(module: nn.Module, positions: int) -> bool:
    """Whether patches + batched matmul beat the folded grouped conv for the per-sample
    weight gradient of a call with ``positions`` output positions (measured rule)."""
    inputs = module.in_channels // module.groups
    outputs = module.out_channels // module.groups
    return outputs >= 2 and (inputs < UNFOLD_CHANNELS or positions < UNFOLD_POSITIONS)


def _unfolded_weight_grad(module: nn.Module, xp: Tensor, g: Tensor) -> Tensor:
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
            # (U G^T)^T: measured 1.2-1.5x faster for few inputs (CPU matmul), one small copy.
            view[s : s + rows] = torch.matmul(u, gb.transpose(2, 3)).transpose(2, 3)
        else:
            torch.matmul(gb, u.transpose(2, 3), out=view[s : s + rows])
    return out


def _per_sample_weight_grad(module: nn.Module, x: Tensor, g: Tensor, padding: list[int]) -> Tensor:
    """``(N, *W.shape)`` from :func:`_conv_input`'s ``(X, G, padding)``, by the form
    :func:`use_unfold` picks for this call."""
    if use_unfold(module, g.shape[2:].numel()):
        return _unfolded_weight_grad(module, _padded(module, x) if any(padding) else x, g)
    return _weight_grad(module, x, g, padding, per_sample=True)


def _gram_squared_norms(module: nn.Module, xs: list[Tensor], gs: list[Tensor]) -> Tensor:
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
        g_parts = [g[s : s + rows].reshape(-1, groups, g.shape[1] // groups, l_) for g, l_ in zip(gs, lens)]
        u = us[0] if len(us) == 1 else torch.cat(us, 3)
        g = g_parts[0] if len(g_parts) == 1 else torch.cat(g_parts, 3)
        gram = torch.matmul(u.transpose(2, 3), u).mul_(torch.matmul(g.transpose(2, 3), g))
        out.append(gram.sum((1, 2, 3)))
    return torch.cat(out)


def _materialized_squared_norms(module: nn.Module, calls: Sequence[tuple[Tensor, Tensor, list[int]]]) -> Tensor:
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


def use_gram(module: nn.Module, positions: Sequence[int]) -> bool:
    """Whether the Gram form is cheaper than materializing for these calls' positions."""
    t = sum(positions)
    i = module.weight[0].numel()
    o = module.weight.shape[0] // module.groups
    return GRAM_COST * t * t * (i + o) < t * i * o


def conv_probe_pays(module: nn.Module, k: int) -> bool:
    """Whether :meth:`ConvRule.probe` should convolve ``X`` with the ``k`` probe kernels
    (per group) rather than build the summed gradient. Measured on CPU: the conv
    form is 1.3-4x faster for ordinary convs and up to 5x slower for one input
    channel per group (depthwise), where CPU convs with few outputs are slow."""
    return module.in_channels // module.groups > 1 and module.groups * k <= module.out_channels


def _weight_squared_norms(module: nn.Module, calls: Sequence[Call], dtype: torch.dtype, gram: bool | None = None) -> Tensor:
    """``(N,)``: ``||sum_calls per-sample weight grad||^2``, cheapest exact form
    (``gram`` forces one)."""
    prepared = [_conv_input(module, c, dtype) for c in calls]
    if gram is None:
        gram = use_gram(module, [g[0, 0].numel() for _, g, _ in prepared])
    if not gram:
        return _materialized_squared_norms(module, prepared)
    xs = [x if not any(pad) else _padded(module, c.input.to(dtype)) for (x, _, pad), c in zip(prepared, calls)]
    return _gram_squared_norms(module, xs, [g for _, g, _ in prepared])


def _bias_sum(g: Tensor) -> Tensor:
    """``(N, O, *L) -> (N, O)``: sum over positions."""
    return g.reshape(g.shape[0], g.shape[1], -1).sum(2)


@register_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class ConvRule(Rule):
    """Per-sample gradients of ``nn.Conv1d/2d/3d`` (and subclasses)."""

    def per_sample(self, module: nn.Module, calls: Sequence[Call], names: Sequence[str]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for name in names:
            dtype = module.get_parameter(name).dtype
            acc: Tensor | None = None
            for call in calls:
                x, g, pad = _conv_input(module, call, dtype)
                t = _per_sample_weight_grad(module, x, g, pad) if name == "weight" else _bias_sum(g)
                acc = t if acc is None else acc.add_(t)
            assert acc is not None  # calls is never empty
            out[name] = acc
        return out

    def squared_norms(self, module: nn.Module, calls: Sequence[Call], names: Sequence[str]) -> dict[str, Tensor]:
        acc = accumulation_dtype(module.get_parameter(names[0]).dtype)
        out: dict[str, Tensor] = {}
        for name in names:
            if name == "weight":
                out[name] = _weight_squared_norms(module, calls, acc)
            else:
                b = sum(_bias_sum(call.grad.to(acc)) for call in calls)
                out[name] = b.square().sum(1)  # type: ignore[union-attr]
        return out

    def weighted_sum(
        self, module: nn.Module, calls: Sequence[Call], names: Sequence[str], weights: Tensor
    ) -> dict[str, Tensor]:
        acc = accumulation_dtype(module.get_parameter(names[0]).dtype)
        out: dict[str, Tensor] = {}
        for call in calls:
            x, g, pad = _conv_input(module, call, acc)
            w = weights.to(device=g.device, dtype=acc)
            scale = w.reshape(-1, *[1] * (g.dim() - 1))
            got: dict[str, Tensor] = {}
            if "weight" in names:
                # (c G) against X == G against (c X): scale the smaller one.
                if g.numel() <= x.numel():
                    got["weight"] = _weight_grad(module, x, g * scale, pad, per_sample=False)
                else:
                    got["weight"] = _weight_grad(module, x * scale, g, pad, per_sample=False)
            if "bias" in names:
                got["bias"] = w @ _bias_sum(g)
            for name, t in got.items():
                out[name] = t if name not in out else out[name].add_(t)
        return out

    def dots(
        self, module: nn.Module, calls: Sequence[Call], names: Sequence[str], others: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        acc = accumulation_dtype(module.get_parameter(names[0]).dtype)
        out: dict[str, Tensor] = {}
        for call in calls:
            x, g, pad = _conv_input(module, call, acc)
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

    def probe(
        self, module: nn.Module, calls: Sequence[Call], names: Sequence[str], vectors: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        acc = accumulation_dtype(module.get_parameter(names[0]).dtype)
        groups = module.groups
        k = vectors[names[0]].shape[1]
        out: dict[str, Tensor] = {}
        local = list(names)
        if "weight" in names and not conv_probe_pays(module, k):
            out.update(super().probe(module, calls, ["weight"], vectors))
            local.remove("weight")
        for call in calls:
            x, g, pad = _conv_input(module, call, acc)
            n, o = g.shape[:2]
            for name in local:
                v = vectors[name].to(device=g.device, dtype=acc)
                if name == "weight":
                    # (sum_n,t g_t u_t^T) v = sum_n,t g_t (conv(X, v as k kernels))_t, per group.
                    per_group = v.T.reshape(k, *module.weight.shape[1:])  # (k, C/groups, *K)
                    kernels = per_group.repeat(groups, *[1] * (per_group.dim() - 1))
                    y = _conv(module, x, kernels, pad).reshape(n, groups, k, -1)
                    t = torch.matmul(g.reshape(n, groups, o // groups, -1), y.transpose(2, 3)).sum(0).reshape(o, k)
                else:
                    t = _bias_sum(g).sum(0)[:, None] @ v
                out[name] = t if name not in out else out[name].add_(t)
        return out

    def magnitudes(self, module: nn.Module, calls: Sequence[Call], names: Sequence[str]) -> dict[str, Tensor]:
        acc = accumulation_dtype(module.get_parameter(names[0]).dtype)
        kernel = module.weight[0, 0].numel()
        out: dict[str, Tensor] = {}
        for call in calls:
            x, g, _ = _conv_input(module, call, acc)  # x holds every value the conv reads
            gn = torch.linalg.vector_norm(g)
            for name in names:
                if name == "weight":
                    # ||sum of g_t u_t^T terms|| <= ||G|| ||U||, ||U|| <= sqrt(K) ||X padded||.
                    t = gn * torch.linalg.vector_norm(x) * kernel**0.5
                else:
                    # ||sum_t g_t|| <= sqrt(m) ||G|| over m = N * positions terms, which the
                    # CPU backward sums sequentially (see long_sum_slack).
                    m = float(g[0, 0].numel() * g.shape[0])
                    t = gn * m**0.5 * long_sum_slack(m)
                out[name] = t if name not in out else out[name] + t
        return out

    def can_pool(self, module: nn.Module, other: nn.Module, name: str) -> bool:
        # A bias's gradient is G summed over positions, whatever the geometry; pooled
        # weight calls are computed with ``module``'s geometry, so it must be identical.
        if not isinstance(other, nn.modules.conv._ConvNd) or other.transposed:
            return False
        return name == "bias" or _geometry(other) == _geometry(module)


def _geometry(module: nn.Module) -> tuple[object, ...]:
    """Everything besides the weight that decides which input values meet which tap."""
    return (
        tuple(module.kernel_size),
        tuple(module.stride),
        tuple(module.dilation),
        module.groups,
        module.padding_mode,
        tuple(_pad_pairs(module)),
    )


def _conv(module: nn.Module, x: Tensor, weight: Tensor, padding: list[int]) -> Tensor:
    """The module's convolution (stride, dilation, groups) of ``x`` with ``weight``."""
    conv = (F.conv1d, F.conv2d, F.conv3d)[_spatial(module) - 1]
    return conv(x, weight, None, module.stride, padding, module.dilation, module.groups)
