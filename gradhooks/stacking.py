"""Layers of equal shapes, computed together.

A deep network of equal-width linear layers (50 layers of 300 features) pays,
per layer and per query, a dozen small tensor operations whose Python and
dispatch cost is as large as their arithmetic. At exit (``materialize=False``)
the calls of linear sites that have the same shapes are stacked once into one
``X`` ``(L, N, T, in)`` and one ``G`` ``(L, N, T, out)`` per group (the calls
keep views into them, so no memory is added once the originals are freed),
and the norms and clipped sums of a whole group are one batched operation
each: ``||G_n^T X_n||^2`` over ``L * N`` "samples" (the same exact forms as
:mod:`gradhooks.rules.linear`), ``(c G)^T X`` as one ``bmm``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .capture import Call
from .rule import accumulation_dtype
from .rules.linear import LinearRule, _weight_squared_norms
from .sites import Site

__all__ = ["Group", "compact"]

#: Groups are formed only where at least this many layers share a shape.
MIN_GROUP = 3
#: ... and only for layers whose ``X`` and ``G`` together are at most this many
#: elements: stacking copies the captures, which for large ones costs more than
#: the per-layer overhead it saves (docs/measurements.md).
MAX_LAYER_ELEMS = 2**17


@dataclass(eq=False)
class Group:
    """Linear sites with one call each and equal shapes: ``x`` ``(L, N, T, in)``,
    ``g`` ``(L, N, T, out)`` in their captured dtypes."""

    sites: list[Site]
    x: Tensor
    g: Tensor

    def squared_norms(self, acc: torch.dtype) -> dict[int, dict[str, Tensor]]:
        """``{id(site): {local: (N,)}}``."""
        lay, n, t, i = self.x.shape
        o = self.g.shape[-1]
        x = self.x.reshape(lay * n, t, i).to(acc)
        g = self.g.reshape(lay * n, t, o).to(acc)
        out: dict[int, dict[str, Tensor]] = {id(s): {} for s in self.sites}
        if any("weight" in s.names for s in self.sites):
            w = _weight_squared_norms(x, g).view(lay, n)
            for k, s in enumerate(self.sites):
                if "weight" in s.names:
                    out[id(s)]["weight"] = w[k]
        if any("bias" in s.names for s in self.sites):
            b = torch.linalg.vector_norm(g[:, 0] if t == 1 else g.sum(1), dim=1).square_().view(lay, n)
            for k, s in enumerate(self.sites):
                if "bias" in s.names:
                    out[id(s)]["bias"] = b[k]
        return out

    def weighted_sums(self, weights: Tensor, acc: torch.dtype) -> dict[int, dict[str, Tensor]]:
        """``{id(site): {local: sum_n weights[n] raw_n}}`` (weight ``(out, in)``, bias ``(out,)``)."""
        lay, n, t, i = self.x.shape
        o = self.g.shape[-1]
        w = weights.to(device=self.g.device, dtype=acc)
        x = self.x.reshape(lay, n * t, i).to(acc)
        g = self.g.reshape(lay, n * t, o).to(acc)
        rows = w.repeat_interleave(t) if t > 1 else w
        out: dict[int, dict[str, Tensor]] = {id(s): {} for s in self.sites}
        if any("weight" in s.names for s in self.sites):
            # (c G)^T X == G^T (c X): scale the narrower one.
            if o <= i:
                ws = torch.bmm((g * rows[None, :, None]).transpose(1, 2), x)
            else:
                ws = torch.bmm(g.transpose(1, 2), x * rows[None, :, None])
            for k, s in enumerate(self.sites):
                if "weight" in s.names:
                    out[id(s)]["weight"] = ws[k]
        if any("bias" in s.names for s in self.sites):
            bs = torch.matmul(rows, g)  # (L, out)
            for k, s in enumerate(self.sites):
                if "bias" in s.names:
                    out[id(s)]["bias"] = bs[k]
        return out


#: ``(N, T, in, out, x dtype, g dtype, device, accumulation dtype)``
_Key = tuple[int, int, int, int, torch.dtype, torch.dtype, torch.device, torch.dtype]


def _eligible(site: Site) -> _Key | None:
    """The group key of a site that can be stacked, or ``None``."""
    if type(site.rule) is not LinearRule or site.module_level or len(site.calls) != 1:
        return None
    if not all(site.chains[local].identity for local in site.names):
        return None
    call = site.calls[0]
    if not call.has_grad or call.batch_size == 0 or call._input is None:
        return None
    x, g = call.input, call.grad
    n, t = g.shape[0], math.prod(g.shape[1:-1])
    if x.dim() < 2 or x.shape[0] != n or math.prod(x.shape[1:-1]) != t:
        return None
    if n * t * (x.shape[-1] + g.shape[-1]) > MAX_LAYER_ELEMS:
        return None
    return (n, t, x.shape[-1], g.shape[-1], x.dtype, g.dtype, x.device, accumulation_dtype(site.module.get_parameter(site.names[0]).dtype))


def compact(sites: Sequence[Site]) -> list[Group]:
    """Stack the eligible linear sites' captures into groups (the calls then hold
    views into the stacks)."""
    by_key: dict[_Key, list[Site]] = {}
    for site in sites:
        key = _eligible(site)
        if key is not None:
            by_key.setdefault(key, []).append(site)
    groups = []
    for (n, t, i, o, *_), members in by_key.items():
        if len(members) < MIN_GROUP:
            continue
        x = torch.stack([s.calls[0].input.reshape(n, t, i) for s in members])
        g = torch.stack([s.calls[0].grad.reshape(n, t, o) for s in members])
        for k, s in enumerate(members):
            old = s.calls[0]
            new = Call.of(x[k], [g[k]], {key: v for key, v in old.memo.items() if isinstance(key, str) and not key.startswith("~")})
            new.versions = old.versions
            s.calls[0] = new
        groups.append(Group(members, x, g))
    return groups
