"""The exit-time self-check: did the hooks see every gradient ``p.grad`` got?

For each covered parameter, what ``backward()`` added to ``p.grad`` inside the
context must equal the sum over samples of what the rules account for. If a
parameter was also used where no hook sees it (``F.linear(x, layer.weight)``,
read by another module, a weight penalty in the loss), the two differ and the
per-sample results would be silently wrong, so the context raises instead.

The comparison allows for rounding only: the tolerance is a small multiple of
machine epsilon times a bound on the *terms* backward summed (the rules'
``magnitudes``), never of the result, so a gradient that cancels to almost
zero is not flagged. Without materialized tensors the sums are compared along
a few fixed random directions (``probe``), which costs a fraction of a matmul
per layer and detects any discrepancy with probability one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import combine
from .combine import Covered
from .errors import UnseenGradientError
from .rule import accumulation_dtype

__all__ = ["verify"]

#: Random directions per parameter when comparing by probes.
PROBES = 4
#: Multiple of machine epsilon times the terms' scale that counts as rounding.
SAFETY = 16.0


def _dense(t: Tensor | None, like: torch.Tensor, dtype: torch.dtype) -> Tensor:
    if t is None:
        return torch.zeros(like.shape, dtype=dtype, device=like.device)
    t = t.detach()
    if t.is_sparse:
        t = t.to_dense()
    return t.to(dtype)


def _directions(covered: Sequence[Covered]) -> dict[str, Tensor]:
    """Unit random columns ``(prod(shape[1:]), PROBES)`` per parameter, from a
    private generator (the user's RNG streams are left alone)."""
    gen = torch.Generator().manual_seed(0x6A5)
    out = {}
    for cov in covered:
        p = cov.param
        cols = p[0].numel() if p.dim() >= 1 and p.shape[0] > 0 else 1
        v = torch.randn(cols, PROBES, generator=gen, dtype=torch.float64)
        v = v / torch.linalg.vector_norm(v, dim=0, keepdim=True)
        out[cov.name] = v.to(device=p.device, dtype=accumulation_dtype(p.dtype))
    return out


def verify(
    covered: Sequence[Covered],
    before: dict[str, Tensor | None],
    summed: dict[str, Tensor] | None = None,
) -> None:
    """Raise :class:`UnseenGradientError` naming every parameter whose ``p.grad``
    grew by something other than the rules' account.

    ``summed``: the full raw sums when already at hand (materialized mode);
    otherwise the rules' ``probe`` is used.
    """
    if not covered:
        return
    vectors = _directions(covered) if summed is None else None
    projected = combine.probes(covered, vectors) if vectors is not None else {}
    scales = combine.magnitudes(covered)
    stats = []
    for cov in covered:
        p = cov.param
        acc = accumulation_dtype(p.dtype)
        after = _dense(p.grad, p, acc)
        prior = _dense(before.get(cov.name), p, acc)
        added = after - prior
        rows = p.shape[0] if p.dim() >= 1 and p.shape[0] > 0 else 1
        if vectors is not None:
            v = vectors[cov.name]
            mine = projected.get(cov.name)
            if mine is None:
                mine = torch.zeros(rows, PROBES, dtype=acc, device=p.device)
            diff = added.reshape(rows, -1) @ v - mine
            reset = after.reshape(rows, -1) @ v - mine
            factor = (PROBES / v.shape[0]) ** 0.5
        else:
            mine = summed[cov.name].to(acc) if summed is not None and cov.name in summed else torch.zeros_like(after)
            diff = added - mine
            reset = after - mine
            factor = 1.0
        scale = scales.get(cov.name, torch.zeros((), dtype=torch.float64)).to(p.device)
        eps = combine.rounding_eps(cov)
        norm = torch.linalg.vector_norm
        tol = SAFETY * eps * factor * (scale + norm(after).double() + norm(prior).double()) + 1e-30
        stats.append(
            torch.stack(
                [
                    norm(diff).double(),
                    tol,
                    norm(reset).double(),
                    norm(added).double() * factor,
                    norm(mine).double(),
                    torch.isfinite(diff).all().double(),
                ]
            ).cpu()
        )
    rows_ = torch.stack(stats).tolist()
    problems = []
    for cov, (err, tol, reset_err, added_n, mine_n, finite) in zip(covered, rows_):
        if not finite or err <= tol:
            continue
        owner = ", ".join(site.label for site, _ in cov.owners)
        where = f"parameter '{cov.name}' of {owner}"
        if before.get(cov.name) is not None and reset_err <= tol:
            problems.append(
                f"{where}: p.grad was reset inside the context (optimizer.zero_grad() inside "
                "the with block?); zero the gradients before entering the context"
            )
        elif added_n <= tol:
            problems.append(
                f"{where}: backward() added nothing to p.grad although the hooks saw gradient "
                "reach the module; call loss.backward() inside the context (torch.autograd.grad "
                "does not fill p.grad)"
            )
        else:
            rel = err / max(added_n, mine_n, 1e-300)
            problems.append(f"{where}: backward() added a gradient that differs from the hooked calls' sum (relative difference {rel:.2g})")
    if problems:
        raise UnseenGradientError(
            "gradient reached a parameter outside its hooked module:\n  "
            + "\n  ".join(problems)
            + "\nThe parameter is used where no hook sees it: functionally (e.g. "
            "F.linear(x, layer.weight)), read by another module, or in a penalty added to the "
            "loss (which has no per-sample meaning). Route every use through its module, add "
            "such a penalty's gradient after clip_(), or freeze the parameter "
            "(requires_grad=False). A fallback module must also be deterministic (no dropout "
            "in training mode)."
        )
