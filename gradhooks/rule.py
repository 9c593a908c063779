"""The interface every per-sample rule implements.

A rule is pure math: recorded calls in, per-sample tensors (or squared norms,
or a weighted sum) out. Batch-size checks, the ``"mean"`` rescale, dtypes of
the results, tied weights and repeated calls live once, in the core.

Einsum letters, used in every rule: ``n`` batch, ``t`` extra positions
(flattened ``*`` dims of a sequence, or output positions of a conv), ``o`` out
features / channels, ``i`` in features / channels (times kernel size).

Every method receives ``module`` (the module, for a rule registered with
:func:`gradhooks.register_rule`; for a built-in op rule, an object with the
op's arguments under the module's attribute names), ``calls`` (the recorded
calls that received a gradient, see :class:`gradhooks.Call`; batch first) and
``names`` (the local parameter names to compute; ``module.get_parameter(name)``
finds each). All results are of the *raw* gradient: ``G`` exactly as autograd
delivered it for the reduced loss, summed over the calls.

Required: :meth:`per_sample`. Optional, where an exact form cheaper than
building ``(N, *p.shape)`` exists: :meth:`squared_norms`,
:meth:`weighted_sum_into`, :meth:`dots` (what ``materialize=False`` runs).
Used only by the exit self-check of a module-level rule: :meth:`probe`,
:meth:`magnitudes`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .capture import Call

__all__ = ["Rule", "accumulation_dtype", "squared_norms_of", "long_sum_slack", "CHUNK_ELEMS"]

#: Temporaries of every rule are built a block of samples at a time, at most
#: this many elements.
CHUNK_ELEMS = 1 << 24

#: Rows are reduced in blocks of this many elements: float32 ``vector_norm`` over
#: one very long row drifts (~1e-3 relative at 25M elements); over blocks, then
#: over the block norms, it stays ~1e-7 and keeps its speed.
NORM_BLOCK = 1024


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64, float32 for every lower precision (bf16, fp16, float32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def long_sum_slack(terms: float) -> float:
    """Factor by which a rule's ``magnitudes`` widens for a gradient that backward
    sums from ``terms`` values per parameter element: PyTorch's CPU kernels
    accumulate such sums in long sequential runs, so their float32 error grows
    like ``sqrt(terms)``. Returns ``sqrt(terms)`` (1 for a single term)."""
    return max(1.0, float(terms)) ** 0.5


def squared_norms_of(per_sample: Tensor) -> Tensor:
    """``(N, *shape) -> (N,)``: per-sample sum of squares, float32-or-better accumulation."""
    n = per_sample.shape[0]
    flat = per_sample.reshape(n, math.prod(per_sample.shape[1:]))
    acc = accumulation_dtype(flat.dtype)
    cast = None if flat.dtype == acc else acc
    k = flat.shape[1]
    if k <= NORM_BLOCK:
        return torch.linalg.vector_norm(flat, dim=1, dtype=cast).square()
    main = k - k % NORM_BLOCK
    blocks = torch.linalg.vector_norm(flat[:, :main].unflatten(1, (-1, NORM_BLOCK)), dim=2, dtype=cast)
    total = blocks.square().sum(1)
    if main < k:
        total = total + torch.linalg.vector_norm(flat[:, main:], dim=1, dtype=cast).square()
    return total


class Rule:
    """Per-sample gradient math for one module family.

    Subclass it, implement :meth:`per_sample`, and register it with
    :func:`gradhooks.register_rule`.
    """

    #: The library's own rules for module types it handles per op (``nn.Linear``'s
    #: parameters are captured at each ``F.linear``), not through a module hook.
    by_ops: ClassVar[bool] = False
    #: Whether a subclass of a registered type that overrides ``forward`` may
    #: still use this rule (by default it is handled by how it uses its parameters).
    subclass_forward_ok: ClassVar[bool] = False
    #: True when the rule accepts a batch-1 input shared by the whole batch; the
    #: core then expands the module's output to ``(N, ...)``.
    broadcast_batch: ClassVar[bool] = False

    def refuse(self, module: nn.Module) -> str | None:
        """Why per-sample gradients do not exist for ``module`` as configured (e.g.
        BatchNorm in training mode), or ``None``. Checked on entry for every module."""
        return None

    def per_sample(self, module: Any, calls: Sequence[Call], names: Sequence[str]) -> dict[str, Tensor]:
        """``{name: (N, *p.shape)}``: each sample's raw gradient summed over ``calls``."""
        raise NotImplementedError(f"{type(self).__name__} must implement per_sample()")

    def per_sample_into(
        self, module: Any, calls: Sequence[Call], names: Sequence[str], out: dict[str, Tensor], accumulate: dict[str, bool]
    ) -> None:
        """Write (or, where ``accumulate[name]``, add) :meth:`per_sample` into
        ``out[name]`` (``(N, *p.shape)``): warm storage of a reused result."""
        got = self.per_sample(module, calls, names)
        for name in names:
            if accumulate.get(name):
                out[name].add_(got[name])
            else:
                out[name].copy_(got[name])

    def squared_norms(self, module: Any, calls: Sequence[Call], names: Sequence[str]) -> dict[str, Tensor]:
        """``{name: (N,)}``: squared L2 norm of each sample's raw gradient (cross terms
        between calls included), float32 or float64. Default: from :meth:`per_sample`."""
        return {name: squared_norms_of(self.per_sample(module, calls, [name])[name]) for name in names}

    def weighted_sum_into(
        self, module: Any, calls: Sequence[Call], names: Sequence[str], weights: Tensor, out: dict[str, Tensor]
    ) -> None:
        """Add ``sum_n weights[n] * raw_n`` into ``out[name]`` in place (``p.shape``,
        float32+; ``weights``: ``(N,)``). ``clip_`` writes through it straight into
        ``p.grad``. Default: contract :meth:`per_sample` (or an overridden
        :meth:`weighted_sum`)."""
        if type(self).weighted_sum is not Rule.weighted_sum:
            got = self.weighted_sum(module, calls, names, weights)
            for name in names:
                out[name].add_(got[name].to(out[name].dtype))
            return
        for name in names:
            t = self.per_sample(module, calls, [name])[name]
            target = out[name]
            target.add_(torch.tensordot(weights.to(device=t.device, dtype=target.dtype), t.to(target.dtype), dims=1))

    def weighted_sum(self, module: Any, calls: Sequence[Call], names: Sequence[str], weights: Tensor) -> dict[str, Tensor]:
        """``{name: p.shape}``: ``sum_n weights[n] * raw_n``, float32+ (allocates, then
        :meth:`weighted_sum_into`)."""
        out = {}
        for name in names:
            p = module.get_parameter(name)
            out[name] = torch.zeros(p.shape, dtype=accumulation_dtype(p.dtype), device=p.device)
        self.weighted_sum_into(module, calls, names, weights, out)
        return out

    def dots(self, module: Any, calls: Sequence[Call], names: Sequence[str], others: dict[str, Tensor]) -> dict[str, Tensor]:
        """``{name: (N,)}``: ``<raw_n, others[name]>`` for each sample, float32+."""
        out = {}
        for name in names:
            t = self.per_sample(module, calls, [name])[name]
            acc = accumulation_dtype(t.dtype)
            v = others[name].to(device=t.device, dtype=acc).reshape(-1)
            out[name] = t.reshape(t.shape[0], -1).to(acc) @ v
        return out

    # -- the exit self-check of a module-level rule -----------------------------

    def probe(self, module: Any, calls: Sequence[Call], names: Sequence[str], vectors: dict[str, Tensor]) -> dict[str, Tensor]:
        """``{name: (shape[0], k)}``: ``S.reshape(shape[0], -1) @ vectors[name]`` where
        ``S = sum_n raw_n``: what the exit check compares with ``p.grad`` along a few
        random directions. Default: from the full sum."""
        out = {}
        for name in names:
            ones = torch.ones(calls[0].grad.shape[0], device=module.get_parameter(name).device)
            s = self.weighted_sum(module, calls, [name], ones)[name]
            rows = s.shape[0] if s.dim() >= 1 and s.shape[0] > 0 else 1
            out[name] = s.reshape(rows, -1) @ vectors[name].to(s.dtype)
        return out

    def magnitudes(self, module: Any, calls: Sequence[Call], names: Sequence[str]) -> dict[str, Tensor]:
        """``{name: scalar}``: the scale of the terms backward summed, for the check's
        rounding tolerance: ``sum_n ||raw_n||`` times :func:`long_sum_slack` of N."""
        sq = self.squared_norms(module, calls, names)
        return {name: sq[name].sqrt().sum() * long_sum_slack(sq[name].shape[0]) for name in names}

    def can_pool(self, module: Any, other: Any, name: str) -> bool:
        """Whether the calls of ``other`` may be passed to this rule together with
        those of ``module`` for ``name`` (tied weights, repeated uses). Default: no."""
        return False
