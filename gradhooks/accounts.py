"""The two backends of a result's queries: the same three operations (squared
norms, weighted sums, dot products) from the captures or from materialized
tensors, in per-sample units.

Captured results are raw (gradients of the reduced, possibly GradScaler-scaled
loss); one factor, ``unit = (N for "mean", 1 for "sum") / loss scale``, turns
them into per-sample gradients, applied here and nowhere else.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor

from . import sites
from .rule import accumulation_dtype, squared_norms_of
from .sites import Covered

__all__ = ["Account", "Captured", "Materialized"]


class Account:
    """Queries over per-sample gradients ``g[name]`` ``(N, *p.shape)``."""

    def squared_norms(self) -> dict[str, Tensor]:
        """``{name: (N,)}``, float32+."""
        raise NotImplementedError

    def weighted_sums(self, weights: Tensor, names: Sequence[str],
                      out: dict[str, Tensor | None] | None = None) -> dict[str, Tensor]:
        """``{name: sum_n weights[n] g[name][n]}`` (float32+), added into ``out`` if given
        (``None`` entries: fresh buffers, which the account may replace); with ``out``,
        the result is ``out`` itself, every entry in ``names`` filled in."""
        raise NotImplementedError

    def dots(self, others: dict[str, Tensor]) -> dict[str, Tensor]:
        """``{name: (N,)}``: ``<g[name][n], others[name]>``."""
        raise NotImplementedError


class Captured(Account):
    """From the captured inputs and output gradients (``materialize=False``)."""

    def __init__(self, covered: Sequence[Covered], n: int, unit: float, groups: Sequence[Any] = ()) -> None:
        self.covered = list(covered)
        self.by_name = {c.name: c for c in self.covered}
        self.n = n
        self.unit = unit
        self.groups = list(groups)  # stacked layers of equal shapes (gradhooks.stacking)

    def squared_norms(self) -> dict[str, Tensor]:
        got = sites.squared_norms(self.covered, self.n, self.groups)
        u2 = self.unit * self.unit
        return {k: v * u2 if u2 != 1.0 else v for k, v in got.items()}

    def weighted_sums(self, weights: Tensor, names: Sequence[str],
                      out: dict[str, Tensor | None] | None = None) -> dict[str, Tensor]:
        chosen = [self.by_name[k] for k in names]
        raw = weights * self.unit if self.unit != 1.0 else weights
        groups = self.groups if len(chosen) == len(self.covered) else ()
        return sites.weighted_sums(chosen, raw, out, groups)

    def dots(self, others: dict[str, Tensor]) -> dict[str, Tensor]:
        got = sites.dots(self.covered, others, self.n)
        return {k: v * self.unit if self.unit != 1.0 else v for k, v in got.items()}


class Materialized(Account):
    """From the per-sample tensors (``materialize=True``)."""

    def __init__(self, tensors: dict[str, Tensor]) -> None:
        self.tensors = tensors

    def squared_norms(self) -> dict[str, Tensor]:
        return {k: squared_norms_of(t) for k, t in self.tensors.items()}

    def weighted_sums(self, weights: Tensor, names: Sequence[str],
                      out: dict[str, Tensor | None] | None = None) -> dict[str, Tensor]:
        result: dict[str, Tensor | None] = {} if out is None else out
        for k in names:
            t = self.tensors[k]
            acc = accumulation_dtype(t.dtype)
            target = result.get(k)
            if target is None:
                target = result[k] = torch.zeros(t.shape[1:], dtype=acc, device=t.device)
            w = weights.to(device=t.device, dtype=target.dtype)
            flat = t.reshape(t.shape[0], math.prod(t.shape[1:]))
            if t.dtype == target.dtype:
                target.view(-1).addmv_(flat.T, w)
            else:
                target.add_(torch.tensordot(w, t.to(target.dtype), dims=1))
        return cast("dict[str, Tensor]", result)  # every entry in names is a tensor now

    def dots(self, others: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for k, v in others.items():
            t = self.tensors[k]
            acc = accumulation_dtype(t.dtype)
            out[k] = t.reshape(t.shape[0], math.prod(t.shape[1:])).to(acc) @ v.to(device=t.device, dtype=acc).reshape(-1)
        return out
