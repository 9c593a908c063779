"""DistributedDataParallel: the few collectives per-sample clipping needs.

Pattern (every rank runs it)::

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
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["World", "world_of"]


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
