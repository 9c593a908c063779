"""``nn.Linear``: ``C = X W^T + b`` with ``X: (N, *, i)``, ``C: (N, *, o)``.

Sample n's weight gradient is ``G_n^T X_n`` summed over the extra positions
``t`` (Goodfellow 2015); its bias gradient is ``sum_t G_nt``.

Without materializing, the squared norm of ``G_n^T X_n`` is
``||g_n||^2 ||x_n||^2`` when there is one position, and otherwise either the
Gram form ``<X_n X_n^T, G_n G_n^T>`` (cost ``T^2 (i + o)`` per sample) or the
materialized ``(o, i)`` matrix (cost ``T i o``), whichever is cheaper. Calls
are pooled along ``t`` (``sum_c G_c^T X_c`` is one product over the
concatenated positions), which gives the cross terms of repeated calls and
tied weights exactly. The clipped sum is ``(c * G)^T X``: one matmul.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..capture import Call
from ..registry import register_rule
from ..rule import Rule, accumulation_dtype

#: Temporaries are built a block of samples at a time, at most this many elements.
CHUNK_ELEMS = 1 << 24


def _xg(call: Call, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The call's input and output gradient as ``(N, T, i)`` and ``(N, T, o)``."""
    x, g = call.input, call.grad
    n = g.shape[0]
    return x.reshape(n, -1, x.shape[-1]).to(dtype), g.reshape(n, -1, g.shape[-1]).to(dtype)


def _pooled(calls: Sequence[Call], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """All calls' ``X`` and ``G`` concatenated along positions: ``(N, sum T, i/o)``."""
    pairs = [_xg(c, dtype) for c in calls]
    if len(pairs) == 1:
        return pairs[0]
    return torch.cat([x for x, _ in pairs], 1), torch.cat([g for _, g in pairs], 1)


def _weight_squared_norms(x: Tensor, g: Tensor) -> Tensor:
    """``(N, T, i), (N, T, o) -> (N,)``: ``||G_n^T X_n||_F^2``, cheapest exact form."""
    n, t, i = x.shape
    o = g.shape[-1]
    if t == 1:
        return x.square().sum((1, 2)) * g.square().sum((1, 2))
    use_gram = t * t * (i + o) <= t * i * o
    per_sample = 2 * t * t if use_gram else i * o
    rows = max(1, CHUNK_ELEMS // per_sample)
    out = []
    for s in range(0, n, rows):
        xb, gb = x[s : s + rows], g[s : s + rows]
        if use_gram:
            out.append(torch.einsum("nts,nts->n", torch.bmm(xb, xb.transpose(1, 2)), torch.bmm(gb, gb.transpose(1, 2))))
        else:
            w = torch.bmm(gb.transpose(1, 2), xb)
            out.append(torch.einsum("noi,noi->n", w, w))
    return torch.cat(out)


@register_rule(nn.Linear)
class LinearRule(Rule):
    """Per-sample gradients of ``nn.Linear`` (and subclasses)."""

    def per_sample(self, module: nn.Module, calls: Sequence[Call], names: Sequence[str]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for name in names:
            dtype = module.get_parameter(name).dtype
            acc: Tensor | None = None
            for call in calls:
                x, g = _xg(call, dtype)
                if name == "weight":
                    if x.shape[1] == 1:
                        t = g[:, 0, :, None] * x[:, 0, None, :]
                    elif acc is not None:
                        acc.baddbmm_(g.transpose(1, 2), x)
                        continue
                    else:
                        t = torch.bmm(g.transpose(1, 2), x)
                else:
                    t = g.sum(1)
                acc = t if acc is None else acc.add_(t)
            assert acc is not None  # calls is never empty
            out[name] = acc
        return out

    def squared_norms(self, module: nn.Module, calls: Sequence[Call], names: Sequence[str]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for name in names:
            acc = accumulation_dtype(module.get_parameter(name).dtype)
            if name == "weight":
                out[name] = _weight_squared_norms(*_pooled(calls, acc))
            else:
                b = sum(_xg(c, acc)[1].sum(1) for c in calls)
                out[name] = b.square().sum(1)
        return out

    def weighted_sum(
        self, module: nn.Module, calls: Sequence[Call], names: Sequence[str], weights: Tensor
    ) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for name in names:
            acc = accumulation_dtype(module.get_parameter(name).dtype)
            total: Tensor | None = None
            for call in calls:
                x, g = _xg(call, acc)
                w = weights.to(device=g.device, dtype=acc)[:, None, None]
                if name == "weight":
                    # Scale the narrower of X and G: (c G)^T X == G^T (c X).
                    if g.shape[-1] <= x.shape[-1]:
                        g = g * w
                    else:
                        x = x * w
                    t = g.reshape(-1, g.shape[-1]).T @ x.reshape(-1, x.shape[-1])
                else:
                    t = (g * w).sum((0, 1))
                total = t if total is None else total.add_(t)
            assert total is not None
            out[name] = total
        return out

    def dots(
        self, module: nn.Module, calls: Sequence[Call], names: Sequence[str], others: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for name in names:
            acc = accumulation_dtype(module.get_parameter(name).dtype)
            v = others[name].to(acc)
            total: Tensor | None = None
            for call in calls:
                x, g = _xg(call, acc)
                # <G_n^T X_n, M> = sum_t g_t^T M x_t; bias: <sum_t g_t, b>.
                t = torch.einsum("nti,nti->n", g @ v, x) if name == "weight" else g.sum(1) @ v
                total = t if total is None else total + t
            assert total is not None
            out[name] = total
        return out

    def probe(
        self, module: nn.Module, calls: Sequence[Call], names: Sequence[str], vectors: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for name in names:
            acc = accumulation_dtype(module.get_parameter(name).dtype)
            v = vectors[name].to(acc)
            total: Tensor | None = None
            for call in calls:
                x, g = _xg(call, acc)
                g2 = g.reshape(-1, g.shape[-1])
                # weight: (sum_n G_n^T X_n) v = G^T (X v); bias: (sum G) v.
                t = g2.T @ (x.reshape(-1, x.shape[-1]) @ v) if name == "weight" else g2.sum(0)[:, None] @ v
                total = t if total is None else total.add_(t)
            assert total is not None
            out[name] = total
        return out

    def magnitudes(self, module: nn.Module, calls: Sequence[Call], names: Sequence[str]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for name in names:
            acc = accumulation_dtype(module.get_parameter(name).dtype)
            terms = []
            for call in calls:
                x, g = _xg(call, acc)
                gn = torch.linalg.vector_norm(g)
                if name == "weight":
                    terms.append(gn * torch.linalg.vector_norm(x))
                else:
                    terms.append(gn * (g.shape[0] * g.shape[1]) ** 0.5)
            out[name] = torch.stack(terms).sum()
        return out

    def can_pool(self, module: nn.Module, other: nn.Module, name: str) -> bool:
        # Any two Linear layers use a tied weight (or bias) the same way.
        return True
