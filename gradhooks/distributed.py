"""The few collectives per-sample clipping needs, for DDP and for FSDP2.

DistributedDataParallel (every rank runs it)::

    with ddp.no_sync(), per_sample_grads(ddp) as g:   # no_sync: skip DDP's
        loss_fn(ddp(x), y).backward()                  # unclipped all-reduce
    g.clip_(max_norm)                                  # one all-reduce
    optimizer.step()

``clip_`` all-reduces, in one flat buffer per dtype, each rank's
``grad_before_context / world + sum_n c_n g_n / N_global`` (``"mean"``; for
``"sum"`` nothing divides the clipped sum), after a tiny all-reduce of the
local batch sizes and a non-finite flag, so that every rank raises together or
none does. Without ``no_sync`` DDP's own all-reduce runs during backward
(its result is what ``p.grad`` holds until ``clip_``), and the exit self-check
compares against the world average.

FSDP2 (``fully_shard``, see :mod:`gradhooks.fsdp`): a :class:`ShardedWorld`.
``clip_`` makes the same tiny all-reduce, then, a bucket of parameters at a
time, one reduce-scatter of the ranks' clipped sums (full shape, float32 or
better) straight into each rank's shard: ``p.grad`` (a DTensor shard) becomes
``grad_before_context + its shard of the global clipped sum``. No rank ever
holds more than one bucket of full-shape gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

if TYPE_CHECKING:
    from .accounts import Account

__all__ = ["World", "ShardedWorld", "ShardLayout", "world_of"]


class World:
    """The process group of a ``DistributedDataParallel`` model."""

    def __init__(self, group: dist.ProcessGroup | None, device: torch.device) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.device = device

    def sum_(self, tensors: Sequence[Tensor]) -> None:
        """All-reduce (sum) ``tensors`` in place, one flat buffer per dtype."""
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for group in by_dtype.values():
            flat = torch.cat([t.reshape(-1).to(self.device) for t in group])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
            offset = 0
            for t in group:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()

    def any_(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any rank."""
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item() > 0)


@dataclass(frozen=True)
class ShardLayout:
    """How one parameter's gradient is split over the ranks (FSDP2's layout).

    ``dim``: the sharded dimension (``Shard(dim)``); ``local_size``: this rank's
    shard (dimension 0 may be short or empty on the last ranks); ``grad_of``:
    a local shard -> the tensor to store as ``p.grad`` (a DTensor)."""

    dim: int
    local_size: torch.Size
    grad_of: Callable[[Tensor], Tensor]


class ShardedWorld(World):
    """The shard group of an FSDP2 model: ``clip_`` reduce-scatters into ``p.grad``.

    ``layouts``: per covered name; ``bucket_numel``: how many full-shape gradient
    elements one reduce-scatter may hold (the largest FSDP parameter group's, so
    that clip_ never holds more than FSDP's own backward does)."""

    def __init__(self, group: dist.ProcessGroup | None, device: torch.device, layouts: dict[str, ShardLayout], bucket_numel: int) -> None:
        super().__init__(group, device)
        self.layouts = layouts
        self.bucket_numel = max(1, bucket_numel)

    def buckets(self, names: Sequence[str], params: dict[str, nn.Parameter]) -> list[list[str]]:
        """``names`` cut into consecutive runs of at most ``bucket_numel`` elements
        (at least one parameter each): key order is kept, so the noise drawn per
        parameter follows the same generator sequence as on one process."""
        out: list[list[str]] = []
        size = 0
        for name in names:
            numel = params[name].numel()
            if out and size + numel <= self.bucket_numel:
                out[-1].append(name)
                size += numel
            else:
                out.append([name])
                size = numel
        return out

    def reduce_scatter(self, full: Sequence[Tensor], layouts: Sequence[ShardLayout]) -> list[Tensor]:
        """Sum the ranks' full-shape ``full`` tensors (one dtype) and return this rank's
        shards, in one reduce-scatter: each rank's input holds, rank by rank, every
        tensor's chunk for that rank, padded in dimension 0 as FSDP2 pads it."""
        w = self.size
        rows = []
        for t, lay in zip(full, layouts, strict=True):
            if lay.dim != 0:  # FSDP2 shards Shard(dim > 0) evenly: chunks stacked along dim 0
                t = torch.cat(torch.chunk(t, w, dim=lay.dim), 0)
            pad = math.ceil(t.shape[0] / w) * w - t.shape[0]
            if pad:
                t = torch.cat([t, t.new_zeros(pad, *t.shape[1:])])
            rows.append(t.reshape(w, -1))
        flat = torch.cat(rows, 1).to(self.device)
        out = flat.new_empty(flat.shape[1])
        reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor  # renamed in torch 2.13
        reduce_scatter(out, flat.reshape(-1), op=dist.ReduceOp.SUM, group=self.group)
        shards, offset = [], 0
        for r, lay in zip(rows, layouts, strict=True):
            shards.append(out[offset : offset + math.prod(lay.local_size)].view(lay.local_size))
            offset += r.shape[1]
        return shards

    def write_clipped(self, account: Account, params: dict[str, nn.Parameter], before: dict[str, Tensor | None],
                      weights: Tensor, *, noise_std: float = 0.0, generator: torch.Generator | None = None) -> None:
        """``p.grad := before + shard of (sum over ranks of sum_n weights[n] g_n + z)``
        for every covered parameter; ``z ~ N(0, noise_std^2)`` of the full shape is
        drawn on rank 0 only (per parameter in key order, as one process draws it)."""
        from .clip import gaussian_like  # clip imports this module

        for bucket in self.buckets(list(params), params):
            sums: dict[str, Any] = account.weighted_sums(weights, bucket)
            if noise_std > 0 and self.rank == 0:
                for name in bucket:
                    sums[name].add_(gaussian_like(params[name], noise_std, generator).to(sums[name].dtype))
            by_dtype: dict[torch.dtype, list[str]] = {}
            for name in bucket:
                by_dtype.setdefault(sums[name].dtype, []).append(name)
            for names in by_dtype.values():
                shards = self.reduce_scatter([sums.pop(k) for k in names], [self.layouts[k] for k in names])
                for name, shard in zip(names, shards, strict=True):
                    _write_shard(params[name], self.layouts[name], before.get(name), shard)


def _local(t: Tensor) -> Tensor:
    to_local = getattr(t, "to_local", None)  # a DTensor's local shard
    if not callable(to_local):
        return t
    local = to_local()
    assert isinstance(local, Tensor)
    return local


def _write_shard(p: nn.Parameter, layout: ShardLayout, prior: Tensor | None, shard: Tensor) -> None:
    """``p.grad := prior + shard`` in ``p.dtype``, into the existing local tensor
    where there is one (optimizers may hold it)."""
    new = shard if prior is None else shard + _local(prior).to(device=shard.device, dtype=shard.dtype)
    grad = p.grad
    local = _local(grad) if grad is not None else None
    if local is not None and local.shape == new.shape and local.dtype == p.dtype:
        local.copy_(new)
    else:
        p.grad = layout.grad_of(new.to(p.dtype).contiguous())


def world_of(model: nn.Module) -> World | None:
    """The :class:`World` of a DDP model, or ``None`` for any other module."""
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(model, DistributedDataParallel):
        return None
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    if dist.get_backend(model.process_group) == "gloo":
        device = torch.device("cpu")
    return World(model.process_group, device)
