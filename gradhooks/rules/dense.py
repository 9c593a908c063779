"""Uses whose per-sample gradient is computed when backward reaches them and kept.

Two kinds of use give a per-sample gradient no larger than the output gradient
that backward hands over, so it is cheaper to keep it than ``X`` and ``G``:

* a tensor combined elementwise with the batch (RMSNorm's ``weight * x``, a
  layer scale, ``x + pos_embed``, a cls token concatenated to the batch): the
  tracer replaces the operand ``c`` by ``c`` expanded along the batch dimension,
  so the gradient that arrives for it *is* the per-sample gradient,
  ``(N, *c.shape)``;
* normalization layers: ``sum_t G * xhat`` and ``sum_t G`` per sample
  (:mod:`gradhooks.rules.normalization`).

Each site holds one :class:`~gradhooks.capture.Call` whose ``grads`` are the
accumulated per-sample tensors of its local names (``memo["names"]`` gives the
order); repeated calls add into them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..capture import Call
from ..errors import InvalidArgumentError
from ..rule import Rule, accumulation_dtype, squared_norms_of

__all__ = ["DenseRule", "DENSE"]


def _value(calls: Sequence[Call], name: str) -> Tensor:
    total: Tensor | None = None
    for call in calls:
        names = call.memo["names"]
        if name not in names:
            continue
        t = call.grads[names.index(name)]
        if t is None:
            continue
        total = t if total is None else total + t
    if total is None:
        raise InvalidArgumentError(f"no per-sample gradient was recorded for {name!r}")
    return total


class DenseRule(Rule):
    """Per-sample gradients recorded as they are."""

    def per_sample(self, module: Any, calls: Sequence[Call], names: Sequence[str]) -> dict[str, Tensor]:
        return {name: _value(calls, name).to(module.get_parameter(name).dtype) for name in names}

    def squared_norms(self, module: Any, calls: Sequence[Call], names: Sequence[str]) -> dict[str, Tensor]:
        return {name: squared_norms_of(_value(calls, name)) for name in names}

    def weighted_sum_into(
        self, module: Any, calls: Sequence[Call], names: Sequence[str], weights: Tensor, out: dict[str, Tensor]
    ) -> None:
        for name in names:
            t = _value(calls, name)
            target = out[name]
            target.add_(torch.tensordot(weights.to(device=t.device, dtype=target.dtype), t.to(target.dtype), dims=1))

    def dots(self, module: Any, calls: Sequence[Call], names: Sequence[str], others: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for name in names:
            t = _value(calls, name)
            acc = accumulation_dtype(t.dtype)
            out[name] = t.reshape(t.shape[0], -1).to(acc) @ others[name].to(device=t.device, dtype=acc).reshape(-1)
        return out

    def can_pool(self, module: Any, other: Any, name: str) -> bool:
        return True


DENSE = DenseRule()
