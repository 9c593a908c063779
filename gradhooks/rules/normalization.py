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
and friends return them), and kept instead of ``X`` and ``G`` (see
:mod:`gradhooks.rules.dense`). ``xhat`` is never built: a few passes over
``x * G`` (or ``(x - mean) * G``) and ``G`` give both sums, the reductions over
many rows as batched matrix products (``docs/measurements.md``).

In the default mode the exit check also needs the rounding scale of the sums
PyTorch's backward formed, ``sum (|x| + |mean|) rstd |G|`` and ``sum |G|``
over the batch: two more passes, skipped with ``one_backward=True``.

BatchNorm normalizing with batch statistics (training mode, or eval mode without
running statistics) couples the samples of a batch, so its rule refuses it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from ..registry import register_rule
from ..rule import CHUNK_ELEMS, Rule

__all__ = ["affine_grads", "batch_stats", "Grads", "Stats", "NormRule", "BatchNormRule", "TRAINING_REASON", "NO_STATS_REASON"]

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

#: Statistics of one call: ``(mean or None, rstd)``, see :func:`affine_grads`.
Stats = tuple[Tensor | None, Tensor]


@dataclass
class Grads:
    """What one call contributes. ``dw``, ``db``: per-sample ``(N, *shape)`` (``None``
    where not wanted). ``mw``, ``mb``: the exit check's rounding scale, ``(*shape)``,
    summed over the samples: ``sum (|x| + |mean|) * rstd * |G|`` and ``sum |G|``
    (``None`` unless asked for)."""

    dw: Tensor | None = None
    db: Tensor | None = None
    mw: Tensor | None = None
    mb: Tensor | None = None

    def __add__(self, other: Grads) -> Grads:
        return Grads(*(a if b is None else b if a is None else a + b for a, b in zip(self.astuple(), other.astuple(), strict=True)))

    def astuple(self) -> tuple[Tensor | None, ...]:
        return (self.dw, self.db, self.mw, self.mb)


def batch_stats(x: Tensor, dims: tuple[int, ...], eps: float, acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(mean, rstd)`` of ``x`` over ``dims`` (kept), in ``acc``: two passes (a sum,
    then the centred squares), when the op did not return its statistics. Not
    ``torch.var_mean``: on CPU it is ~8x slower than these two passes."""
    xa = x.to(acc)
    mean = xa.mean(dims, keepdim=True)
    var = torch.sub(xa, mean).square_().mean(dims, keepdim=True)
    return mean, var.add_(eps).rsqrt_()


def affine_grads(
    kind: str, x: Tensor, g: Tensor, stats: Stats, shape: torch.Size, want: tuple[bool, bool], acc: torch.dtype, scales: bool = False
) -> Grads:
    """Per-sample ``(dw, db)`` in ``acc`` (and, with ``scales``, the check's rounding
    scale), a block of samples at a time. ``x``, ``g``: ``(N, *input)`` batch first.
    ``stats``: for ``kind`` ``"layer"`` (mean, rstd) and ``"rms"`` (None, rstd),
    shaped ``(N, *lead, 1, ...)``; ``"group"`` ``(N, groups)`` each; ``"channel"``
    ``(N, C)`` (instance statistics) or ``(C,)`` (running statistics)."""
    n = x.shape[0]
    last = kind in ("layer", "rms")
    d = math.prod(shape) if last else x.shape[1]
    x3, g3 = x.reshape(n, -1, d) if last else x.reshape(n, d, -1), g.reshape(n, -1, d) if last else g.reshape(n, d, -1)
    mean, rstd = _flat_stats(kind, tuple(None if t is None else t.to(acc) for t in stats), n, d)  # type: ignore[arg-type]
    step = max(1, CHUNK_ELEMS // max(1, x3[0].numel()))
    per = _last if last else _channel
    if step >= n:
        got = per(x3, g3, mean, rstd, want, acc, scales)
    else:
        parts = []
        for s in range(0, n, step):
            sl = slice(s, min(n, s + step))
            m_, r_ = (mean, rstd) if rstd.shape[0] != n else (None if mean is None else mean[sl], rstd[sl])  # running: shared
            parts.append(per(x3[sl], g3[sl], m_, r_, want, acc, scales))
        got = _joined(parts)
    shaped = (lambda t: None if t is None else t.reshape(t.shape[0], *shape)) if last else (lambda t: t)
    return Grads(shaped(got.dw), shaped(got.db), None if got.mw is None else got.mw.reshape(shape), None if got.mb is None else got.mb.reshape(shape))


def _joined(parts: list[Grads]) -> Grads:
    """Blocks of samples: per-sample tensors concatenated, scales summed."""
    def cat(ts: list[Tensor | None]) -> Tensor | None:
        return None if ts[0] is None else torch.cat([t for t in ts if t is not None])

    def total(ts: list[Tensor | None]) -> Tensor | None:
        out = ts[0]
        for t in ts[1:]:
            out = out if t is None or out is None else out + t
        return out

    return Grads(cat([q.dw for q in parts]), cat([q.db for q in parts]), total([q.mw for q in parts]), total([q.mb for q in parts]))


def _flat_stats(kind: str, stats: Stats, n: int, d: int) -> tuple[Tensor | None, Tensor]:
    """``(mean, rstd)`` as ``(N, L)`` (``"last"`` layout) or ``(N or 1, C)``."""
    mean, rstd = stats
    if kind in ("layer", "rms"):
        return (None if mean is None else mean.reshape(n, -1)), rstd.reshape(n, -1)
    assert mean is not None, "group and instance statistics carry a mean"
    if kind == "group":
        per = d // rstd.shape[-1]
        return mean.repeat_interleave(per, 1), rstd.repeat_interleave(per, 1)  # (N, C): small
    if rstd.dim() == 1:
        return mean.reshape(1, -1), rstd.reshape(1, -1)
    return mean, rstd


def _channel(x: Tensor, g: Tensor, mean: Tensor | None, rstd: Tensor, want: tuple[bool, bool], acc: torch.dtype, scales: bool) -> Grads:
    """``(b, C, T)`` inputs, statistics ``(b or 1, C)``. ``sum_t G (x - mean) rstd =
    rstd (sum_t G x - mean sum_t G)``: one product and two sums per element, the form
    PyTorch's own group-norm backward uses (an element that is its group's only
    one gives exactly 0: ``x == mean``)."""
    xa, ga = x.to(acc), g.to(acc)
    need_p = want[0] or scales
    p = torch.mul(xa, ga) if need_p else None
    gs = ga.sum(-1)
    out = Grads(db=gs if want[1] else None)
    if want[0]:
        out.dw = torch.sub(p.sum(-1), mean * gs).mul_(rstd)  # type: ignore[union-attr, operator]
    if scales:
        gabs = ga.abs().sum(-1)
        out.mw = (p.abs_().sum(-1).add_(mean.abs() * gabs).mul_(rstd)).sum(0)  # type: ignore[union-attr]
        out.mb = gabs.sum(0)
    return out


def _last(x: Tensor, g: Tensor, mean: Tensor | None, rstd: Tensor, want: tuple[bool, bool], acc: torch.dtype, scales: bool) -> Grads:
    """``(b, L, D)`` inputs, statistics ``(b, L)`` (``mean`` ``None``: RMS norm). The
    sums over the ``L`` rows are batched matrix products: ``dw = rstd^T ((x - mean)
    * G)``, ``db = 1^T G``. Centred before the product, not ``rstd^T (x G) - (mean
    rstd)^T G``: a constant row (``x == mean``) then gives exactly 0, where the
    cancellation would leave rounding noise amplified by ``rstd``."""
    b, rows, d = x.shape
    xa, ga = x.to(acc), g.to(acc)
    out = Grads()
    q = None
    if want[0] or scales:
        q = torch.mul(xa, ga) if mean is None else torch.sub(xa, mean.unsqueeze(-1)).mul_(ga)
    if rows == 1:
        if want[0]:
            out.dw = torch.mul(q[:, 0], rstd)  # type: ignore[index]
        if want[1]:
            out.db = ga[:, 0].clone()
    else:
        if want[0]:
            out.dw = torch.bmm(rstd.unsqueeze(1), q).squeeze(1)  # type: ignore[arg-type]
        if want[1]:
            out.db = torch.bmm(torch.ones_like(rstd).unsqueeze(1), ga).squeeze(1)
    if scales:
        # PyTorch's backward forms x * rstd - mean * rstd: its rounding scales with
        # (|x| + |mean|) |G| <= (|x - mean| + 2 |mean|) |G|.
        gabs = ga.abs().reshape(b * rows, d)
        out.mw = (rstd.reshape(1, -1) @ q.abs_().reshape(b * rows, d)).reshape(d)  # type: ignore[union-attr]
        if mean is not None:
            out.mw.add_(((mean.abs() * rstd).mul_(2).reshape(1, -1) @ gabs).reshape(d))
        out.mb = gabs.sum(0)
    return out


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
