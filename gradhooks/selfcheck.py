"""The exit self-check: did the hooks see every gradient ``p.grad`` got?

One-backward mode: the hooked uses add nothing to ``p.grad`` of an op-level
covered parameter, so any change of it during the context (its identity or its
version counter) came from a use the hooks do not see: exact, no tolerance.

Default mode: for every covered parameter, what ``backward()`` added to
``p.grad`` must equal the sum of what autograd sent through the captured uses
(each use's gradient is recorded by a hook on the operand it received), up to
the rounding of that final addition. A module-level rule (``register_rule``,
the fallback) has no such record: its rule's account of the batch sum stands
in, with a tolerance of a few machine epsilons times the size of the *terms*
it sums (its ``magnitudes``), so a gradient that cancels to almost zero is no
false alarm. A normalization layer's per-sample gradients are also checked
against the gradient autograd computed for it (that is how a kernel bug shows,
e.g. torch 2.13's CPU ``instance_norm`` backward with a non-contiguous
incoming gradient).

Under DDP without ``no_sync()`` the gradients were all-reduced during
backward: the accounts are averaged over the ranks along a few fixed random
directions (one small all-reduce) before the comparison.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .distributed import World
from .errors import UnseenGradientError
from .rule import accumulation_dtype, long_sum_slack
from .sites import Covered, Site
from .trace.derive import Chain

__all__ = ["verify", "verify_unchanged", "verify_dense_rules", "Snapshot"]

#: Multiple of machine epsilon times the terms' scale that counts as rounding.
SAFETY = 16.0
#: Random directions per parameter when comparing across DDP ranks.
PROBES = 4

_REMEDY = (
    "The parameter is used where no hook sees it: in a penalty added to the loss (which has "
    "no per-sample meaning), or through an op the tracer cannot see. Add such a penalty's "
    "gradient after clip_(), or freeze the parameter (requires_grad=False)."
)


@dataclass
class _Term:
    value: Tensor  # shaped like the parameter, raw
    scale: float  # the rounding scale of this term
    eps: float


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps if dtype.is_floating_point else 0.0


def _rule_sums(site: Site, live: list, acc: torch.dtype, device: torch.device, cache: dict[int, tuple[dict[str, Tensor], dict[str, Tensor]]]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The rule's batch sums and magnitudes for all of the site's names, once."""
    got = cache.get(id(site))
    if got is None:
        ones = torch.ones(_batch_of(live), device=device, dtype=acc)
        sums = site.run("weighted_sum", live, site.names, ones)
        mags = site.run("magnitudes", live, site.names)
        got = cache[id(site)] = (sums, mags)
    return got


def _terms(cov: Covered, module_level_only: bool, cache: dict[int, Any]) -> list[_Term]:
    """What the captured uses account for in ``p.grad``, one term per use (only the
    module-level ones in the one-backward mode, where the others add nothing)."""
    out = []
    p = cov.param
    acc = accumulation_dtype(p.dtype)
    for site, local in cov.contributions:
        live = site.live_calls()
        if not live or (module_level_only and not site.module_level):
            continue
        tracked = site.tracked.get(local)
        if tracked is not None:
            origin, grad = tracked
            grad = grad.to_dense() if grad.is_sparse else grad
            value = Chain(origin).pull(grad.to(acc))[id(cov.source)]
            out.append(_Term(value, float(torch.linalg.vector_norm(value)), _eps(p.dtype)))
            continue
        sums, mags = _rule_sums(site, live, acc, p.device, cache)
        value = site.chains[local].pull(sums[local].detach().to(acc))[id(cov.source)]
        eps = max([_eps(p.dtype)] + [c.eps() for c in live])
        out.append(_Term(value, float(mags[local].detach()), eps))
    return out


def _batch_of(calls: Sequence) -> int:
    for c in calls:
        for g in c.grads:
            if g is not None:
                return int(g.shape[0])
    return 0


def _dense(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    if t is None:
        return None
    t = t.detach()
    if t.is_sparse:
        t = t.to_dense()
    return t.to(dtype)


@contextlib.contextmanager
def _serial() -> Iterator[None]:
    """One intra-op thread on CPU while the check runs: its operations are small,
    and waking OpenMP's threads costs more than their arithmetic."""
    threads = torch.get_num_threads()
    if threads <= 1 or "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def verify(covered: Sequence[Covered], before: dict[str, Tensor | None], world: World | None = None, *, module_level_only: bool = False) -> None:
    """Raise :class:`UnseenGradientError` naming every parameter whose ``p.grad``
    grew by something other than the captured uses' account. ``world``: the DDP
    process group when DDP all-reduced the gradients during backward (collective:
    one all-reduce for all parameters)."""
    problems: list[str] = []
    probes: list[tuple[Tensor, Callable[[Tensor], str | None]]] = []
    cache: dict[int, Any] = {}
    with _serial():
        for cov in covered:
            got = _check_one(cov, before.get(cov.name), world is not None, module_level_only, cache)
            if isinstance(got, tuple):
                probes.append(got)
            elif got:
                problems.append(got)
        if world is not None and probes:
            shared = torch.cat([t for t, _ in probes])
            world.sum_([shared])
            shared /= world.size
            for avg, (_, judge) in zip(shared.split([t.numel() for t, _ in probes]), probes, strict=True):
                msg = judge(avg)
                if msg:
                    problems.append(msg)
    if problems:
        raise UnseenGradientError("gradient reached a parameter outside its captured uses:\n  " + "\n  ".join(problems) + "\n" + _REMEDY)


def _check_one(
    cov: Covered, prior: Tensor | None, distributed: bool, module_level_only: bool, cache: dict[int, Any]
) -> str | None | tuple[Tensor, Callable[[Tensor], str | None]]:
    p = cov.param
    acc = accumulation_dtype(p.dtype)
    after = _dense(p.grad, acc)
    prior_d = _dense(prior, acc)
    terms = _terms(cov, module_level_only, cache)
    mine = None
    for t in terms:
        mine = t.value if mine is None else mine + t.value
    if distributed:
        return _world_probe(cov, after, prior_d, mine, terms)
    diff = torch.zeros(p.shape, dtype=acc, device=p.device) if after is None else after.clone()
    if prior_d is not None:
        diff.sub_(prior_d)
    if mine is not None:
        diff.sub_(mine)
    err = float(torch.linalg.vector_norm(diff))
    if not torch.isfinite(torch.tensor(err)):
        # Non-finite gradients are no error here (norms() reports them, clip_ refuses),
        # unless they came from outside the captured uses.
        if mine is None or bool(torch.isfinite(mine).all()):
            return f"parameter '{cov.name}': a non-finite gradient reached p.grad from outside its captured uses"
        return None
    after_n = 0.0 if after is None else float(torch.linalg.vector_norm(after))
    prior_n = 0.0 if prior_d is None else float(torch.linalg.vector_norm(prior_d))
    eps = max([_eps(p.dtype)] + [t.eps for t in terms])
    tol = SAFETY * eps * (after_n + prior_n + sum(t.scale for t in terms)) + 1e-30
    if err <= tol:
        return None
    return _explain(cov, after, prior_d, mine, err)


def _explain(cov: Covered, after: Tensor | None, prior: Tensor | None, mine: Tensor | None, err: float) -> str:
    owner = ", ".join(dict.fromkeys(site.label for site, _ in cov.contributions)) or "no captured use"
    where = f"parameter '{cov.name}' ({owner})"
    zeros = torch.zeros_like(next(t for t in (after, mine, prior) if t is not None))
    after_, mine_, prior_ = (zeros if t is None else t for t in (after, mine, prior))
    added = float(torch.linalg.vector_norm(after_ - prior_))
    if prior is not None and float(torch.linalg.vector_norm(after_ - mine_)) <= 1e-6 * max(added, 1e-30):
        return f"{where}: p.grad was reset inside the context (optimizer.zero_grad() inside the with block?); zero the gradients before entering it"
    if mine is not None and added == 0.0:
        return (f"{where}: backward() added nothing to p.grad although its uses received gradient; "
                "call loss.backward() inside the context (torch.autograd.grad does not fill p.grad)")
    rel = err / max(added, float(torch.linalg.vector_norm(mine_)), 1e-300)
    return f"{where}: backward() added a gradient that differs from the captured uses' sum (relative difference {rel:.2g})"


def _world_probe(
    cov: Covered, after: Tensor | None, prior: Tensor | None, mine: Tensor | None, terms: list[_Term]
) -> tuple[Tensor, Callable[[Tensor], str | None]]:
    """DDP averaged ``p.grad`` over the ranks: the account and ``before`` projected
    on a few random directions (every rank contributes, zeros for absent terms), to
    be averaged over the ranks, and the judgement of that average."""
    p = cov.param
    # Projections in float64: in float32 a dot product over numel elements rounds by
    # about sqrt(numel) eps, which two ranks' sums and DDP's average do not share.
    acc = torch.float32 if p.device.type == "mps" else torch.float64
    gen = torch.Generator().manual_seed(0x6A5)
    v = torch.randn(p.numel(), PROBES, generator=gen).to(device=p.device, dtype=acc)  # float32 draws: 5x cheaper
    proj = lambda t: (t.reshape(-1).to(acc) @ v) if t is not None else torch.zeros(PROBES, dtype=acc, device=p.device)  # noqa: E731
    shared = torch.cat([proj(mine), proj(prior), torch.tensor([sum(t.scale for t in terms)], dtype=acc, device=p.device)])
    after_p = proj(after)
    eps = max([_eps(p.dtype)] + [t.eps for t in terms])

    def judge(avg: Tensor) -> str | None:
        mine_p, prior_p, scale = avg[:PROBES], avg[PROBES : 2 * PROBES], float(avg[-1])
        err = float(torch.linalg.vector_norm(after_p - prior_p - mine_p))
        tol = SAFETY * eps * (PROBES**0.5 * scale + float(torch.linalg.vector_norm(after_p)) + float(torch.linalg.vector_norm(prior_p))) + 1e-30
        if err <= tol:
            return None
        return f"parameter '{cov.name}': after DDP's all-reduce, p.grad differs from the ranks' average account"

    return shared, judge


@dataclass
class Snapshot:
    """``p.grad``'s identity and version counter when the context was entered."""

    grad: Tensor | None
    version: int

    @classmethod
    def of(cls, p: Tensor) -> Snapshot:
        return cls(p.grad, p.grad._version if p.grad is not None else -1)

    def changed(self, p: Tensor) -> bool:
        return p.grad is not self.grad or (p.grad is not None and p.grad._version != self.version)


def verify_unchanged(covered: Sequence[Covered], snapshots: dict[str, Snapshot], outside: bool) -> None:
    """One-backward mode: the hooked uses leave ``p.grad`` alone; any change came from
    a use the hooks do not see (``outside``: the model's forward never ran inside)."""
    changed = [cov for cov in covered if snapshots[cov.name].changed(cov.param)]
    if not changed:
        return
    lines = []
    for cov in changed:
        snap = snapshots[cov.name]
        if snap.grad is not None and cov.param.grad is None:
            lines.append(f"'{cov.name}': p.grad was reset inside the context (optimizer.zero_grad() inside the with block?)")
        else:
            lines.append(f"'{cov.name}': backward() added a gradient through a use the hooks do not see")
    first = (
        "the model's forward ran outside the per_sample_grads context (or not at all), so its "
        "uses of these parameters were not captured: run the forward inside the with block"
        if outside else _REMEDY
    )
    raise UnseenGradientError("gradient reached covered parameter(s) outside their captured uses (one_backward=True, exact):\n  " + "\n  ".join(lines) + "\n" + first)


def verify_dense_rules(sites: Sequence[Site]) -> None:
    """A normalization layer's per-sample gradients must add up to the gradient
    autograd computed for it, within the rounding of the terms both sum."""
    problems = []
    for site in sites:
        for call in site.calls:
            mags = call.memo.get("magnitude")
            if not mags or not call.has_grad:
                continue
            names = call.memo["names"]
            for local, mag in mags.items():
                tracked = site.tracked.get(local)
                value = call.grads[names.index(local)]
                if tracked is None or value is None:
                    continue
                got = value.sum(0).to(tracked[1].dtype)
                err = float(torch.linalg.vector_norm(got - tracked[1]))
                rows = max(1.0, float(call.memo.get("rows", 1)))
                eps = max(_eps(tracked[1].dtype), float(call.memo.get("eps", 0.0)))  # the least precise input's
                tol = SAFETY * eps * long_sum_slack(rows) * float(torch.linalg.vector_norm(mag)) + 1e-30
                if err > tol:
                    problems.append(f"{site.label} ({local}): relative difference {err / max(float(torch.linalg.vector_norm(got)), 1e-300):.2g}")
    if problems:
        raise UnseenGradientError(
            "backward's gradient of a normalization layer's parameters differs from the sum of their "
            "per-sample gradients:\n  " + "\n  ".join(problems) + "\nThis happens with a kernel bug "
            "(torch 2.13's CPU instance_norm backward with a non-contiguous incoming gradient): the "
            "per-sample gradients and clip_() are right, p.grad from backward() is not."
        )
