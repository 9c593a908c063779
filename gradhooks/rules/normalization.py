"""Normalization layers: ``y = xhat * w + b`` with ``xhat`` the input normalized by
statistics of the sample itself (layer norm, RMS norm, group norm, instance norm)
or by fixed running statistics (instance norm and batch norm in eval mode).

Sample n's gradients are ``dw = sum_t G_nt * xhat_nt`` and ``db = sum_t G_nt``,
summed over the positions ``t`` that share a parameter element: the leading
dims for layer/RMS norm (whose parameters cover the trailing
``normalized_shape``), the dims after the channel for the others (``(N, C, *)``
inputs, parameters ``(C,)``). They are no larger than ``N`` times the
parameter, so they are computed when the output's gradient arrives, from the
input and the statistics the forward itself computed (``native_layer_norm``
and friends return them: nothing is recomputed), and kept instead of ``X`` and
``G`` (see :mod:`gradhooks.rules.dense`).

BatchNorm normalizing with batch statistics (training mode, or eval mode without
running statistics) couples the samples of a batch, so its rule refuses it.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from ..registry import register_rule
from ..rule import CHUNK_ELEMS, Rule

__all__ = ["affine_grads", "normalized", "NormRule", "BatchNormRule", "TRAINING_REASON", "NO_STATS_REASON"]

Layout = Literal["last", "channel"]

TRAINING_REASON = (
    "BatchNorm in training mode normalizes with the statistics of the whole batch, which couple "
    "the samples of a batch, so per-sample gradients do not exist (for this layer's parameters and "
    "for every layer before it, even if it is frozen); call .eval() on it (it then uses its running "
    "statistics) or use GroupNorm, LayerNorm or InstanceNorm instead"
)
NO_STATS_REASON = (
    "BatchNorm with track_running_stats=False normalizes with the statistics of the whole batch even "
    "in eval mode, which couple the samples of a batch, so per-sample gradients do not exist; use "
    "track_running_stats=True and .eval(), or GroupNorm, LayerNorm or InstanceNorm instead"
)

def _position_sum(t: Tensor, shape: torch.Size, layout: Layout, acc: torch.dtype) -> Tensor:
    """``(b, *input) -> (b, *shape)``: sum over the positions sharing a parameter
    element (leading dims for ``"last"``, dims after the channel for ``"channel"``)."""
    b = t.shape[0]
    if layout == "last":
        return t.reshape(b, -1, math.prod(shape)).sum(1, dtype=acc).reshape(b, *shape)
    return t.reshape(b, shape[0], -1).sum(2, dtype=acc)


def normalized(kind: str, x: Tensor, stats: tuple[Tensor, ...], acc: torch.dtype) -> Tensor:
    """``xhat`` of ``x`` ``(b, *input)`` as a new ``acc`` tensor, from the forward's
    statistics: ``"layer"`` ``(mean, rstd)`` broadcastable to ``x``; ``"rms"``
    ``(rstd,)``; ``"group"`` ``(mean, rstd)`` of shape ``(b, groups)``;
    ``"channel"`` ``(mean, rstd)`` of shape ``(C,)`` (running statistics) or
    ``(b, C)`` (instance statistics)."""
    xa = x.to(acc)
    if kind == "layer":
        mean, rstd = stats
        return torch.sub(xa, mean.to(acc)).mul_(rstd.to(acc))
    if kind == "rms":
        return torch.mul(xa, stats[0].to(acc))
    if kind == "group":
        mean, rstd = stats
        grouped = xa.reshape(xa.shape[0], mean.shape[-1], -1)
        return torch.sub(grouped, mean.to(acc)[..., None]).mul_(rstd.to(acc)[..., None]).reshape(x.shape)
    mean, rstd = stats
    shape = (-1 if mean.dim() == 2 else 1, x.shape[1], *([1] * (x.dim() - 2)))
    return torch.sub(xa, mean.to(acc).reshape(shape)).mul_(rstd.to(acc).reshape(shape))


def affine_grads(
    kind: str, x: Tensor, g: Tensor, stats: tuple[Tensor, ...], shape: torch.Size, want: tuple[bool, bool], acc: torch.dtype
) -> tuple[Tensor | None, Tensor | None]:
    """Per-sample ``(dw, db)``, each ``(N, *shape)`` in ``acc`` (``None`` where not
    wanted), a block of samples at a time. ``x``, ``g``: ``(N, *input)`` batch first;
    ``stats`` as for :func:`normalized` (per-sample ones sliced with the block)."""
    layout: Layout = "last" if kind in ("layer", "rms") else "channel"
    n = x.shape[0]
    per_sample_stats = not (kind == "channel" and stats[0].dim() == 1)  # running stats: (C,)
    step = max(1, CHUNK_ELEMS // max(1, x[0].numel()))
    dws, dbs = [], []
    for s in range(0, n, step):
        sl = slice(s, min(n, s + step))
        gb = g[sl]
        if want[0]:
            block_stats = tuple(t[sl] for t in stats) if per_sample_stats else stats
            xg = normalized(kind, x[sl], block_stats, acc)
            dws.append(_position_sum(xg.mul_(gb.to(acc)), shape, layout, acc))
        if want[1]:
            dbs.append(_position_sum(gb, shape, layout, acc))
    dw = (torch.cat(dws) if len(dws) > 1 else dws[0]) if want[0] else None
    db = (torch.cat(dbs) if len(dbs) > 1 else dbs[0]) if want[1] else None
    return dw, db


class NormRule(Rule):
    """Normalization modules (``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm``,
    ``nn.InstanceNorm*d``): their parameters are captured per op
    (``F.layer_norm``, ...), whatever module calls it."""

    by_ops = True
    subclass_forward_ok = True


class BatchNormRule(NormRule):
    """``nn.BatchNorm*d`` / ``nn.SyncBatchNorm``: only in eval mode with running stats."""

    def refuse(self, module: nn.Module) -> str | None:
        if module.training:
            return TRAINING_REASON
        if module.running_mean is None and module.running_var is None:
            return NO_STATS_REASON
        return None


register_rule(nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, _InstanceNorm, rule=NormRule())
register_rule(_BatchNorm, rule=BatchNormRule())
