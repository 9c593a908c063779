"""The rule side of :func:`gradhooks.check_rule`: a module-level rule's every query
on recorded calls, against the naive loop (one ``autograd.grad`` per sample of
``sum <out_n, G_n>`` through the same forward), float64.

A call is recorded as the context's module hook records it (inputs detached,
one random ``G`` per output leaf of batch size ``N``); the module is called
``calls`` times, whose gradients the rule must add up.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from .capture import Call, detach_tree
from .errors import InvalidArgumentError
from .rule import Rule

__all__ = ["check_direct", "rel", "norm", "pct", "sum_hint"]


def rel(got: Tensor, want: Tensor, scale: float) -> float:
    """``||got - want|| / scale`` in float64 (``scale`` floored to avoid 0/0)."""
    err = float(torch.linalg.vector_norm((got.to(torch.float64) - want.to(torch.float64)).reshape(-1)))
    return err / max(scale, 1e-300) if err > 0 else 0.0


def norm(t: Tensor) -> float:
    return float(torch.linalg.vector_norm(t.to(torch.float64).reshape(-1)))


def _record(m: nn.Module, args: tuple[Any, ...], kw: dict[str, Any], n: int, calls: int, gen: torch.Generator) -> tuple[list[Call], Tensor]:
    """``calls`` forward calls of ``m`` recorded as a hook would (inputs detached, a
    random ``G`` per output leaf of batch size ``n``), and ``(N,)``: each sample's
    ``sum <out, G>`` over the calls, still in the graph (for the naive loop)."""
    recorded, total = [], torch.zeros(n, dtype=torch.float64)
    in_leaves = pytree.tree_leaves((args, kw))
    batched = [i for i, t in enumerate(in_leaves) if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == n]
    for _ in range(calls):
        leaves = pytree.tree_leaves(m(*args, **kw))
        call = Call(detach_tree(args), detach_tree(kw), leaves)
        call.memo["batched_leaves"] = batched
        for i, o in enumerate(leaves):
            if isinstance(o, Tensor) and o.requires_grad and o.dim() > 0 and o.shape[0] == n:
                g = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype)
                call.grads[i] = g
                total = total + (o * g).reshape(n, -1).sum(1).to(torch.float64)
        recorded.append(call)
    if not any(c.has_grad for c in recorded):
        raise InvalidArgumentError("check_rule: no output of the module has batch size N and requires grad")
    return recorded, total


def _naive(m: nn.Module, total: Tensor, names: list[str]) -> dict[str, Tensor]:
    """``{name: (N, *p.shape)}``: one ``autograd.grad`` per sample of its ``sum <out, G>``."""
    params = [m.get_parameter(k) for k in names]
    rows: list[Sequence[Tensor | None]] = []
    for i in range(total.shape[0]):
        rows.append(torch.autograd.grad(total[i], params, retain_graph=True, allow_unused=True))
    return {k: torch.stack([torch.zeros_like(p) if (t := r[j]) is None else t for r in rows]) for j, (k, p) in enumerate(zip(names, params, strict=True))}


def check_direct(rule: Rule, m: nn.Module, args: tuple[Any, ...], kw: dict[str, Any], names: list[str], n: int,
                  calls: int, rtol: float, seed: int) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    recorded, total = _record(m, args, kw, n, calls, gen)
    ref = _naive(m, total, names)
    versions = [(t, t._version) for t in pytree.tree_leaves((recorded[0].args, recorded[0].kwargs, [c.grads for c in recorded])) if isinstance(t, Tensor)]
    problems: list[str] = []

    def compare(what: str, got: Tensor | None, want: Tensor, scale: float | None = None) -> bool:
        if got is None or tuple(got.shape) != tuple(want.shape):
            shape = None if got is None else tuple(got.shape)
            problems.append(f"{what}: shape {shape}, expected {tuple(want.shape)}")
            return False
        err = rel(got, want, scale if scale is not None else norm(want))
        if err > rtol:
            problems.append(f"{what} differs from the naive loop by {pct(err)}{sum_hint(got, want) if what.startswith('per_sample(') else ''}")
        return err <= rtol

    try:
        _queries(rule, m, recorded, names, ref, n, gen, compare)
        _probe(rule, m, recorded, names, ref, gen, compare, problems.append)
    except Exception as err:
        problems.append(f"the rule raised {type(err).__name__}: {err}")
    if any(t._version != v for t, v in versions):
        problems.append("the rule modified its recorded inputs or output gradients in place")
    return problems


def _queries(rule: Rule, m: nn.Module, calls: list[Call], names: list[str], ref: dict[str, Tensor], n: int,
             gen: torch.Generator, compare: Callable[..., bool]) -> None:
    """Every query of the rule against its value from ``ref`` (the naive loop)."""
    got = rule.per_sample(m, calls, names)
    for k in names:
        if compare(f"per_sample({k!r})", got.get(k), ref[k]):  # and asked for alone
            compare(f"per_sample({k!r}) (asked for alone)", rule.per_sample(m, calls, [k]).get(k), ref[k])
        base = torch.randn(ref[k].shape, generator=gen, dtype=torch.float64)
        out = {k: base.clone()}
        rule.per_sample_into(m, calls, [k], out, {k: True})
        compare(f"per_sample_into({k!r}, accumulate=True)", out[k], base + ref[k])
    sq = rule.squared_norms(m, calls, names)
    per_sample_sq = {k: ref[k].reshape(n, -1).square().sum(1) for k in names}
    for k in names:
        compare(f"squared_norms({k!r})", sq.get(k), per_sample_sq[k])
    parts = list(per_sample_sq.values())
    sq_total = parts[0]
    for part in parts[1:]:
        sq_total = sq_total + part
    norms = sq_total.sqrt()
    weights = (float(norms.median()) / (norms + 1e-6)).clamp(max=1.0)  # clip_'s factors at the median norm
    into = {k: torch.randn(m.get_parameter(k).shape, generator=gen, dtype=torch.float64) for k in names}
    start = {k: t.clone() for k, t in into.items()}
    rule.weighted_sum_into(m, calls, names, weights, into)
    others = {k: torch.randn(m.get_parameter(k).shape, generator=gen, dtype=torch.float64) for k in names}
    dots = rule.dots(m, calls, names, others)
    for k in names:
        want = torch.einsum("n,n...->...", weights, ref[k])
        compare(f"weighted_sum_into({k!r}) (clip_'s clipped sum)", into[k] - start[k], want,
                norm(torch.einsum("n,n...->...", weights, ref[k].abs())))
        compare(f"dots({k!r})", dots.get(k), ref[k].reshape(n, -1) @ others[k].reshape(-1))


def _probe(rule: Rule, m: nn.Module, calls: list[Call], names: list[str], ref: dict[str, Tensor],
           gen: torch.Generator, compare: Callable[..., bool], report: Callable[[str], None]) -> None:
    """The exit check's view of the rule: ``probe`` and ``magnitudes``."""
    vectors, want = {}, {}
    for k in names:
        s = ref[k].sum(0)
        rows = s.shape[0] if s.dim() >= 1 and s.shape[0] > 0 else 1
        vectors[k] = torch.randn(s.numel() // rows if rows else 0, 3, generator=gen, dtype=torch.float64)
        want[k] = s.reshape(rows, -1) @ vectors[k]
    got = rule.probe(m, calls, names, vectors)
    mags = rule.magnitudes(m, calls, names)
    for k in names:
        compare(f"probe({k!r})", got.get(k), want[k])
        mag = float(mags[k]) if k in mags else float("nan")
        if not math.isfinite(mag) or mag < (1 - 1e-9) * norm(ref[k].sum(0)):
            report(f"magnitudes({k!r}) is {mag:.3g}: the exit check's rounding scale must be finite and at least "
                   f"||sum_n g_n|| = {norm(ref[k].sum(0)):.3g}")


def pct(err: float) -> str:
    return f"{err:.3g} relative" if err < 1e-2 else f"{100 * err:.3g}%"


def sum_hint(got: Tensor, want: Tensor) -> str:
    err = rel(got.sum(0), want.sum(0), norm(want.sum(0)))
    if err <= 1e-9:
        return " while its batch sum is right: rows are attributed to the wrong samples (the exit check, which compares sums, cannot see this)"
    return f" (batch sum off by {pct(err)})"
