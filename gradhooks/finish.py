"""The work at a context's exit: validate the recording, put every captured
tensor's batch first, run the self-check, build the result.

Order: problems found during the forward (a use that could not be attributed,
one with no rule) -> the batch size -> calls without gradient dropped, batches
put first -> which site contributes to which parameter -> the self-check ->
the account (materialized tensors or the captures) -> in the one-backward
mode with ``materialize=True``, ``p.grad`` written.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import clip, rule_replay, selfcheck, stacking
from . import sites as sites_mod
from .accounts import Captured, Materialized
from .capture import Call
from .distributed import World
from .errors import (
    ContextStateError,
    UnseenGradientError,
    UnsupportedModuleError,
)
from .exit_problems import raise_problems, reduced_notes, unsupported_message
from .plan import Plan
from .recording import Recording
from .result import PerSampleGrads
from .selfcheck import Snapshot
from .sites import Covered, Site
from .trace.layout import batch_first, split_batch
from .trace.tracer import Tracer

__all__ = ["Options", "State", "finish"]


@dataclass
class Options:
    loss_reduction: str
    materialize: bool
    strict: bool
    fallback: bool
    one_backward: bool
    grad_scaler: Any
    reuse: PerSampleGrads | None


@dataclass(eq=False)
class State:
    """Everything one open context holds."""

    plan: Plan
    covered: list[Covered]
    before: dict[str, Tensor | None]
    snapshots: dict[str, Snapshot]
    rec: Recording
    tracer: Tracer
    world: World | None
    depth: int = 0
    batch_sizes: set[int] = field(default_factory=set)
    synced: list[bool] = field(default_factory=list)
    raised: bool = False

    strict: bool = True
    sharding: Any = None  # gradhooks.fsdp.Sharding of an FSDP2 model

    @property
    def collective(self) -> World | None:
        """The group every rank's exit and clip_ go through: DDP's, or FSDP2's shard group."""
        return self.world if self.sharding is None else self.sharding.world

    @property
    def pending_unsupported(self) -> bool:
        """An unsupported use (strict) or batch statistics, not raised yet."""
        return not self.raised and any(p.kind == "coupled" or (p.kind == "unsupported" and self.strict) for p in self.rec.problems)

    def unsupported_message(self) -> str:
        self.raised = True
        coupled = [p for p in self.rec.problems if p.kind == "coupled"]
        if coupled:
            return "per-sample gradients do not exist for this model as run:\n  " + "\n  ".join(sorted({f"{p.label or 'a batch_norm call'}: {p.why}" for p in coupled}))
        return unsupported_message([p for p in self.rec.problems if p.kind == "unsupported"])


def _canonical(call: Call, n: int) -> list[Call]:
    """A tracer-recorded call with its input and gradients batch first."""
    # None (not recorded by the tracer), a layout name, or an op's own canonical form.
    canon: str | Callable[[Call, int], list[Call]] | None = call.memo.get("canon")
    if canon is None:
        return [call]
    if callable(canon):  # an op with its own canonical form (recurrent layers)
        return canon(call, n)
    lin, lout = call.memo["in_layout"], call.memo["out_layout"]
    x = call.input
    g = call.grads[0]
    assert g is not None  # pruned: a tracer-recorded call left here received its gradient
    memo = {k: v for k, v in call.memo.items() if k not in ("in_layout", "out_layout", "canon")}
    if canon == "split":
        xs, gs = split_batch(x, lin, n), split_batch(g, lout, n)
        out = [Call.of(a, [b], memo) for a, b in zip(xs, gs, strict=False)]
    else:
        if canon == "first_t":
            xc, gc = batch_first(x, lin, n).transpose(-1, -2), batch_first(g, lout, n).transpose(-1, -2)
        else:
            xc, gc = batch_first(x, lin, n), batch_first(g, lout, n)
        out = [Call.of(xc, [gc], memo)]
    for c in out:
        c.versions = call.versions
    return out


def _prepare_sites(state: State, n: int) -> list[Site]:
    sites = list(state.rec.sites.values())
    for site in sites:
        site.prune()
        if not site.module_level:
            site.calls = [c for call in site.calls for c in _canonical(call, n)]
    by_src = {id(c.source): c for c in state.covered}
    for site in sites:
        for local in site.names:
            for src in site.chains[local].sources:
                cov = by_src.get(id(src))
                if cov is not None and (site, local) not in cov.contributions:
                    cov.contributions.append((site, local))
    return sites


def _skip(state: State, options: Options) -> list[Covered]:
    """strict=False: leave out the direct parameters of modules with unsupported uses."""
    probs = [p for p in state.rec.problems if p.kind == "unsupported"]
    if not probs:
        return state.covered
    if options.one_backward:
        raise UnsupportedModuleError(
            unsupported_message(probs) + "\nWith one_backward=True a parameter cannot be left out after its "
            "other uses ran without backward: use strict=True, or the default mode."
        )
    owners = {id(s): state.plan.owners.get(id(s)) for p in probs for s in p.sources}
    modules = {o[1] for o in owners.values() if o is not None}
    dropped = {id(p) for m in modules for p in m.parameters(recurse=False)}
    labels = sorted({o[0] for o in owners.values() if o is not None})
    warnings.warn(
        f"per_sample_grads(strict=False): leaving out the direct parameters of {', '.join(labels)} "
        "(uses without a per-sample rule); they are absent from the result and clip_() leaves their p.grad alone",
        UserWarning,
        stacklevel=4,
    )
    return [c for c in state.covered if id(c.param) not in dropped]


def _guard(sites: list[Site]) -> Any:
    versions = [(r, v) for s in sites for c in s.calls for r, v in c.versions]

    def check() -> None:
        changed = [t for t, v in ((r(), v) for r, v in versions) if t is not None and t._version != v]
        if changed:
            raise ContextStateError(
                "a tensor captured by the per_sample_grads context was modified in place after it was "
                "captured (e.g. x.mul_(...) on the model's input after the block): the results would be "
                "wrong. Clone it before modifying it, or use the results before."
            )

    return check


def _agree(world: Any, step: Any) -> Any:
    """Run ``step()``; under DDP every rank raises if any rank's ``step`` raised."""
    try:
        out = step()
    except BaseException:
        if world is not None:
            world.any_(True)  # release the other ranks, which raise too
        raise
    if world is not None and world.any_(False):
        raise ContextStateError("per_sample_grads: another rank failed at exit (see its error)")
    return out


def finish(state: State, result: PerSampleGrads, options: Options) -> None:
    world = state.collective
    local = _agree(world, lambda: _finish_local(state, result, options))
    if state.sharding is not None:  # FSDP2 freed the unsharded parameters: what the result reads of them (collective)
        state.sharding.restore(state.rec.sites.values())
    if local is None:
        return
    covered, sites, n = local
    synced = world is not None and bool(state.synced) and state.synced[0]
    if len(set(state.synced)) > 1:
        raise ContextStateError("per_sample_grads: some forward passes of the DDP model ran inside no_sync() and some outside; use one or the other")
    if synced:  # collective: every rank compares the same all-reduced numbers
        _check(state, covered, sites, options, world)
    else:  # local (no_sync): one rank's failure must reach the others before clip_'s collectives
        _agree(world, lambda: _check(state, covered, sites, options, None))
    _ready(state, result, options, covered, sites, n)


def _finish_local(state: State, result: PerSampleGrads, options: Options) -> tuple[list[Covered], list[Site], int] | None:
    raise_problems(state, options)
    if state.sharding is not None:  # FSDP2: exact unseen-gradient check before the ranks' exit sync
        state.sharding.verify(state.covered, state.snapshots)
    n = state.tracer.n
    covered = _skip(state, options)
    result._params = {c.name: c.param for c in covered}
    result._names = list(result._params)
    sites = _prepare_sites(state, n or 0)
    if n == 0:
        return covered, sites, 0  # an empty batch: empty results, backward added zeros
    if not any(s.live_calls() for s in sites) and not any(c.has_grad for s in sites for c in s.calls):
        changed = [c.name for c in covered if state.snapshots[c.name].changed(c.param)]
        if changed:
            outside = n is None
            raise UnseenGradientError(
                f"gradient reached parameter(s) {changed}, but no use of them inside the context received it: "
                + ("the model's forward ran outside the per_sample_grads context (or not at all); run it inside the with block"
                   if outside else "they are used where the tracer does not see them")
                + reduced_notes(state)
            )
        result._no_backward()
        return None
    return covered, sites, n or 0


def _check(state: State, covered: list[Covered], sites: list[Site], options: Options, world: World | None) -> None:
    if state.tracer.n == 0:
        return
    try:
        _verify(state, covered, sites, options, world)
    except UnseenGradientError as err:
        if state.rec.notes:
            raise UnseenGradientError(f"{err}{reduced_notes(state)}") from None
        raise


def _verify(state: State, covered: list[Covered], sites: list[Site], options: Options, world: World | None) -> None:
    if options.one_backward:
        op_level = [c for c in covered if not c.module_level]
        selfcheck.verify_unchanged(op_level, state.snapshots, outside=False)
        selfcheck.verify([c for c in covered if c.module_level], state.before, world, module_level_only=True)
    else:
        selfcheck.verify(covered, state.before, world)
        selfcheck.verify_dense_rules(sites)
    rule_replay.verify_user_rules(sites)  # after the sums: a rule whose batch sum is wrong is named there


def _ready(state: State, result: PerSampleGrads, options: Options, covered: list[Covered], sites: list[Site], n: int) -> None:
    scaler = options.grad_scaler
    scale = float(scaler.get_scale()) if scaler is not None else None
    unit = (float(n) if options.loss_reduction == "mean" else 1.0) / (scale if scale is not None else 1.0)
    if options.materialize:
        tensors = sites_mod.per_sample(covered, n, unit, _reusable(options.reuse, covered, n))
        account: Any = Materialized(tensors)
        for site in sites:
            for call in site.calls:
                call.release()
        release = lambda: None  # noqa: E731
        guard = lambda: None  # noqa: E731
    else:
        account = Captured(covered, n, unit, stacking.compact(sites))
        guard = _guard(sites)

        def release() -> None:
            for site in sites:
                for call in site.calls:
                    call.release()

    result._one_backward = options.one_backward
    result._sparse = [c.name for c in covered if any(getattr(s.module, "sparse", False) for s, _ in c.contributions)]
    result._ready(n, state.before, account, world=state.collective, grad_scale=scale, guard=guard, release=release)
    if options.one_backward:
        _write_one_backward(state, result, options, covered, account, n, scale)


def _write_one_backward(state: State, result: PerSampleGrads, options: Options, covered: list[Covered],
                        account: Any, n: int, scale: float | None) -> None:
    """One-backward mode: ``p.grad`` of every covered parameter is ours to write:
    ``before`` plus, with ``materialize=True``, the per-sample gradients' reduction.
    (A module-level rule's parameters did get their ordinary backward: it is undone.)"""
    params = {c.name: c.param for c in covered}
    if options.materialize and n:
        div = float(n) if options.loss_reduction == "mean" else 1.0
        weights = torch.full((n,), (scale if scale is not None else 1.0) / div, dtype=torch.float64)
        clip.write_clipped(account, params, state.before, weights, sparse=result._sparse)
        return
    with torch.no_grad():
        for c in covered:
            if c.module_level:
                prior = state.before.get(c.name)
                if prior is None:
                    c.param.grad = None
                elif c.param.grad is not None:
                    c.param.grad.copy_(prior)


def _reusable(old: PerSampleGrads | None, covered: list[Covered], n: int) -> dict[str, Tensor]:
    """Buffers taken from ``reuse`` for this result's tensors, by shape/dtype/device."""
    if old is None or old._state != "ready" or not isinstance(old._account, Materialized):
        return {}
    pool: dict[tuple[Any, ...], list[Tensor]] = {}
    for t in old._account.tensors.values():
        if t.is_contiguous():
            pool.setdefault((tuple(t.shape), t.dtype, t.device), []).append(t)
    old._fail("its tensors were reused by a later per_sample_grads context (reuse=...)")
    taken = {}
    for cov in covered:
        key = ((n, *cov.param.shape), cov.param.dtype, cov.param.device)
        if pool.get(key):
            taken[cov.name] = pool[key].pop()
    return taken
