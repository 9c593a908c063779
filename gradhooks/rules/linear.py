"""Linear uses of a weight: ``C = X W^T + b`` with ``X: (N, *, i)``, ``C: (N, *, o)``.

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

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..capture import Call
from ..registry import register_rule
from ..rule import CHUNK_ELEMS, Rule, accumulation_dtype, squared_norms_of


def _xg(call: Call, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The call's input and output gradient as ``(N, T, i)`` and ``(N, T, o)``."""
    x, g = call.input, call.grad
    n, t = g.shape[0], math.prod(g.shape[1:-1])  # explicit T: reshape(0, -1, ...) is ambiguous
    return x.reshape(n, t, x.shape[-1]).to(dtype), g.reshape(n, t, g.shape[-1]).to(dtype)


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
    if t == 1:  # norms without squared temporaries
        return torch.linalg.vector_norm(x, dim=(1, 2)).square_().mul_(torch.linalg.vector_norm(g, dim=(1, 2)).square_())
    use_gram = t * t * (i + o) <= t * i * o
    per_sample = 2 * t * t if use_gram else i * o
    rows = max(1, CHUNK_ELEMS // per_sample)
    out = []
    for s in range(0, n, rows):
        xb, gb = x[s : s + rows], g[s : s + rows]
        if use_gram:
            gram = torch.bmm(xb, xb.transpose(1, 2)).mul_(torch.bmm(gb, gb.transpose(1, 2)))
            out.append(gram.sum((1, 2)))
        else:
            out.append(squared_norms_of(torch.bmm(gb.transpose(1, 2), xb)))
    return torch.cat(out)


def _row_sq(call: Call, which: str, t: Tensor) -> Tensor:
    """``(N,)`` per-sample sum of squares of the call's ``x`` or ``g`` (memoized)."""
    key = f"~{which}_sq_{t.dtype}"
    got = call.memo.get(key)
    if got is None:
        got = squared_norms_of(t)
        call.memo[key] = got
    return got


@register_rule(nn.Linear)
class LinearRule(Rule):
    """Per-sample gradients of a linear use of a weight: ``F.linear``, and the
    products the tracer turns into one (``addmm``/``mm``/``matmul`` with a
    batch-independent matrix). ``module.weight``/``module.bias``: the tensors used."""

    by_ops = True
    subclass_forward_ok = True

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

    def per_sample_into(
        self,
        module: nn.Module,
        calls: Sequence[Call],
        names: Sequence[str],
        out: dict[str, Tensor],
        accumulate: dict[str, bool],
    ) -> None:
        for name in names:
            buf, add = out[name], accumulate.get(name, False)
            for call in calls:
                x, g = _xg(call, buf.dtype)
                if name == "weight":
                    beta = 1.0 if add else 0.0  # beta=0 ignores buf's old values
                    torch.baddbmm(buf, g.transpose(1, 2), x, beta=beta, out=buf)
                elif add:
                    buf.add_(g.sum(1))
                else:
                    torch.sum(g, 1, out=buf)
                add = True

    def squared_norms(self, module: nn.Module, calls: Sequence[Call], names: Sequence[str]) -> dict[str, Tensor]:
        acc = accumulation_dtype(module.get_parameter(names[0]).dtype)
        out: dict[str, Tensor] = {}
        single = len(calls) == 1 and _xg(calls[0], acc)[0].shape[1] == 1
        if single:  # one position: ||g||^2 ||x||^2 and ||g||^2, from memoized row norms
            call = calls[0]
            x, g = _xg(call, acc)
            g_sq = _row_sq(call, "g", g)
            for name in names:
                out[name] = g_sq * _row_sq(call, "x", x) if name == "weight" else g_sq
            return out
        for name in names:
            if name == "weight":
                out[name] = _weight_squared_norms(*_pooled(calls, acc))
            else:
                b = _xg(calls[0], acc)[1].sum(1)
                for c in calls[1:]:
                    b = b + _xg(c, acc)[1].sum(1)
                out[name] = b.square().sum(1)
        return out

    def weighted_sum_into(
        self,
        module: nn.Module,
        calls: Sequence[Call],
        names: Sequence[str],
        weights: Tensor,
        out: dict[str, Tensor],
    ) -> None:
        for call in calls:
            x, g = _xg(call, out[names[0]].dtype)
            w = weights.to(device=g.device, dtype=g.dtype)
            if "weight" in names:
                g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
                rows = w.repeat_interleave(x.shape[1]) if x.shape[1] > 1 else w
                if g2.shape[1] <= x2.shape[1]:
                    out["weight"].addmm_((g2 * rows[:, None]).T, x2)
                else:
                    out["weight"].addmm_(g2.T, x2 * rows[:, None])
            if "bias" in names:
                out["bias"].addmv_(g.sum(1).T, w)

    def weighted_sum(self, module: nn.Module, calls: Sequence[Call], names: Sequence[str], weights: Tensor) -> dict[str, Tensor]:
        # The first call's products allocate the results (no zero-filled buffers).
        dtype = accumulation_dtype(module.get_parameter(names[0]).dtype)
        x, g = _xg(calls[0], dtype)
        w = weights.to(device=g.device, dtype=g.dtype)
        out: dict[str, Tensor] = {}
        if "weight" in names:
            g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
            rows = w.repeat_interleave(x.shape[1]) if x.shape[1] > 1 else w
            out["weight"] = (g2 * rows[:, None]).T @ x2 if g2.shape[1] <= x2.shape[1] else g2.T @ (x2 * rows[:, None])
        if "bias" in names:
            out["bias"] = g.sum(1).T @ w
        if len(calls) > 1:
            self.weighted_sum_into(module, calls[1:], names, weights, out)
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

    def can_pool(self, module: nn.Module, other: nn.Module, name: str) -> bool:
        # Any two Linear layers use a tied weight (or bias) the same way.
        return True
