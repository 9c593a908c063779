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
from .distributed import World
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
    """Random directions ``(prod(shape[1:]), PROBES)`` with standard normal entries per
    parameter: slices of one draw per (device, dtype) from a private generator (the
    user's RNG streams are left alone). ``E ||D v||^2 = PROBES ||D||_F^2``."""
    need: dict[tuple[torch.device, torch.dtype], int] = {}
    cols_of = {}
    for cov in covered:
        p = cov.param
        cols = _rows(p, p).shape[1]
        key = (p.device, accumulation_dtype(p.dtype))
        need[key] = max(need.get(key, 0), cols)
        cols_of[cov.name] = (key, cols)
    gen = torch.Generator().manual_seed(0x6A5)
    base = {key: torch.randn(rows, PROBES, generator=gen, dtype=key[1]).to(key[0]) for key, rows in need.items()}
    return {name: base[key][:cols] for name, (key, cols) in cols_of.items()}


def _norms(tensors: list[Tensor]) -> list[Tensor]:
    """L2 norm of each tensor, in one call where PyTorch offers it."""
    foreach = getattr(torch, "_foreach_norm", None)
    if foreach is not None and tensors and len({(t.device, t.dtype) for t in tensors}) == 1:
        return list(foreach(tensors))
    return [torch.linalg.vector_norm(t) for t in tensors]


def _column(scalars: list[Tensor]) -> Tensor:
    """Stack 0-d tensors into one float64 CPU vector (one conversion when uniform)."""
    if len({(t.dtype, t.device) for t in scalars}) == 1:
        return torch.stack(scalars).to(device="cpu", dtype=torch.float64)
    return torch.stack([t.to(device="cpu", dtype=torch.float64) for t in scalars])


def verify(
    covered: Sequence[Covered],
    before: dict[str, Tensor | None],
    summed: dict[str, Tensor] | None = None,
    world: World | None = None,
) -> None:
    """Raise :class:`UnseenGradientError` naming every parameter whose ``p.grad``
    grew by something other than the rules' account.

    ``summed``: the full raw sums when already at hand (materialized mode);
    otherwise the rules' ``probe`` is used. ``world``: the DDP process group
    when DDP all-reduced (averaged) the gradients during backward; the account
    is then averaged over the ranks too (a collective call).
    """
    if not covered:
        return
    use_probes = summed is None or world is not None
    vectors = _directions(covered) if use_probes else {}
    if summed is None:
        mine_all = combine.probes(covered, vectors)
    elif use_probes:
        mine_all = {k: _rows(t, covered_param(covered, k)) @ vectors[k] for k, t in summed.items()}
    else:
        mine_all = dict(summed)
    scales = combine.magnitudes(covered)
    # Per parameter: the account ("mine"), p.grad before the context and after
    # backward, all projected on the probe directions when probing.
    mine_l, prior_l, after_l, scale_l = [], [], [], []
    for cov in covered:
        p = cov.param
        acc = accumulation_dtype(p.dtype)
        v = vectors.get(cov.name)

        def project(t: Tensor, p: Tensor = p, v: Tensor | None = v) -> Tensor:
            return _rows(t, p) @ v if v is not None else t

        b = before.get(cov.name)
        mine = mine_all.get(cov.name)
        after = _dense(p.grad, p, acc) if p.grad is not None else None
        shape = (_rows(p, p).shape[0], PROBES) if use_probes else tuple(p.shape)
        zeros = torch.zeros(shape, dtype=acc, device=p.device)
        mine_l.append(zeros if mine is None else mine.to(acc))
        prior_l.append(zeros if b is None else project(_dense(b, p, acc)))
        after_l.append(zeros if after is None else project(after))
        scale = scales.get(cov.name)
        scale_l.append(torch.zeros((), dtype=torch.float64, device=p.device) if scale is None else scale.to(p.device))
    if world is not None:
        # DDP averaged the gradients: average the account (and the grads before) too.
        world.sum_(mine_l + prior_l + scale_l)
        for t in mine_l + prior_l + scale_l:
            t.div_(world.size)
    diffs = [a - b - m for a, b, m in zip(after_l, prior_l, mine_l)]
    columns = [_column(_norms(group)) for group in (diffs, after_l, prior_l)] + [_column(scale_l)]
    stats = torch.stack(columns).T.tolist()
    # Projected on standard normal directions, any tensor's norm grows by sqrt(PROBES)
    # in expectation: rounding errors and discrepancies alike.
    factor = PROBES**0.5 if use_probes else 1.0
    problems = []
    for i, (cov, (err, after_n, prior_n, scale)) in enumerate(zip(covered, stats)):
        # ||after||_F and ||before||_F, estimated from their projections when probing
        tol = SAFETY * combine.rounding_eps(cov) * (factor * scale + after_n + prior_n) + 1e-30
        if err <= tol or err != err or err == float("inf"):
            continue
        mine, after, prior = mine_l[i], after_l[i], prior_l[i]
        reset_err = float(torch.linalg.vector_norm(after - mine))
        added_n = float(torch.linalg.vector_norm(after - prior))
        mine_n = float(torch.linalg.vector_norm(mine))
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


def covered_param(covered: Sequence[Covered], name: str) -> Tensor:
    for cov in covered:
        if cov.name == name:
            return cov.param
    raise KeyError(name)


def _rows(t: Tensor, p: Tensor) -> Tensor:
    """``t`` (shaped like ``p``) as ``(shape[0], -1)``; scalars and empty leading dims as one row."""
    rows = p.shape[0] if p.dim() >= 1 and p.shape[0] > 0 else 1
    return t.reshape(rows, -1)
