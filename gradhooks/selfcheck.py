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

Cost: a few products of a matrix with ``PROBES`` columns per layer, plus a few
calls for all parameters together (differences, norms). The rules' magnitudes
are computed only for a parameter whose difference exceeds the tolerance
without them (rarely: only near-total cancellation). On CPU the products are
so small that waking OpenMP's threads costs more than the arithmetic, so the
check runs with one intra-op thread when every tensor involved is small
(:func:`_serial`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

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
#: On CPU the check runs single-threaded while no parameter and no captured
#: input or output gradient of a covered module has more elements than this:
#: each product then takes well under a millisecond on one core, and waking the
#: other threads (~0.1 ms under ``OMP_WAIT_POLICY=PASSIVE``) would cost more.
SERIAL_ELEMS = 1 << 20

# (device, dtype, columns) -> the (PROBES, columns) draw and its column-major
# slices by width; deterministic, so cached.
_BASES: dict[tuple[torch.device, torch.dtype, int], tuple[Tensor, dict[int, Tensor]]] = {}


def _rows(t: Tensor, p: Tensor) -> Tensor:
    """``t`` (shaped like ``p``) as ``(shape[0], -1)``; scalars and empty leading dims as one row."""
    rows = p.shape[0] if p.dim() >= 1 and p.shape[0] > 0 else 1
    return t.reshape(rows, -1)


def _base(device: torch.device, dtype: torch.dtype, cols: int) -> tuple[Tensor, dict[int, Tensor]]:
    key = (device, dtype, cols)
    got = _BASES.get(key)
    if got is None:
        gen = torch.Generator().manual_seed(0x6A5)
        got = (torch.randn(PROBES, cols, generator=gen, dtype=dtype).to(device), {})
        if len(_BASES) >= 16:
            _BASES.clear()
        _BASES[key] = got
    return got


def _directions(covered: Sequence[Covered]) -> dict[str, Tensor]:
    """Random directions ``(prod(shape[1:]), PROBES)`` with standard normal entries per
    parameter: slices of one draw per (device, dtype) from a private generator (the
    user's RNG streams are left alone). ``E ||D v||^2 = PROBES ||D||_F^2``.

    The directions are column-major views (the transpose of a row-major draw): a
    CPU BLAS multiplies by a few such columns several times faster."""
    need: dict[tuple[torch.device, torch.dtype], int] = {}
    cols_of = {}
    for cov in covered:
        p = cov.param
        rows = p.shape[0] if p.dim() >= 1 and p.shape[0] > 0 else 1
        cols = p.numel() // rows
        key = (p.device, accumulation_dtype(p.dtype))
        if need.get(key, -1) < cols:
            need[key] = cols
        cols_of[cov.name] = (key, cols)
    bases = {key: _base(key[0], key[1], cols) for key, cols in need.items()}
    out = {}
    for name, (key, cols) in cols_of.items():
        base, views = bases[key]
        v = views.get(cols)
        if v is None:
            v = views[cols] = base[:, :cols].T
        out[name] = v
    return out


def _project(t: Tensor, p: Tensor, v: Tensor) -> Tensor:
    """``t`` (shaped like ``p``) as rows, times the directions ``v``."""
    t = _rows(t, p)
    if v.shape[0] == 1:
        return t * v  # one column: an outer product
    return t @ v


def _prepare(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A gradient as a dense tensor of ``dtype`` (no copy when it already is one)."""
    if t is None:
        return None
    if t.requires_grad:
        t = t.detach()
    if t.is_sparse:
        t = t.to_dense()
    return t if t.dtype == dtype else t.to(dtype)


def _floats(scalars: list[Tensor]) -> list[float]:
    """0-d tensors as Python floats: one stack and one transfer per device."""
    by_device: dict[torch.device, dict[torch.dtype, list[int]]] = {}
    for i, t in enumerate(scalars):
        by_device.setdefault(t.device, {}).setdefault(t.dtype, []).append(i)
    out = [0.0] * len(scalars)
    for groups in by_device.values():
        order = [i for idx in groups.values() for i in idx]
        parts = [torch.stack([scalars[i] for i in idx]).to(torch.float64) for idx in groups.values()]
        values = (parts[0] if len(parts) == 1 else torch.cat(parts)).tolist()
        for i, value in zip(order, values):
            out[i] = value
    return out


def _foreach(op: str, a: list[Tensor], b: list[Tensor]) -> list[Tensor]:
    """``[op(x, y) for x, y in zip(a, b)]`` in one call where PyTorch offers it."""
    fused = getattr(torch, f"_foreach_{op}", None)
    if fused is not None and len({(t.device, t.dtype) for t in a + b}) == 1:
        return list(fused(a, b))
    return [getattr(torch, op)(x, y) for x, y in zip(a, b)]


def _norms(tensors: list[Tensor]) -> list[Tensor]:
    """L2 norm of each tensor, one call per (device, dtype) where PyTorch offers it."""
    foreach = getattr(torch, "_foreach_norm", None)
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    out: list[Tensor] = [None] * len(tensors)  # type: ignore[list-item]
    for idx in groups.values():
        group = [tensors[i] for i in idx]
        got = foreach(group) if foreach is not None else [torch.linalg.vector_norm(t) for t in group]
        for i, n in zip(idx, got):
            out[i] = n
    return out


def _stats(
    after_l: list[Tensor | None], prior_l: list[Tensor | None], mine_l: list[Tensor | None]
) -> tuple[list[float], list[float], list[float]]:
    """Per parameter ``||after - prior - mine||``, ``||after||`` and ``||prior||``
    (absent terms are zeros), with a few calls for all parameters rather than a few
    per parameter (small tensors: the calls' overhead is the cost)."""
    n = len(after_l)
    diffs: list[Tensor | None] = [None] * n
    # The usual cases in bulk: nothing before the context, or accumulation.
    plain = [i for i in range(n) if after_l[i] is not None and mine_l[i] is not None]
    for with_prior in (False, True):
        idx = [i for i in plain if (prior_l[i] is not None) == with_prior]
        if not idx:
            continue
        left = [after_l[i] for i in idx]
        if with_prior:
            left = _foreach("sub", left, [prior_l[i] for i in idx])  # type: ignore[misc]
        for i, d in zip(idx, _foreach("sub", left, [mine_l[i] for i in idx])):  # type: ignore[misc]
            diffs[i] = d
    for i in range(n):
        if diffs[i] is None:
            d = after_l[i]
            for t in (prior_l[i], mine_l[i]):
                if t is not None:
                    d = t.neg() if d is None else d - t
            diffs[i] = d
    groups = (diffs, after_l, prior_l)
    present = [t for group in groups for t in group if t is not None]
    values = iter(_floats(_norms(present)))
    return tuple([0.0 if t is None else next(values) for t in group] for group in groups)  # type: ignore[return-value]


_OPENMP: bool | None = None


@contextlib.contextmanager
def _serial(covered: Sequence[Covered]) -> Iterator[None]:
    """One intra-op thread while the check runs, on CPU with small tensors only.

    Each of the check's products is tiny (a matrix times ``PROBES`` columns), so
    a CPU spends more on waking the other threads (under ``OMP_WAIT_POLICY=PASSIVE``
    a futex wake-up per op, ~0.1 ms) than on the arithmetic. The setting is
    restored on exit, errors included. Only under the OpenMP backend, which
    changes its team size freely (the native backend refuses to resize its pool)."""
    global _OPENMP
    if _OPENMP is None:
        _OPENMP = "parallel backend: OpenMP" in torch.__config__.parallel_info()
    threads = torch.get_num_threads() if _OPENMP else 1
    if threads <= 1 or not _small_cpu(covered):
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _small_cpu(covered: Sequence[Covered]) -> bool:
    """Whether every parameter is on CPU and it and its modules' captured input and
    output gradient have at most :data:`SERIAL_ELEMS` elements."""
    seen = set()
    for cov in covered:
        p = cov.param
        if p.device.type != "cpu" or p.numel() > SERIAL_ELEMS:
            return False
        for site, _ in cov.owners:
            if id(site) in seen:
                continue
            seen.add(id(site))
            for call in site.calls:
                x, g = call._input, call.grads[0] if call.grads else None
                if (x is not None and x.numel() > SERIAL_ELEMS) or (g is not None and g.numel() > SERIAL_ELEMS):
                    return False
    return True


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
    with _serial(covered):
        problems = _check(covered, before, summed, world)
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


def _check(
    covered: Sequence[Covered],
    before: dict[str, Tensor | None],
    summed: dict[str, Tensor] | None,
    world: World | None,
) -> list[str]:
    """The messages for the parameters that fail (empty when all pass)."""
    use_probes = summed is None or world is not None
    vectors = _directions(covered) if use_probes else {}
    if summed is None:
        mine_all = combine.probes(covered, vectors)
    elif use_probes:
        mine_all = {}
        for k, t in summed.items():
            p = covered_param(covered, k)
            mine_all[k] = _project(_prepare(t, accumulation_dtype(p.dtype)), p, vectors[k])  # type: ignore[arg-type]
    else:
        mine_all = summed
    # Per parameter: the account ("mine"), p.grad before the context and after
    # backward, all projected on the probe directions when probing; None: zero.
    mine_l: list[Tensor | None] = []
    prior_l: list[Tensor | None] = []
    after_l: list[Tensor | None] = []
    for cov in covered:
        p = cov.param
        acc = accumulation_dtype(p.dtype)
        v = vectors.get(cov.name)
        after = _prepare(p.grad, acc)
        prior = _prepare(before.get(cov.name), acc)
        mine = mine_all.get(cov.name)
        if v is not None:
            after = None if after is None else _project(after, p, v)
            prior = None if prior is None else _project(prior, p, v)
        mine_l.append(mine if mine is None or mine.dtype == acc else mine.to(acc))
        prior_l.append(prior)
        after_l.append(after)
    scale_l: list[Tensor | None] = []  # DDP only (see below)
    if world is not None:
        scales = combine.magnitudes(covered)
        scale_l = [scales.get(cov.name) for cov in covered]
        # DDP averaged the gradients: average the account (and the grads before) too.
        # Every rank contributes the same tensors, so absent ones count as zeros.
        for i, cov in enumerate(covered):
            p = cov.param
            shape = (_rows(p, p).shape[0], PROBES)
            acc = accumulation_dtype(p.dtype)
            m, b, s = mine_l[i], prior_l[i], scale_l[i]
            mine_l[i] = torch.zeros(shape, dtype=acc, device=p.device) if m is None else m.clone()
            prior_l[i] = torch.zeros(shape, dtype=acc, device=p.device) if b is None else b.clone()
            scale_l[i] = torch.zeros((), dtype=torch.float64, device=p.device) if s is None else s.to(p.device).clone()
        shared = [t for t in mine_l + prior_l + scale_l if t is not None]
        world.sum_(shared)
        for t in shared:
            t.div_(world.size)
    stats = list(_stats(after_l, prior_l, mine_l))
    if world is not None:
        stats.append(_floats(scale_l))  # type: ignore[arg-type]  # no None left
    # Projected on standard normal directions, any tensor's norm grows by sqrt(PROBES)
    # in expectation: rounding errors and discrepancies alike.
    factor = PROBES**0.5 if use_probes else 1.0
    # tol = SAFETY * eps * (factor * scale + ||after|| + ||before||), with ||after||_F
    # and ||before||_F estimated from their projections when probing. A parameter
    # within the tolerance without the scale (>= 0) passes: the rules' magnitudes
    # are computed only for the others, unless DDP needs them on every rank.
    eps_l = [combine.rounding_eps(cov) for cov in covered]
    suspects = [
        i
        for i, (err, after_n, prior_n) in enumerate(zip(*stats[:3]))
        if not (err <= SAFETY * eps_l[i] * (after_n + prior_n) + 1e-30 or err != err or err == float("inf"))
    ]
    if not suspects:
        return []
    if world is None:
        scales = combine.magnitudes([covered[i] for i in suspects])
        got = [scales.get(covered[i].name) for i in suspects]
        values = iter(_floats([s for s in got if s is not None]))
        scale_of = {i: (0.0 if s is None else next(values)) for i, s in zip(suspects, got)}
    else:
        scale_of = {i: stats[3][i] for i in suspects}
    problems = []
    for i in suspects:
        cov, err, after_n, prior_n = covered[i], stats[0][i], stats[1][i], stats[2][i]
        tol = SAFETY * eps_l[i] * (factor * scale_of[i] + after_n + prior_n) + 1e-30
        if err <= tol:
            continue
        like = next(t for t in (after_l[i], mine_l[i], prior_l[i]) if t is not None)  # err > 0
        zeros = torch.zeros_like(like)
        mine, after, prior = (zeros if t is None else t for t in (mine_l[i], after_l[i], prior_l[i]))
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
    return problems


def covered_param(covered: Sequence[Covered], name: str) -> Tensor:
    for cov in covered:
        if cov.name == name:
            return cov.param
    raise KeyError(name)
