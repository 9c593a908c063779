"""Poisson sampling: each example in a batch independently with probability ``q``.

:class:`PoissonBatchSampler` is the sampler the accountants analyse (fixed-size
shuffled batches are not). :func:`split` cuts one logical batch into physical
micro-batches; :func:`shard` gives a process its part of a batch drawn
identically on every process, so that the union over processes is exactly one
Poisson batch of the whole dataset.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Sampler

from ..errors import InvalidArgumentError

__all__ = ["PoissonBatchSampler", "split", "shard"]


class PoissonBatchSampler(Sampler[list[int]]):
    """Batches of Poisson sampling: each index in ``range(dataset_size)`` is
    included independently with probability ``sample_rate``.

    Batch sizes vary (mean ``sample_rate * dataset_size``) and a batch may be
    empty (probability ``(1 - q)^dataset_size``, about ``exp(-expected size)``);
    take the DP step anyway (:func:`~gradhooks.privacy.add_noise_` alone). Yields
    ``steps`` lists of indices (default ``round(1 / sample_rate)``: one epoch in
    expectation). Use as ``DataLoader(ds, batch_sampler=...)`` (whose default
    collate cannot stack an empty batch: handle it before) or index tensors
    directly. ``generator``: a CPU ``torch.Generator`` for reproducible batches;
    each batch draws ``torch.rand(dataset_size)`` from it (as Opacus' sampler
    does, so the same generator state gives the same batches).
    """

    def __init__(
        self,
        dataset_size: int,
        sample_rate: float,
        *,
        steps: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if isinstance(dataset_size, bool) or not isinstance(dataset_size, int) or dataset_size < 1:
            raise InvalidArgumentError(f"PoissonBatchSampler: dataset_size must be a positive int, got {dataset_size!r}")
        ok = isinstance(sample_rate, (int, float)) and not isinstance(sample_rate, bool)
        if not ok or not 0 < sample_rate <= 1:
            raise InvalidArgumentError(
                f"PoissonBatchSampler: sample_rate must be in (0, 1], got {sample_rate!r} "
                "(expected batch size / dataset_size)"
            )
        if steps is None:
            steps = max(1, round(1 / sample_rate))
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise InvalidArgumentError(f"PoissonBatchSampler: steps must be a positive int or None, got {steps!r}")
        if generator is not None and torch.device(generator.device).type != "cpu":
            raise InvalidArgumentError("PoissonBatchSampler: generator must be a CPU torch.Generator")
        self.dataset_size = dataset_size
        self.sample_rate = float(sample_rate)
        self.steps = steps
        self.generator = generator

    @property
    def expected_batch_size(self) -> float:
        """``sample_rate * dataset_size``: the divisor of the DP step."""
        return self.sample_rate * self.dataset_size

    def draw(self) -> Tensor:
        """One Poisson batch: the sorted int64 indices of the included examples."""
        keep = torch.rand(self.dataset_size, generator=self.generator) < self.sample_rate
        return keep.nonzero().flatten()

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            yield self.draw().tolist()

    def state_dict(self) -> dict[str, Any]:
        """The generator's state (``torch.load(weights_only=True)`` loads it)."""
        state = self.generator.get_state() if self.generator is not None else torch.random.get_rng_state()
        return {"dataset_size": self.dataset_size, "sample_rate": self.sample_rate, "generator": state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the batch sequence saved by :meth:`state_dict`."""
        if state.get("dataset_size") != self.dataset_size or state.get("sample_rate") != self.sample_rate:
            raise InvalidArgumentError(
                f"PoissonBatchSampler.load_state_dict: saved for dataset_size={state.get('dataset_size')}, "
                f"sample_rate={state.get('sample_rate')}; this sampler has {self.dataset_size}, {self.sample_rate}"
            )
        if self.generator is not None:
            self.generator.set_state(state["generator"])
        else:
            torch.random.set_rng_state(state["generator"])


def split(indices: Tensor, max_size: int | None) -> list[Tensor]:
    """Physical micro-batches of at most ``max_size`` (``None``: one), sizes within one of
    each other, in order; ``[]`` for an empty batch."""
    n = len(indices)
    if n == 0:
        return []
    if max_size is None or n <= max_size:
        return [indices]
    return list(indices.tensor_split(math.ceil(n / max_size)))


def shard(indices: Tensor, rank: int, world_size: int) -> Tensor:
    """This process's contiguous share of a batch drawn identically on every process
    (shares differ in size by at most one)."""
    return indices.tensor_split(world_size)[rank]
