"""The interface every per-sample rule implements.

A rule is pure math: recorded calls in, per-sample tensors (or squared norms,
or a weighted sum) out. Batch-size checks, the ``"mean"`` rescale, dtype of the
results, tied weights and repeated-call bookkeeping live once, in the core.

Einsum letters, used in every rule: ``n`` batch, ``t`` extra positions
(flattened ``*`` dims of a sequence, or output positions of a conv), ``o`` out
features / channels, ``i`` in features / channels (times kernel size).

Every method receives ``calls``: the module's recorded forward calls that
received a gradient (see :class:`gradhooks.Call`), and ``names``: the local
parameter names to compute (``module.get_parameter(name)`` finds each). All
results are of the *raw* gradient: ``G`` exactly as autograd delivered it for
the reduced loss, summed over the calls. The core rescales for
``loss_reduction``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from .capture import Call

__all__ = ["Rule", "accumulation_dtype", "squared_norms_of"]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64, float32 for every lower precision (bf16, fp16, float32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


#: Rows are reduced in blocks of this many elements: float32 ``vector_norm`` over
#: one very long row drifts (~1e-3 relative at 25M elements); over blocks, then
#: over the block norms, it stays ~1e-7 and keeps its speed.
NORM_BLOCK = 1024


def long_sum_slack(terms: float) -> float:
    """Factor by which a rule's ``magnitudes`` widens for a gradient that backward
    sums from ``terms`` values per parameter element (samples, times positions).

    PyTorch's CPU kernels accumulate such sums in long sequential runs (conv and
    norm-layer biases, GEMMs over ``N * T`` rows, ``index_add``), so their float32
    error grows like ``sqrt(terms) * eps * sum |term|``, not ``log(terms)``.
    Measured: conv bias gradients over 64 * 64 * 64 terms off by up to 3.7e-4
    relative (3000 eps). Returns ``sqrt(terms)`` (1 for a single term)."""
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

    Subclass it and implement :meth:`per_sample`; override
    :meth:`squared_norms` and :meth:`weighted_sum` where an exact form cheaper
    than building ``(N, *p.shape)`` exists (that is what ``materialize=False``
    runs). Register it with :func:`gradhooks.register_rule`.
    """

    #: True when the rule accepts a batch-1 input shared by the whole batch
    #: (position ids of shape ``(1, T)``); the core then expands the module's
    #: output to ``(N, ...)`` so that each sample's gradient arrives separately.
    broadcast_batch: ClassVar[bool] = False

    def refuse(self, module: nn.Module) -> str | None:
        """Why per-sample gradients do not exist for ``module`` as configured
        (e.g. BatchNorm in training mode), or ``None``. Checked for every
        module of the model on entry, trainable or not, and at each call."""
        return None

    def per_sample(self, module: nn.Module, calls: Sequence[Call], names: Sequence[str]) -> dict[str, Tensor]:
        """``{name: (N, *p.shape)}``: each sample's raw gradient, summed over ``calls``,
        in the parameter's dtype."""
        raise NotImplementedError(f"{type(self).__name__} must implement per_sample()")

    def per_sample_into(
        self,
        module: nn.Module,
        calls: Sequence[Call],
        names: Sequence[str],
        out: dict[str, Tensor],
        accumulate: dict[str, bool],
    ) -> None:
        """Write :meth:`per_sample` into ``out[name]`` (``(N, *p.shape)``, ``p.dtype``):
        overwrite it, or add to it where ``accumulate[name]`` (a tied parameter's
        second owner). Used when an earlier result's storage is reused
        (``per_sample_grads(..., reuse=g)``): writing into warm memory skips the
        page faults of a fresh allocation. Default: :meth:`per_sample`, then copy.
        """
        got = self.per_sample(module, calls, names)
        for name in names:
            if accumulate.get(name):
                out[name].add_(got[name])
            else:
                out[name].copy_(got[name])

    def squared_norms(
        self, module: nn.Module, calls: Sequence[Call], names: Sequence[str]
    ) -> dict[str, Tensor]:
        """``{name: (N,)}``: squared L2 norm of each sample's raw gradient summed over
        ``calls`` (cross terms between calls included), float32 or float64.

        Default: build the per-sample gradients of this module and reduce them.
        """
        out = {}
        for name in names:
            out[name] = squared_norms_of(self.per_sample(module, calls, [name])[name])
        return out

    def weighted_sum(
        self, module: nn.Module, calls: Sequence[Call], names: Sequence[str], weights: Tensor
    ) -> dict[str, Tensor]:
        """``{name: p.shape}``: ``sum_n weights[n] * raw_n`` (the clipped sum when
        ``weights`` are clip factors), float32 or float64. ``weights``: ``(N,)``.

        Default: build the per-sample gradients of this module and contract them.
        """
        out = {}
        for name in names:
            t = self.per_sample(module, calls, [name])[name]
            acc = accumulation_dtype(t.dtype)
            out[name] = torch.tensordot(weights.to(device=t.device, dtype=acc), t.to(acc), dims=1)
        return out

    def weighted_sum_into(
        self,
        module: nn.Module,
        calls: Sequence[Call],
        names: Sequence[str],
        weights: Tensor,
        out: dict[str, Tensor],
    ) -> None:
        """Add ``sum_n weights[n] * raw_n`` into ``out[name]`` in place (``out[name]``
        has ``p.shape``, float32 or float64). ``clip_`` writes through it straight
        into ``p.grad``, without temporaries. Default: :meth:`weighted_sum`, then add.
        """
        got = self.weighted_sum(module, calls, names, weights)
        for name in names:
            out[name].add_(got[name].to(out[name].dtype))

    def dots(
        self, module: nn.Module, calls: Sequence[Call], names: Sequence[str], others: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        """``{name: (N,)}``: ``<raw_n, others[name]>`` for each sample, float32+.
        ``others[name]`` has ``p.shape``.

        Default: build the per-sample gradients of this module and contract them.
        """
        out = {}
        for name in names:
            t = self.per_sample(module, calls, [name])[name]
            acc = accumulation_dtype(t.dtype)
            v = others[name].to(device=t.device, dtype=acc).reshape(-1)
            out[name] = t.reshape(t.shape[0], -1).to(acc) @ v
        return out

    def probe(
        self, module: nn.Module, calls: Sequence[Call], names: Sequence[str], vectors: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        """``{name: (shape[0], k)}``: ``S.reshape(shape[0], -1) @ vectors[name]`` where
        ``S = sum_n raw_n``; ``vectors[name]`` is ``(prod(shape[1:]), k)``.

        The self-check at exit uses it to compare the rule's account with
        ``p.grad`` along a few random directions. Override it when that is much
        cheaper than :meth:`weighted_sum` (a Linear: ``G^T (X v)``); by default
        the check compares the full sum instead.
        """
        out = {}
        for name in names:
            p = module.get_parameter(name)
            ones = torch.ones(calls[0].grad.shape[0], device=p.device)
            s = self.weighted_sum(module, calls, [name], ones)[name]
            rows = s.shape[0] if s.dim() >= 1 and s.shape[0] > 0 else 1
            out[name] = s.reshape(rows, -1) @ vectors[name].to(s.dtype)
        return out

    def magnitudes(self, module: nn.Module, calls: Sequence[Call], names: Sequence[str]) -> dict[str, Tensor]:
        """``{name: scalar}``: a scale of the terms whose sum backward computed, for the
        rounding tolerance of the self-check at exit (not a result).

        Default: ``sum_n ||raw_n||`` times :func:`long_sum_slack` of N. Rules whose
        per-sample gradient is itself a sum over positions return a bound on the
        norm of those terms instead (times the slack of samples x positions), so a
        gradient that cancels to almost zero is never flagged.
        """
        sq = self.squared_norms(module, calls, names)
        return {name: sq[name].sqrt().sum() * long_sum_slack(sq[name].shape[0]) for name in names}

    def can_pool(self, module: nn.Module, other: nn.Module, name: str) -> bool:
        """Whether the calls of ``other`` may be passed to this rule together with
        those of ``module`` for a parameter both own under local name ``name``
        (tied weights). Pooled calls let :meth:`squared_norms` include the cross
        terms without materializing. Default: no."""
        return False
