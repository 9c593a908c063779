"""``nn.Embedding``: ``C[n, t] = W[I[n, t]]`` with ``I: (N, *)`` integer indices,
``W: (V, D)`` and ``C: (N, *, D)``.

Sample n's weight gradient is ``sum_t e_{I_nt} G_nt^T``: its output gradient
rows index-added at its indices, ``(V, D)``; rows at ``padding_idx`` get none.
``max_norm`` renormalizes rows of ``W`` in place during the forward and leaves
this gradient as it is; ``sparse=True`` only changes the layout of ``p.grad``.

Indices that do not depend on the batch (position ids ``arange(T)``) give a
batch-independent output; its gradient is taken where it meets the batch (see
:mod:`gradhooks.trace.derive`), never here.

Without materializing, the squared norm of sample n's gradient is
``sum_v ||sum_{t: I_nt = v} G_nt||^2``, computed either as the token-equality Gram
form ``sum_{t,s} [I_t = I_s] <G_t, G_s>`` (cost ``T^2 D`` per sample, one ``bmm``)
or by sorting the ``(sample, index)`` keys and summing the rows of each repeated
key (cost ``T log T + T D``), whichever is cheaper for ``T``. Calls (and
Embeddings sharing the weight) are pooled along ``t``, which gives their cross
terms exactly.

``scale_grad_by_freq=True`` divides by frequencies over the whole batch, which
couples the samples: refused while the weight is trainable (a frozen one has no
gradient to couple).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ..capture import Call
from ..registry import register_rule
from ..rule import CHUNK_ELEMS, Rule, accumulation_dtype

#: The Gram form is used while ``T <= GRAM_MAX_T`` positions per sample (pooled
#: over calls), the grouping form above (``T^2 D`` against ``T D`` plus a sort;
#: the crossover is measured in docs/measurements.md).
GRAM_MAX_T = 32


def _indices_grads(call: Call, acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """The call's indices ``(N, T)`` (batch-1 indices expanded to N) and output
    gradient ``(N, T, D)`` in ``acc``."""
    g = call.grad
    n, d = g.shape[0], g.shape[-1]
    idx = call.input
    if idx.shape[0] != n:  # one index tensor shared by the batch
        idx = idx.expand(n, *idx.shape[1:])
    t = math.prod(idx.shape[1:])
    return idx.reshape(n, t), g.reshape(n, t, d).to(acc)


def _rows(idx: Tensor, g: Tensor, padding_idx: int | None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """``(b, T)`` indices and ``(b, T, D)`` gradients as flat rows (views, no copy):
    ``(sample (M,), index (M,), gradient (M, D), keep (M,) or None)``, where
    ``keep`` is false at ``padding_idx`` (those rows add nothing to the weight)."""
    b, t = idx.shape
    sample = torch.arange(b, device=idx.device).repeat_interleave(t)
    index = idx.reshape(-1)
    keep = None if padding_idx is None else index != padding_idx
    return sample, index, g.reshape(b * t, -1), keep


def _zero_padding(t: Tensor, keep: Tensor | None) -> Tensor:
    """``t`` (``(M, ...)``, a fresh tensor) with the padding rows set to exactly zero."""
    if keep is not None:
        t.masked_fill_(~keep.reshape(-1, *([1] * (t.dim() - 1))), 0)
    return t


def _sample_blocks(calls: Sequence[Call], per_sample_elems: int) -> Iterator[slice]:
    """Slices of the batch whose temporaries stay under ``CHUNK_ELEMS``."""
    n = calls[0].grad.shape[0]
    step = max(1, CHUNK_ELEMS // max(1, per_sample_elems))
    for s in range(0, n, step):
        yield slice(s, min(n, s + step))


def squared_norms_gram(idx: Tensor, g: Tensor, padding_idx: int | None) -> Tensor:
    """``(N, T), (N, T, D) -> (N,)``: ``sum_{t,s} [I_t = I_s != pad] <G_t, G_s>``."""
    out = []
    step = max(1, CHUNK_ELEMS // max(1, 2 * idx.shape[1] ** 2))
    for s in range(0, idx.shape[0], step):
        ib, gb = idx[s : s + step], g[s : s + step]
        same = ib[:, :, None] == ib[:, None, :]
        if padding_idx is not None:
            same &= (ib != padding_idx)[:, :, None]
        gram = torch.bmm(gb, gb.transpose(1, 2))
        out.append((gram * same).sum((1, 2)))
    return torch.cat(out)


def squared_norms_grouped(idx: Tensor, g: Tensor, padding_idx: int | None, num_rows: int) -> Tensor:
    """``(N, T), (N, T, D) -> (N,)`` for indices below ``num_rows``: sort the
    ``(sample, index)`` keys; a row alone in its group adds ``||G_t||^2``, the rows of
    a repeated group are summed first (only they are copied)."""
    n, _ = idx.shape
    out = torch.zeros(n, dtype=g.dtype, device=g.device)
    step = max(1, CHUNK_ELEMS // max(1, g[0].numel()))
    for s in range(0, n, step):
        sample, index, rows, keep = _rows(idx[s : s + step], g[s : s + step], padding_idx)
        keys, order = torch.sort(sample * num_rows + index)
        _, group, counts = torch.unique_consecutive(keys, return_inverse=True, return_counts=True)
        repeated = counts[group] > 1  # (M,), in sorted order
        sq = _zero_padding(torch.linalg.vector_norm(rows, dim=1).square(), keep)
        block = out[s : s + step]
        block.index_add_(0, sample[order], sq[order].masked_fill_(repeated, 0))
        if keep is not None:
            repeated &= keep[order]
        where = order[repeated]
        first, grp = torch.unique_consecutive(group[repeated], return_inverse=True)
        sums = torch.zeros(first.shape[0], rows.shape[1], dtype=rows.dtype, device=rows.device)
        sums.index_add_(0, grp, rows.index_select(0, where))
        owner = torch.zeros(first.shape[0], dtype=sample.dtype, device=sample.device)
        owner.index_copy_(0, grp, sample[where])
        block.index_add_(0, owner, torch.linalg.vector_norm(sums, dim=1).square())
    return out


class LookupModule(Protocol):
    """What the rule reads of its ``module``: a lookup's arguments under
    ``nn.Embedding``'s attribute names (built by :mod:`gradhooks.uses.embedding`)."""

    weight: Tensor
    padding_idx: int | None
    num_embeddings: int

    def get_parameter(self, name: str) -> Tensor: ...


@register_rule(nn.Embedding)
class EmbeddingRule(Rule):
    """Per-sample gradients of a lookup in a weight: ``F.embedding``, ``weight[ids]``.
    ``module``: ``weight``, ``padding_idx``, ``num_embeddings``."""

    by_ops = True
    subclass_forward_ok = False

    def refuse(self, module: nn.Module) -> str | None:
        if getattr(module, "scale_grad_by_freq", False) and module.weight.requires_grad:
            return (
                "Embedding(scale_grad_by_freq=True) divides each row's gradient by how often its "
                "index occurs in the whole batch, which couples the samples of a batch, so "
                "per-sample gradients do not exist; use scale_grad_by_freq=False or freeze the "
                "embedding (weight.requires_grad_(False))"
            )
        return None

    def per_sample(self, module: LookupModule, calls: Sequence[Call], names: Sequence[str]) -> dict[str, Tensor]:
        p = module.get_parameter("weight")
        n = calls[0].grad.shape[0]
        out = torch.zeros((n, *p.shape), dtype=p.dtype, device=p.device)
        self._fill(module, calls, out)
        return {"weight": out}

    def per_sample_into(
        self,
        module: LookupModule,
        calls: Sequence[Call],
        names: Sequence[str],
        out: dict[str, Tensor],
        accumulate: dict[str, bool],
    ) -> None:
        if not accumulate.get("weight"):
            out["weight"].zero_()
        self._fill(module, calls, out["weight"])

    def _fill(self, module: LookupModule, calls: Sequence[Call], out: Tensor) -> None:
        """Add each sample's gradient into ``out`` ``(N, V, D)``, a block of samples at
        a time (accumulated in float32+, written in ``out.dtype``)."""
        _, v, d = out.shape
        acc = accumulation_dtype(out.dtype)
        pad = module.padding_idx
        pairs = [_indices_grads(call, acc) for call in calls]
        direct = out.dtype == acc
        for sl in _sample_blocks(calls, v * d):
            block = out[sl] if direct else torch.zeros_like(out[sl], dtype=acc)
            flat = block.view(-1, d)
            for idx, g in pairs:
                sample, index, rows, keep = _rows(idx[sl], g[sl], pad)
                if keep is not None:
                    rows = _zero_padding(rows.clone(), keep)
                flat.index_add_(0, sample * v + index, rows)
            if not direct:
                out[sl].add_(block)

    def squared_norms(self, module: LookupModule, calls: Sequence[Call], names: Sequence[str]) -> dict[str, Tensor]:
        acc = accumulation_dtype(module.get_parameter("weight").dtype)
        pairs = [_indices_grads(c, acc) for c in calls]
        idx = torch.cat([i for i, _ in pairs], 1) if len(pairs) > 1 else pairs[0][0]
        g = torch.cat([g for _, g in pairs], 1) if len(pairs) > 1 else pairs[0][1]
        pad = module.padding_idx
        if idx.shape[1] == 1:
            sq = torch.linalg.vector_norm(g[:, 0], dim=1).square()
            out = sq if pad is None else sq.masked_fill_(idx[:, 0] == pad, 0)
        elif idx.shape[1] <= GRAM_MAX_T:
            out = squared_norms_gram(idx, g, pad)
        else:
            out = squared_norms_grouped(idx, g, pad, module.num_embeddings)
        return {"weight": out}

    def weighted_sum_into(
        self,
        module: LookupModule,
        calls: Sequence[Call],
        names: Sequence[str],
        weights: Tensor,
        out: dict[str, Tensor],
    ) -> None:
        target = out["weight"]
        w = weights.to(device=target.device, dtype=target.dtype)
        for call in calls:
            idx, g = _indices_grads(call, target.dtype)
            for sl in _sample_blocks([call], g[0].numel()):
                sample, index, rows, keep = _rows(idx[sl], g[sl], module.padding_idx)
                target.index_add_(0, index, _zero_padding(rows * w[sl][sample, None], keep))

    def dots(
        self, module: LookupModule, calls: Sequence[Call], names: Sequence[str], others: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        acc = accumulation_dtype(module.get_parameter("weight").dtype)
        m = others["weight"].to(acc)
        n = calls[0].grad.shape[0]
        out = torch.zeros(n, dtype=acc, device=m.device)
        for call in calls:
            idx, g = _indices_grads(call, acc)
            for sl in _sample_blocks([call], 2 * g[0].numel()):
                # <sum_t e_{I_t} G_t^T, M> = sum_t <M[I_t], G_t>
                sample, index, rows, keep = _rows(idx[sl], g[sl], module.padding_idx)
                per_row = _zero_padding(torch.einsum("md,md->m", m.index_select(0, index), rows), keep)
                out[sl].index_add_(0, sample, per_row)
        return {"weight": out}

    def can_pool(self, module: LookupModule, other: Any, name: str) -> bool:
        # Tied lookups pool when they treat the same rows as padding.
        return getattr(other, "padding_idx", None) == module.padding_idx
