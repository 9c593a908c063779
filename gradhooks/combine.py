"""From rules to parameters: sums over calls, modules and tied weights.

A :class:`Site` is one hooked module with its rule and its recorded calls; a
:class:`Covered` parameter has one owner ``(site, local name)`` per module that
owns it (several when weights are tied). The functions here ask each site's
rule once for all of its parameters and add the answers up per parameter, so
rules never see tying. Everything returned is of the *raw* gradient (the
gradient of the reduced loss); rescaling for ``loss_reduction`` is the
caller's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .capture import Call
from .rule import Rule, accumulation_dtype, squared_norms_of

__all__ = ["Site", "Covered", "per_sample", "squared_norms", "weighted_sums", "weighted_sums_into", "dots", "probes", "magnitudes", "rounding_eps"]


@dataclass(eq=False)
class Site:
    """A hooked module: its qualified name, rule, covered local parameter names
    and recorded calls."""

    name: str
    module: nn.Module
    rule: Rule
    names: list[str]
    calls: list[Call] = field(default_factory=list)
    fallback: bool = False
    pruned: bool = False

    @property
    def refusable(self) -> bool:
        """Whether the rule may refuse the module's configuration (checked per call)."""
        return type(self.rule).refuse is not Rule.refuse

    @property
    def label(self) -> str:
        return f"'{self.name}' ({type(self.module).__name__})" if self.name else f"the model ({type(self.module).__name__})"

    def live_calls(self) -> list[Call]:
        """The calls whose outputs received a gradient (the others contribute zeros).

        After the context's exit :meth:`prune` has dropped the others, so this is
        ``calls`` itself. Calls on an empty batch (N = 0) contribute nothing either."""
        calls = self.calls if self.pruned else [c for c in self.calls if c.has_grad]
        return [c for c in calls if c.batch_size != 0]

    def prune(self) -> None:
        """Keep only the calls that received a gradient (frees the others' inputs)."""
        self.calls = [c for c in self.calls if c.has_grad]
        self.pruned = True


@dataclass(eq=False)
class Covered:
    """A parameter with per-sample results: public name, the tensor, its owners."""

    name: str
    param: nn.Parameter
    owners: list[tuple[Site, str]]

    def live_owners(self) -> list[tuple[Site, str]]:
        return [(s, local) for s, local in self.owners if s.live_calls()]



def _by_site(
    covered: Sequence[Covered], select: Callable[[Covered], list[tuple[Site, str]]]
) -> dict[Site, list[tuple[str, Covered]]]:
    """Group the requested (local name, parameter) pairs by site, keeping order."""
    groups: dict[Site, list[tuple[str, Covered]]] = {}
    for cov in covered:
        for site, local in select(cov):
            groups.setdefault(site, []).append((local, cov))
    return groups


def _add(into: dict[str, Tensor], key: str, value: Tensor) -> None:
    into[key] = value if key not in into else into[key] + value


def per_sample(covered: Sequence[Covered], n: int, buffers: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """``{name: (N, *p.shape)}`` raw per-sample gradients, in ``p.dtype``.

    ``buffers``: tensors to write into instead of allocating (reused storage of
    an earlier result, warm in memory); written by ``per_sample_into`` where
    the rule has one.
    """
    buffers = buffers or {}
    out: dict[str, Tensor] = {}
    for site, pairs in _by_site(covered, Covered.live_owners).items():
        direct = [(local, cov) for local, cov in pairs if cov.name in buffers and _writes_into(site.rule)]
        others = [(local, cov) for local, cov in pairs if (local, cov) not in direct]
        if direct:
            targets = {local: buffers[cov.name] for local, cov in direct}
            accumulate = {local: cov.name in out for local, cov in direct}
            site.rule.per_sample_into(site.module, site.live_calls(), list(targets), targets, accumulate)
            for _, cov in direct:
                out[cov.name] = buffers[cov.name]
        if others:
            got = site.rule.per_sample(site.module, site.live_calls(), [local for local, _ in others])
            for local, cov in others:
                t = got[local].to(cov.param.dtype)
                if cov.name in out:
                    out[cov.name].add_(t)
                elif cov.name in buffers:
                    out[cov.name] = buffers[cov.name].copy_(t)
                else:
                    out[cov.name] = t
    for cov in covered:
        if cov.name not in out:
            p = cov.param
            out[cov.name] = (
                buffers[cov.name].zero_() if cov.name in buffers else torch.zeros((n, *p.shape), dtype=p.dtype, device=p.device)
            )
    return out


def _writes_into(rule: Rule) -> bool:
    return type(rule).per_sample_into is not Rule.per_sample_into


def _poolable(owners: list[tuple[Site, str]]) -> bool:
    site0, local0 = owners[0]
    return all(
        site.rule is site0.rule and local == local0 and site0.rule.can_pool(site0.module, site.module, local0)
        for site, local in owners[1:]
    )


def squared_norms(covered: Sequence[Covered], n: int) -> dict[str, Tensor]:
    """``{name: (N,)}`` squared norms of the raw per-sample gradients, float32+.

    Tied parameters: calls of all owners are pooled into one rule call when the
    rule allows it (exact cross terms, nothing materialized); otherwise that one
    parameter's per-sample gradient is built, summed over its owners, reduced
    and freed.
    """
    out: dict[str, Tensor] = {}
    single = [c for c in covered if len(c.live_owners()) == 1]
    for site, pairs in _by_site(single, Covered.live_owners).items():
        got = site.rule.squared_norms(site.module, site.live_calls(), [local for local, _ in pairs])
        for local, cov in pairs:
            out[cov.name] = got[local]
    for cov in covered:
        owners = cov.live_owners()
        if len(owners) < 2:
            continue
        if _poolable(owners):
            site0, local0 = owners[0]
            calls = [c for site, _ in owners for c in site.live_calls()]
            out[cov.name] = site0.rule.squared_norms(site0.module, calls, [local0])[local0]
        else:
            total = None
            for site, local in owners:
                t = site.rule.per_sample(site.module, site.live_calls(), [local])[local]
                total = t if total is None else total + t
            assert total is not None
            out[cov.name] = squared_norms_of(total)
    for cov in covered:
        if cov.name not in out:
            p = cov.param
            out[cov.name] = torch.zeros(n, dtype=accumulation_dtype(p.dtype), device=p.device)
    return out


def weighted_sums(covered: Sequence[Covered], weights: Tensor) -> dict[str, Tensor]:
    """``{name: p.shape}``: ``sum_n weights[n] * raw_n``, float32+ (zeros if no calls)."""
    out: dict[str, Tensor] = {}
    for site, pairs in _by_site(covered, Covered.live_owners).items():
        got = site.rule.weighted_sum(site.module, site.live_calls(), [local for local, _ in pairs], weights)
        for local, cov in pairs:
            _add(out, cov.name, got[local])
    for cov in covered:
        if cov.name not in out:
            p = cov.param
            out[cov.name] = torch.zeros(p.shape, dtype=accumulation_dtype(p.dtype), device=p.device)
    return out


def weighted_sums_into(covered: Sequence[Covered], weights: Tensor, out: dict[str, Tensor]) -> None:
    """Add ``sum_n weights[n] * raw_n`` into ``out[name]`` (float32+, ``p.shape``) in place."""
    for site, pairs in _by_site(covered, Covered.live_owners).items():
        locals_ = [local for local, _ in pairs]
        site.rule.weighted_sum_into(site.module, site.live_calls(), locals_, weights, {local: out[cov.name] for local, cov in pairs})


def dots(covered: Sequence[Covered], others: dict[str, Tensor], n: int) -> dict[str, Tensor]:
    """``{name: (N,)}``: ``<raw_n, others[name]>`` for the covered names present in ``others``."""
    wanted = [c for c in covered if c.name in others]
    out: dict[str, Tensor] = {}
    for site, pairs in _by_site(wanted, Covered.live_owners).items():
        got = site.rule.dots(site.module, site.live_calls(), [local for local, _ in pairs], {local: others[cov.name] for local, cov in pairs})
        for local, cov in pairs:
            _add(out, cov.name, got[local])
    for cov in wanted:
        if cov.name not in out:
            p = cov.param
            out[cov.name] = torch.zeros(n, dtype=accumulation_dtype(p.dtype), device=p.device)
    return out


def probes(covered: Sequence[Covered], vectors: dict[str, Tensor]) -> dict[str, Tensor]:
    """``{name: (shape[0], k)}``: the summed raw gradient times ``vectors[name]``."""
    out: dict[str, Tensor] = {}
    for site, pairs in _by_site(covered, Covered.live_owners).items():
        locals_ = [local for local, _ in pairs]
        got = site.rule.probe(site.module, site.live_calls(), locals_, {local: vectors[cov.name] for local, cov in pairs})
        for local, cov in pairs:
            _add(out, cov.name, got[local])
    return out


def magnitudes(covered: Sequence[Covered]) -> dict[str, Tensor]:
    """``{name: scalar}``: the rules' scale of the summed terms (self-check tolerance)."""
    out: dict[str, Tensor] = {}
    for site, pairs in _by_site(covered, Covered.live_owners).items():
        got = site.rule.magnitudes(site.module, site.live_calls(), [local for local, _ in pairs])
        for local, cov in pairs:
            _add(out, cov.name, got[local].detach().to(torch.float64))
    return out


def rounding_eps(cov: Covered) -> float:
    """Machine epsilon of the least precise float among ``p`` and its captured tensors
    (autocast makes ``G`` bf16/fp16 while ``p`` is float32)."""
    eps = torch.finfo(cov.param.dtype).eps if cov.param.dtype.is_floating_point else 0.0
    for site, _ in cov.live_owners():
        for call in site.calls:
            eps = max(eps, call.eps())
    return eps
