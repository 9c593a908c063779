"""From rules to parameters: sums over calls, uses and tied weights.

A :class:`Site` is one rule applied to a group of recorded calls: a module
with a rule of its own (``register_rule``, a fallback unit), or one kind of
op-level use (``F.linear`` of a weight, an elementwise product with it). It
names its tensors locally (``"weight"``, ``"bias"``) and maps each to the
covered parameters through a :class:`~gradhooks.trace.derive.Chain` (the
identity when the op used the parameter itself).

A :class:`Covered` parameter collects its contributions ``(site, local name)``.
The functions below ask each rule once and add the answers up per parameter.
Calls of the same rule whose tensors map to the parameter identically are
*pooled* (one rule call over all of them), which gives the cross terms of
repeated calls and tied weights exactly without materializing; contributions
through disjoint parts of a parameter (the chunks of an attention projection)
add their squared norms; anything else builds that one parameter's per-sample
gradient, reduces it and frees it. Everything is of the raw gradient (of the
reduced, possibly scaled loss); converting to per-sample units is the
result's job.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .capture import Call
from .errors import GradhooksError, RuleError
from .rule import Rule, accumulation_dtype, squared_norms_of
from .trace.derive import Chain, Source

__all__ = ["Site", "Covered", "Pool", "pools_of", "per_sample", "squared_norms", "weighted_sums", "dots"]


@dataclass(eq=False)
class Site:
    """One rule over a group of calls. ``module``: the module (module-level rules) or
    the op's geometry (an object with the attributes the rule reads and
    ``get_parameter(local)``). ``chains[local]`` leads to the covered parameters."""

    rule: Rule
    module: Any
    labeler: Any  # the site's label, or a callable giving it (computed when a message needs it)
    names: list[str]
    chains: dict[str, Chain]
    calls: list[Call] = field(default_factory=list)
    module_level: bool = False
    fallback: bool = False
    #: default mode: per local name, the origin of the tensor the op used and the
    #: gradient autograd sent to it through this site.
    tracked: dict[str, tuple[Any, Tensor]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        if callable(self.labeler):
            self.labeler = self.labeler()
        return self.labeler

    def run(self, method: str, calls: Sequence[Call], *args: Any) -> Any:
        """``self.rule.<method>(self.module, calls, *args)``; a failure inside the rule
        becomes a :class:`~gradhooks.errors.RuleError` naming the site and the rule."""
        try:
            return getattr(self.rule, method)(self.module, calls, *args)
        except (GradhooksError, torch.OutOfMemoryError):
            raise
        except Exception as err:
            raise RuleError(
                f"{self.label}: {type(self.rule).__name__}.{method} failed on the recorded calls "
                f"({type(err).__name__}: {err}). If this is your rule (register_rule), test it with "
                "gradhooks.check_rule(rule, module, inputs); otherwise please report it."
            ) from err

    @property
    def refusable(self) -> bool:
        return type(self.rule).refuse is not Rule.refuse

    def live_calls(self) -> list[Call]:
        """The calls whose outputs received a gradient, on a non-empty batch."""
        return [c for c in self.calls if c.has_grad and c.batch_size != 0]

    def prune(self) -> None:
        """Keep only the calls that received a gradient (frees the others' inputs)."""
        self.calls = [c for c in self.calls if c.has_grad]


@dataclass(eq=False)
class Covered:
    """A parameter with per-sample results: public name, the tensor, its contributions."""

    name: str
    param: nn.Parameter
    source: Source
    contributions: list[tuple[Site, str]] = field(default_factory=list)

    def live(self) -> list[tuple[Site, str]]:
        return [(s, local) for s, local in self.contributions if s.live_calls()]

    @property
    def module_level(self) -> bool:
        return any(s.module_level for s, _ in self.contributions)


@dataclass(eq=False)
class Pool:
    """Contributions one rule call can serve together (same rule, same map)."""

    site: Site
    local: str
    chain: Chain
    calls: list[Call]
    alone: bool = True  # only ``site``'s own calls: one rule call may serve all its names

    def per_sample(self, cache: _SiteCache | None = None) -> Tensor:
        """``(N, *c.shape)``, the rule's per-sample gradient of its tensor."""
        if cache is not None:
            return cache.get(self, lambda names: self.site.run("per_sample", self.calls, names))
        return self.site.run("per_sample", self.calls, [self.local])[self.local]


class _SiteCache:
    """Within one query: one rule call per site for all its names that pool alone
    (a fallback unit replays its forward once for all its parameters, not per name)."""

    def __init__(self, pools: Sequence[Pool]) -> None:
        self.names: dict[int, list[str]] = {}
        for pool in pools:
            if pool.alone and pool.chain.identity:
                self.names.setdefault(id(pool.site), []).append(pool.local)
        self.done: dict[int, dict[str, Any]] = {}

    def get(self, pool: Pool, compute: Any) -> Any:
        if not (pool.alone and pool.chain.identity):
            return compute([pool.local])[pool.local]
        key = id(pool.site)
        if key not in self.done:
            self.done[key] = compute(list(dict.fromkeys(self.names[key])))
        return self.done[key][pool.local]


def _same_map(a: Chain, b: Chain) -> bool:
    if a.identity or b.identity:
        return a.identity and b.identity and a.origin is b.origin
    ia, ib = a.flat_index(), b.flat_index()
    return ia is not None and ib is not None and ia.shape == ib.shape and torch.equal(ia, ib)


def pools_of(cov: Covered) -> list[Pool]:
    """Group the parameter's live contributions into poolable sets."""
    pools: list[Pool] = []
    for site, local in cov.live():
        chain = site.chains[local]
        for pool in pools:
            s0 = pool.site
            if (
                s0.rule is site.rule
                and pool.local == local
                and _same_map(pool.chain, chain)
                and (s0 is site or s0.rule.can_pool(s0.module, site.module, local))
            ):
                pool.calls.extend(site.live_calls())
                pool.alone = pool.alone and s0 is site
                break
        else:
            pools.append(Pool(site, local, chain, list(site.live_calls())))
    return pools


def _pulled(pool: Pool, cov: Covered, per: Tensor) -> Tensor:
    """The pool's per-sample gradient mapped to ``cov``'s parameter, ``(N, *p.shape)``."""
    return pool.chain.pull_batched(per)[id(cov.source)]


def _all_pools(covered: Sequence[Covered], unit: float = 1.0) -> tuple[dict[str, list[Pool]], _SiteCache]:
    """Every parameter's pools (their calls scaled by ``unit``, one copy per call) and
    the cache that batches rule calls per site."""
    by_name = {cov.name: pools_of(cov) for cov in covered}
    if unit != 1.0:
        copies: dict[int, Call] = {}
        for pools in by_name.values():
            for pool in pools:
                pool.calls = [copies.setdefault(id(c), c.scaled(unit)) for c in pool.calls]
    return by_name, _SiteCache([p for pools in by_name.values() for p in pools])


def _parameter_per_sample(cov: Covered, pools: list[Pool], n: int, cache: _SiteCache | None = None) -> Tensor:
    p = cov.param
    total: Tensor | None = None
    for pool in pools:
        t = _pulled(pool, cov, pool.per_sample(cache))
        total = t.to(p.dtype) if total is None else total.add_(t.to(total.dtype))
    return total if total is not None else torch.zeros((n, *p.shape), dtype=p.dtype, device=p.device)


def per_sample(covered: Sequence[Covered], n: int, unit: float = 1.0, buffers: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """``{name: (N, *p.shape)}``: the raw per-sample gradients times ``unit``, in
    ``p.dtype``. Every rule is linear in ``G``: the (small) gradients are scaled,
    on copies, not the (large) results. ``buffers``: tensors to write into instead
    of allocating (reused storage, warm in memory)."""
    buffers = buffers or {}
    by_name, cache = _all_pools(covered, unit)
    out: dict[str, Tensor] = {}
    for cov in covered:
        pools = by_name[cov.name]
        buf = buffers.get(cov.name)
        if buf is not None and pools and all(pl.chain.identity for pl in pools):
            for k, pool in enumerate(pools):
                pool.site.run("per_sample_into", pool.calls, [pool.local], {pool.local: buf}, {pool.local: k > 0})
            out[cov.name] = buf
            continue
        t = _parameter_per_sample(cov, pools, n, cache)
        out[cov.name] = buf.copy_(t) if buf is not None else t
    return out


def _disjoint(pools: list[Pool]) -> bool:
    """Whether every pool reaches its own part of the parameter, injectively."""
    taken: Tensor | None = None
    for pool in pools:
        index = pool.chain.flat_index()
        if index is None or not pool.chain.injective():
            return False
        flat = index.reshape(-1)
        if taken is None:
            taken = torch.zeros(pool.chain.sources[0].param.numel(), dtype=torch.bool, device=flat.device)
        if bool(taken[flat].any()):
            return False
        taken[flat] = True
    return True


def _stacked(groups: Sequence[Any], kind: str, *args: Any) -> dict[int, dict[str, Tensor]]:
    """Results of stacked groups (:mod:`gradhooks.stacking`) by ``id(site)``."""
    out: dict[int, dict[str, Tensor]] = {}
    for group in groups:
        p = group.sites[0].module.get_parameter(group.sites[0].names[0])
        acc = accumulation_dtype(p.dtype)
        out.update(group.squared_norms(acc) if kind == "norms" else group.weighted_sums(args[0], acc))
    return out


def squared_norms(covered: Sequence[Covered], n: int, groups: Sequence[Any] = ()) -> dict[str, Tensor]:
    """``{name: (N,)}`` squared norms of the raw per-sample gradients, float32+."""
    by_name, cache = _all_pools(covered)
    for site_id, got in _stacked(groups, "norms").items():
        cache.done[site_id] = got
    out: dict[str, Tensor] = {}
    for cov in covered:
        pools = by_name[cov.name]
        acc = accumulation_dtype(cov.param.dtype)
        if not pools:
            out[cov.name] = torch.zeros(n, dtype=acc, device=cov.param.device)
        elif (len(pools) == 1 and pools[0].chain.injective()) or _disjoint(pools):
            total = None
            for pool in pools:
                t = cache.get(pool, lambda names, pool=pool: pool.site.run("squared_norms", pool.calls, names))
                total = t if total is None else total + t
            assert total is not None  # pools is not empty here
            out[cov.name] = total
        else:
            out[cov.name] = squared_norms_of(_parameter_per_sample(cov, pools, n))
    return out


def weighted_sums(covered: Sequence[Covered], weights: Tensor, out: dict[str, Tensor | None] | None = None,
                  groups: Sequence[Any] = ()) -> dict[str, Tensor]:
    """``{name: p.shape}``: ``sum_n weights[n] * raw_n``, float32+. With ``out``, added
    into those tensors in place (``clip_`` writes straight into ``p.grad``); an entry
    of ``None`` is a fresh buffer, which a stacked group's (or a single rule call's)
    result may simply become."""
    result: dict[str, Any] = {} if out is None else out
    by_name, cache = _all_pools(covered)
    stacked = _stacked(groups, "sums", weights)
    for cov in covered:
        pools = by_name[cov.name]
        if result.get(cov.name) is None and len(pools) == 1 and pools[0].alone and id(pools[0].site) in stacked:
            result[cov.name] = stacked[id(pools[0].site)][pools[0].local]  # a view of the group's result
            pools.clear()
    adopt = _adoptable(covered, by_name, {cov.name for cov in covered if result.get(cov.name) is None}, stacked)
    targets: dict[tuple[int, str], Tensor] = {}
    for cov in covered:
        p, pools = cov.param, by_name[cov.name]
        if pools and id(pools[0].site) in adopt:
            # The rule's allocating form becomes the result: no zero-fill (and read)
            # of p.shape memory.
            pool = pools[0]
            result[cov.name] = cache.get(pool, lambda names, pool=pool: pool.site.run("weighted_sum", pool.calls, names, weights))
            pools.clear()
            continue
        if result.get(cov.name) is None:
            result[cov.name] = torch.zeros(p.shape, dtype=accumulation_dtype(p.dtype), device=p.device)
        for pool in pools:
            if pool.chain.identity:
                targets[(id(pool.site), pool.local)] = result[cov.name]
    for cov in covered:
        for pool in by_name[cov.name]:
            _add_pool(pool, cov, result[cov.name], weights, stacked, cache, targets)
    return result


def _add_pool(pool: Pool, cov: Covered, target: Tensor, weights: Tensor, stacked: dict[int, dict[str, Tensor]],
              cache: _SiteCache, targets: dict[tuple[int, str], Tensor]) -> None:
    """``target += sum_n weights[n] * (pool's raw_n mapped to cov's parameter)``."""
    site_id = id(pool.site)
    if pool.alone and site_id in stacked:
        target.add_(stacked[site_id][pool.local].to(target.dtype))
    elif pool.chain.identity:

        def into(names: list[str]) -> dict[str, None]:
            outs = {nm: targets[(site_id, nm)] for nm in names} if pool.alone else {pool.local: target}
            pool.site.run("weighted_sum_into", pool.calls, names, weights, outs)
            return dict.fromkeys(names)

        cache.get(pool, into)
    else:
        s = pool.site.run("weighted_sum", pool.calls, [pool.local], weights)[pool.local]
        target.add_(pool.chain.pull(s)[id(cov.source)].to(target.dtype))


def _adoptable(covered: Sequence[Covered], by_name: dict[str, list[Pool]], fresh: set[str], stacked: dict[int, Any]) -> set[int]:
    """Sites whose every name is the one contribution (alone, identity) of a
    parameter without a target yet: their weighted sums can simply become the result."""
    ok: dict[int, bool] = {}
    for cov in covered:
        pools = by_name[cov.name]
        for pool in pools:
            single = len(pools) == 1 and pool.alone and pool.chain.identity and cov.name in fresh
            key = id(pool.site)
            ok[key] = ok.get(key, True) and single and key not in stacked
    return {k for k, v in ok.items() if v}


def dots(covered: Sequence[Covered], others: dict[str, Tensor], n: int) -> dict[str, Tensor]:
    """``{name: (N,)}``: ``<raw_n, others[name]>`` for the covered names in ``others``."""
    out: dict[str, Tensor] = {}
    wanted = [cov for cov in covered if cov.name in others]
    by_name, _ = _all_pools(wanted)
    for cov in wanted:
        v = others[cov.name]
        acc = accumulation_dtype(cov.param.dtype)
        total = torch.zeros(n, dtype=acc, device=cov.param.device)
        for pool in by_name[cov.name]:
            tangent = pool.chain.push({id(cov.source): v.to(device=cov.param.device, dtype=cov.param.dtype)})
            got = pool.site.run("dots", pool.calls, [pool.local], {pool.local: tangent})[pool.local]
            total = total + got.to(acc)
        out[cov.name] = total
    return out
