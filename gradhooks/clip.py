"""Clipping and noise: from per-sample norms to a new ``p.grad``.

Norms are computed separately from clipping (as ``torch.nn.utils`` splits
``clip_grad_norm_``): :func:`clip_factors` turns norms into factors with
``clamp`` (no host round trip), :func:`write_clipped` writes
``p.grad = before + (sum_n c_n g_n + z) / D`` for every covered parameter,
straight into ``p.grad``'s memory where its dtype allows. Under DDP the sums
of all ranks are added in one all-reduce (:mod:`gradhooks.distributed`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .accounts import Account
from .distributed import ShardedWorld
from .errors import InvalidArgumentError
from .rule import accumulation_dtype

if TYPE_CHECKING:
    from .distributed import World

__all__ = ["CLIP_EPS", "clip_factors", "gaussian_like", "add_gaussian_", "write_clipped", "write_grads", "poison_grads"]

#: Added to each norm before dividing, as in ``torch.nn.utils.clip_grad_norm_``.
CLIP_EPS = 1e-6


def check_max_norm(max_norm: float) -> None:
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or math.isnan(max_norm) or max_norm <= 0:
        raise InvalidArgumentError(f"clip_: max_norm must be a positive number, got {max_norm!r}")


def global_counts(world: Any, n: int, bad: int) -> tuple[float, float]:
    """``(samples, samples with a non-finite norm)`` over all ranks (collective when
    ``world`` is a process group: every rank learns of another's bad sample)."""
    if world is None:
        return float(n), float(bad)
    info = torch.tensor([float(n), float(bad)], dtype=torch.float64)
    world.sum_([info])
    total, bads = info.tolist()
    return total, bads


def clip_factors(norms: Tensor, max_norm: float) -> Tensor:
    """``c_n = min(1, max_norm / (norm_n + 1e-6))``."""
    return (max_norm / (norms + CLIP_EPS)).clamp(max=1.0)


def gaussian_like(p: Tensor, std: float, generator: torch.Generator | None) -> Tensor:
    """``N(0, std^2)`` of ``p.shape`` on ``p.device``, drawn in float32 (float64 for
    float64 ``p``) from ``generator`` (PyTorch's global one when ``None``)."""
    z = torch.randn(p.shape, generator=generator, device=p.device, dtype=accumulation_dtype(p.dtype))
    return z.mul_(std)


def add_gaussian_(params: Iterable[Tensor], std: float, generator: torch.Generator | None) -> None:
    """``p.grad += gaussian_like(p, std, generator)`` for each ``p`` in order
    (``p.grad`` of ``None`` counts as zeros)."""
    with torch.no_grad():
        for p in params:
            z = gaussian_like(p, std, generator)
            if p.grad is None:
                p.grad = z.to(p.dtype)
            else:
                p.grad.add_(z.to(p.grad.dtype))


def _buffers(params: dict[str, nn.Parameter], before: dict[str, Tensor | None]) -> dict[str, Tensor | None]:
    """Per parameter a float32+ buffer holding ``before``: ``p.grad`` itself where
    its dtype and layout allow (no temporary of the parameter's size); ``None`` where
    there is neither a ``p.grad`` nor a ``before`` (the account allocates, or hands
    over a result it already has)."""
    out: dict[str, Tensor | None] = {}
    for name, p in params.items():
        acc = accumulation_dtype(p.dtype)
        grad = p.grad
        prior = before.get(name)
        if grad is None and prior is None:
            out[name] = None
            continue
        if grad is not None and not grad.is_sparse and grad.dtype == acc and grad.shape == p.shape and grad.is_contiguous():
            buf = grad
        else:
            buf = torch.empty(p.shape, dtype=acc, device=p.device)
        if prior is None:
            buf.zero_()
        else:
            buf.copy_(prior.to_dense() if prior.is_sparse else prior)
        out[name] = buf
    return out


def write_clipped(
    account: Account,
    params: dict[str, nn.Parameter],
    before: dict[str, Tensor | None],
    weights: Tensor,
    *,
    noise_std: float = 0.0,
    generator: torch.Generator | None = None,
    world: World | None = None,
    sparse: Sequence[str] = (),
) -> None:
    """``p.grad := before + sum_n weights[n] g_n (+ N(0, noise_std^2))`` for every
    parameter in ``params`` (``weights`` already hold ``c_n / D`` and any loss
    scale). Under DDP each rank adds ``before / world + its sum`` and one
    all-reduce gives every rank the total; the noise is drawn on rank 0 only."""
    names = list(params)
    with torch.no_grad():
        if isinstance(world, ShardedWorld):  # FSDP2: reduce-scatter into each rank's shard
            world.write_clipped(account, params, before, weights, noise_std=noise_std, generator=generator)
            return
        if world is None:
            # The account fills in the None entries and hands the same dict back.
            bufs = account.weighted_sums(weights, names, _buffers(params, before))
            if noise_std > 0:
                for name in names:
                    bufs[name].add_(gaussian_like(params[name], noise_std, generator).to(bufs[name].dtype))
        else:
            bufs = account.weighted_sums(weights, names)
            for name in names:
                if noise_std > 0 and world.rank == 0:
                    bufs[name].add_(gaussian_like(params[name], noise_std, generator).to(bufs[name].dtype))
                prior = before.get(name)
                if prior is not None:
                    dense = prior.to_dense() if prior.is_sparse else prior
                    bufs[name].add_(dense.to(device=bufs[name].device, dtype=bufs[name].dtype) / world.size)
            world.sum_(list(bufs.values()))
        write_grads(params, bufs, sparse)


def write_grads(params: dict[str, nn.Parameter], new: dict[str, Tensor], sparse: Sequence[str] = ()) -> None:
    """``p.grad := new[name]`` in ``p.dtype``, keeping ``p.grad``'s identity where it
    exists (DDP bucket views, optimizers) and its sparse layout."""
    with torch.no_grad():
        for name, p in params.items():
            t = new.get(name)
            if t is None or t is p.grad:
                continue
            t = t.to(p.dtype)
            if (p.grad is not None and p.grad.is_sparse) or (p.grad is None and name in sparse):
                p.grad = t.to_sparse(sparse_dim=1)
            elif p.grad is not None and p.grad.shape == p.shape and p.grad.dtype == p.dtype:
                p.grad.copy_(t)
            else:
                p.grad = t


def poison_grads(params: dict[str, nn.Parameter]) -> None:
    """``p.grad := nan``: an overflow a GradScaler must see (its step is skipped)."""
    with torch.no_grad():
        for p in params.values():
            if p.grad is None:
                p.grad = torch.full_like(p, float("nan"))
            else:
                p.grad.fill_(float("nan"))
