"""Normalization layers: ``y = xhat * w + b`` with ``xhat`` the input normalized by
statistics of the sample itself (LayerNorm, RMSNorm, GroupNorm, InstanceNorm) or
by fixed running statistics (InstanceNorm and BatchNorm in eval mode).

Sample n's gradients are ``dw = sum_t G_nt * xhat_nt`` and ``db = sum_t G_nt``,
summed over the positions ``t`` that share a parameter element: the leading
dims for LayerNorm/RMSNorm (whose parameters cover the trailing
``normalized_shape``), the dims after the channel for the others (``(N, C, *)``
inputs, parameters ``(C,)``). ``xhat`` is recomputed from the captured input in
float32 or better, as PyTorch computes it (biased variance, ``eps`` inside the
square root; RMSNorm's ``eps=None`` is the machine epsilon of float32, or of
float64 for float64 inputs).

The per-sample gradients are ``(N, *p.shape)``, no larger than one sample's input
times N, so norms, clipped sums and dot products are reduced from them a block
of samples at a time; ``xhat`` is built once per call and block.

BatchNorm normalizing with batch statistics (training mode, or eval mode without
running statistics) couples the samples of a batch, so its rule refuses it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from ..capture import Call
from ..registry import register_rule
from ..rule import Rule, accumulation_dtype, long_sum_slack, squared_norms_of

#: Temporaries are built a block of samples at a time, at most this many elements.
CHUNK_ELEMS = 1 << 24


def _position_sum(t: Tensor, shape: torch.Size, layout: str, acc: torch.dtype) -> Tensor:
    """``(b, *input) -> (b, *shape)``: sum over the positions sharing a parameter
    element (leading dims for ``"last"``, dims after the channel for ``"channel"``)."""
    b = t.shape[0]
    if layout == "last":
        return t.reshape(b, -1, math.prod(shape)).sum(1, dtype=acc).reshape(b, *shape)
    return t.reshape(b, shape[0], -1).sum(2, dtype=acc)


def _operand(t: Tensor, acc: torch.dtype) -> Tensor:
    """``t`` as an operand of an in-place op on an ``acc`` tensor (cast only if wider)."""
    return t if torch.promote_types(t.dtype, acc) == acc else t.to(acc)


def _standardized(x: Tensor, dims: int | tuple[int, ...], eps: float, acc: torch.dtype) -> Tensor:
    """``(x - mean) / sqrt(var + eps)`` over ``dims`` (biased variance), a new ``acc`` tensor."""
    xa = x.to(acc)
    var, mean = torch.var_mean(xa, dims, correction=0, keepdim=True)
    return torch.sub(xa, mean).mul_(torch.rsqrt(var.add_(eps)))


def _by_running_stats(x: Tensor, mean: Tensor, var: Tensor, eps: float, acc: torch.dtype) -> Tensor:
    """``(x - mean[c]) / sqrt(var[c] + eps)`` for ``x: (b, C, *)``, a new ``acc`` tensor."""
    shape = (1, -1, *([1] * (x.dim() - 2)))
    scale = torch.rsqrt(var.to(acc) + eps).reshape(shape)
    return torch.sub(x.to(acc), mean.to(acc).reshape(shape)).mul_(scale)


class _AffineNormRule(Rule):
    """Shared math of the normalization rules: subclasses give ``normalized``."""

    #: Where the parameters sit in the input: trailing dims, or the channel dim 1.
    layout: ClassVar[Literal["last", "channel"]]

    def normalized(self, module: nn.Module, x: Tensor, acc: torch.dtype, training: bool) -> Tensor:
        """``xhat`` of a block of samples ``x`` ``(b, *input)``, as a new ``acc`` tensor;
        ``training``: the module's mode when the call ran (not at exit)."""
        raise NotImplementedError

    def _blocks(
        self, module: nn.Module, calls: Sequence[Call], names: Sequence[str]
    ) -> Iterator[tuple[slice, dict[str, Tensor]]]:
        """Blocks of samples with their raw gradients ``{name: (b, *p.shape)}`` summed
        over ``calls``, in float32+."""
        acc = accumulation_dtype(module.get_parameter(names[0]).dtype)
        n = calls[0].grad.shape[0]
        step = max(1, CHUNK_ELEMS // max(1, max(c.grad[0].numel() for c in calls)))
        for s in range(0, n, step):
            sl = slice(s, min(n, s + step))
            got: dict[str, Tensor] = {}
            for call in calls:
                g = call.grad[sl]
                for name in names:
                    shape = module.get_parameter(name).shape
                    if name == "weight":
                        xg = self.normalized(module, call.input[sl], acc, call.memo.get("training", module.training))
                        xg = xg.mul_(_operand(g, acc))
                        t = _position_sum(xg, shape, self.layout, acc)
                    else:
                        t = _position_sum(g, shape, self.layout, acc)
                    got[name] = t if name not in got else got[name].add_(t)
            yield sl, got

    def per_sample(self, module: nn.Module, calls: Sequence[Call], names: Sequence[str]) -> dict[str, Tensor]:
        parts: dict[str, list[Tensor]] = {name: [] for name in names}
        for _, got in self._blocks(module, calls, names):
            for name in names:
                parts[name].append(got[name].to(module.get_parameter(name).dtype))
        return {name: torch.cat(ts) if len(ts) > 1 else ts[0] for name, ts in parts.items()}

    def squared_norms(self, module: nn.Module, calls: Sequence[Call], names: Sequence[str]) -> dict[str, Tensor]:
        parts: dict[str, list[Tensor]] = {name: [] for name in names}
        for _, got in self._blocks(module, calls, names):
            for name in names:
                parts[name].append(squared_norms_of(got[name]))
        return {name: torch.cat(ts) for name, ts in parts.items()}

    def weighted_sum(
        self, module: nn.Module, calls: Sequence[Call], names: Sequence[str], weights: Tensor
    ) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for sl, got in self._blocks(module, calls, names):
            for name in names:
                w = weights[sl].to(device=got[name].device, dtype=got[name].dtype)
                t = torch.tensordot(w, got[name], dims=1)
                out[name] = t if name not in out else out[name].add_(t)
        return out

    def dots(
        self, module: nn.Module, calls: Sequence[Call], names: Sequence[str], others: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        parts: dict[str, list[Tensor]] = {name: [] for name in names}
        for _, got in self._blocks(module, calls, names):
            for name in names:
                t = got[name]
                parts[name].append(t.flatten(1) @ others[name].to(device=t.device, dtype=t.dtype).reshape(-1))
        return {name: torch.cat(ts) for name, ts in parts.items()}

    def magnitudes(self, module: nn.Module, calls: Sequence[Call], names: Sequence[str]) -> dict[str, Tensor]:
        """Per parameter element c, the terms ``G * xhat`` (or ``G``) summed over samples
        and positions have ``sum |term| <= ||G_c|| ||xhat_c||`` (``||G_c|| sqrt(rows)``);
        the result is the norm of that bound over the elements, summed over calls."""
        acc = accumulation_dtype(module.get_parameter(names[0]).dtype)
        out: dict[str, Tensor] = {}
        for call in calls:
            n = call.grad.shape[0]
            step = max(1, CHUNK_ELEMS // max(1, call.grad[0].numel()))
            g_sq: dict[str, Tensor] = {}
            x_sq: Tensor | None = None
            for s in range(0, n, step):
                g = call.grad[s : s + step]
                for name in names:
                    shape = module.get_parameter(name).shape
                    t = _position_sum(g.to(acc).square(), shape, self.layout, acc).sum(0)
                    g_sq[name] = t if name not in g_sq else g_sq[name].add_(t)
                if "weight" in names:
                    xhat = self.normalized(module, call.input[s : s + step], acc, call.memo.get("training", module.training)).square_()
                    t = _position_sum(xhat, module.get_parameter("weight").shape, self.layout, acc).sum(0)
                    x_sq = t if x_sq is None else x_sq.add_(t)
            for name in names:
                shape = module.get_parameter(name).shape
                rows = call.grad.numel() // math.prod(shape)  # samples x positions per element
                if name == "weight":
                    assert x_sq is not None
                    bound = (g_sq[name] * x_sq).sum().sqrt()
                else:
                    bound = (g_sq[name].sum() * rows).sqrt()
                bound = bound * long_sum_slack(rows)  # the backward's sequential sums
                out[name] = bound if name not in out else out[name] + bound
        return out


@register_rule(nn.LayerNorm)
class LayerNormRule(_AffineNormRule):
    """``nn.LayerNorm``: mean and biased variance over the trailing ``normalized_shape``."""

    layout = "last"

    def normalized(self, module: nn.Module, x: Tensor, acc: torch.dtype, training: bool) -> Tensor:
        dims = tuple(range(-len(module.normalized_shape), 0))
        return _standardized(x, dims, module.eps, acc)


@register_rule(nn.RMSNorm)
class RMSNormRule(_AffineNormRule):
    """``nn.RMSNorm``: ``x / sqrt(mean(x^2) + eps)`` over the trailing ``normalized_shape``."""

    layout = "last"

    def normalized(self, module: nn.Module, x: Tensor, acc: torch.dtype, training: bool) -> Tensor:
        eps = module.eps
        if eps is None:  # PyTorch: machine epsilon of the computation (opmath) type
            eps = torch.finfo(torch.float64 if x.dtype == torch.float64 else torch.float32).eps
        dims = tuple(range(-len(module.normalized_shape), 0))
        xa = x.to(acc)
        count = math.prod(module.normalized_shape)
        mean_sq = torch.linalg.vector_norm(xa, 2, dims, keepdim=True).square_().div_(count)
        return torch.mul(xa, torch.rsqrt(mean_sq.add_(eps)))


@register_rule(nn.GroupNorm)
class GroupNormRule(_AffineNormRule):
    """``nn.GroupNorm``: statistics over each group of ``C / groups`` channels and all
    positions of a sample; input ``(N, C, *)``."""

    layout = "channel"

    def normalized(self, module: nn.Module, x: Tensor, acc: torch.dtype, training: bool) -> Tensor:
        grouped = x.reshape(x.shape[0], module.num_groups, -1)
        return _standardized(grouped, -1, module.eps, acc).reshape(x.shape)


@register_rule(_InstanceNorm)
class InstanceNormRule(_AffineNormRule):
    """``nn.InstanceNorm1d/2d/3d``: statistics of each sample and channel over its
    positions (training mode, or ``track_running_stats=False``), else the running
    statistics; input ``(N, C, *)``."""

    layout = "channel"

    def normalized(self, module: nn.Module, x: Tensor, acc: torch.dtype, training: bool) -> Tensor:
        if training or not module.track_running_stats:
            per_channel = x.reshape(x.shape[0], x.shape[1], -1)
            return _standardized(per_channel, -1, module.eps, acc).reshape(x.shape)
        return _by_running_stats(x, module.running_mean, module.running_var, module.eps, acc)


@register_rule(_BatchNorm)
class BatchNormRule(_AffineNormRule):
    """``nn.BatchNorm1d/2d/3d`` and ``nn.SyncBatchNorm`` in eval mode with running
    statistics; input ``(N, C, *)``."""

    layout = "channel"

    def refuse(self, module: nn.Module) -> str | None:
        if module.training:
            return (
                "BatchNorm in training mode normalizes with the statistics of the whole batch, "
                "which couple the samples of a batch, so per-sample gradients do not exist (for "
                "this layer's parameters and for every layer before it, even if it is frozen); "
                "call .eval() on it (it then uses its running statistics) or use GroupNorm, "
                "LayerNorm or InstanceNorm instead"
            )
        if module.running_mean is None and module.running_var is None:
            return (
                "BatchNorm with track_running_stats=False normalizes with the statistics of the "
                "whole batch even in eval mode, which couple the samples of a batch, so "
                "per-sample gradients do not exist; use track_running_stats=True and .eval(), or "
                "GroupNorm, LayerNorm or InstanceNorm instead"
            )
        return None

    def normalized(self, module: nn.Module, x: Tensor, acc: torch.dtype, training: bool) -> Tensor:
        return _by_running_stats(x, module.running_mean, module.running_var, module.eps, acc)
