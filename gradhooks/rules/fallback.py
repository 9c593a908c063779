"""The ``torch.func`` fallback (``per_sample_grads(..., fallback=True)``).

A module with no rule is handled as one unit with its whole subtree: sample n's
gradient is the vector-Jacobian product of the module's own forward, replayed
on sample n's captured inputs (as a batch of one), with sample n's captured
output gradients::

    raw_n = vjp(p -> module(p; args_n, kwargs_n), p)(G_n)      summed over calls

``torch.func.vmap`` runs it for a block of samples at once. Inputs: tensor
leaves of the call's ``args``/``kwargs`` whose dimension 0 is N are sliced per
sample; every other leaf (masks shared by the batch, flags) is passed whole.
Outputs: every tensor leaf that received a gradient; the others contribute
zero. Only the requested parameters are differentiated; the module's other
parameters and buffers are used as they are.

Valid when the module treats the samples of a batch independently. If it does
not (a batch statistic), the replay gives other numbers and the exit
self-check reports the difference; if ``vmap`` cannot run it (data-dependent
control flow, ``.item()``, an op without a batching rule, random draws) the
error names the module and the remedies. Dropout in training mode is refused
at the forward call, since the replay cannot redraw the same mask.

Temporaries are bounded: samples are processed in blocks of at most
:data:`BLOCK_ELEMENTS` per-sample gradient elements, reduced (norms, weighted
sums, probes) block by block. The exit check's replay (``probe``) also leaves
the squared norms and the rounding scale on the first call's ``memo`` (``(N,)``
and a scalar per parameter), so ``magnitudes`` and ``norms()`` reuse it.

Rounding scale: the exit check allows rounding relative to the size of the
*terms* backward summed, not of the sum (a scalar bias before a softmax or a
LayerNorm gets a gradient that cancels to ~0). With no formula for the terms,
the same pullback is also applied to ``G`` with random signs (a fixed private
generator): that breaks the cancellation and gives the terms' scale, so
``magnitudes`` is ``sum_n (||raw_n|| + ||raw(s * G)_n||)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.dropout import _DropoutNd
from torch.utils import _pytree as pytree

from ..capture import Call
from ..errors import InvalidArgumentError, RuleError
from ..rule import Rule, accumulation_dtype, long_sum_slack, squared_norms_of

__all__ = ["FallbackRule", "BLOCK_ELEMENTS"]

#: At most this many per-sample gradient elements (block rows times the
#: requested parameters' sizes) exist at once, besides a materialized result.
BLOCK_ELEMENTS = 1 << 24

#: functorch's notice that an op runs through its slow per-sample fallback: not
#: actionable by the user, so silenced during the replay.
_SLOW_BATCHING = "There is a performance drop because we have not yet implemented the batching rule"

_REMEDY = (
    "The torch.func fallback needs a module that treats the samples of a batch "
    "independently and that torch.func.vmap can run (no data-dependent Python control "
    "flow, no .item(), no random draws). Write a rule for it with gradhooks.register_rule, "
    "or pass strict=False (without fallback=True) to leave its parameters out."
)


def _random_parts(module: nn.Module) -> list[str]:
    """Submodules of ``module`` that draw random numbers in their current mode."""
    found = []
    for name, m in module.named_modules():
        if not m.training:
            continue
        if isinstance(m, _DropoutNd) and m.p > 0:
            found.append(f"'{name or '.'}' ({type(m).__name__}, p={m.p})")
        elif isinstance(m, nn.MultiheadAttention) and m.dropout > 0:
            found.append(f"'{name or '.'}' ({type(m).__name__}, dropout={m.dropout})")
    return found


class _Replay:
    """One recorded call, ready to be replayed a block of samples at a time."""

    def __init__(self, module: nn.Module, call: Call, n: int, label: str) -> None:
        self.module = module
        self.label = label
        leaves, self.spec = pytree.tree_flatten((call.args, call.kwargs))
        self.leaves = leaves
        # The tracer knows which inputs carry the batch (in dimension 0).
        known: list[int] | None = call.memo.get("batched_leaves")
        self.batched: list[int] = known if known is not None else [
            i for i, t in enumerate(leaves) if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == n
        ]
        self.n_out = len(call.grads)
        # Output leaves that received a gradient (only floating tensors can).
        self.outs = [i for i, g in enumerate(call.grads) if g is not None]
        self.grads: list[Tensor] = [g for g in call.grads if g is not None]
        self.signs: list[Tensor] = []

    def with_signs(self) -> None:
        """Draw the random signs for the rounding scale, one per element of ``G``."""
        self.signs = [_random_signs(g) for g in self.grads]

    def _one(
        self, params: dict[str, Tensor], inputs: list[Tensor], grads: list[Tensor], signs: list[Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Sample n's raw gradient, and that of ``signs * G`` when signs are given:
        ``inputs``/``grads``/``signs`` are sample n's rows (no batch dim)."""
        from torch.func import functional_call, vjp  # lazily: only fallback=True needs torch.func
        leaves = list(self.leaves)
        for i, t in zip(self.batched, inputs, strict=True):
            leaves[i] = t.unsqueeze(0)
        args, kwargs = pytree.tree_unflatten(leaves, self.spec)

        def forward(trainable: dict[str, Tensor]) -> tuple[Tensor, ...]:
            out = pytree.tree_leaves(functional_call(self.module, trainable, tuple(args), kwargs))
            if len(out) != self.n_out:
                raise RuleError(
                    f"replaying the forward gave {len(out)} output leaves, the recorded call had {self.n_out}"
                )
            return tuple(out[i] for i in self.outs)

        pullback = vjp(forward, params)[1]
        raw = pullback(tuple(g.unsqueeze(0) for g in grads))[0]
        if not signs:
            return raw, {}
        return raw, pullback(tuple((s * g).unsqueeze(0) for s, g in zip(signs, grads, strict=True)))[0]

    def block(
        self, params: dict[str, Tensor], start: int, stop: int
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``{name: (stop - start, *p.shape)}``: raw per-sample gradients of rows
        ``start:stop``; and those of the signed ``G`` after :meth:`with_signs` (else empty)."""
        inputs = [self.leaves[i][start:stop] for i in self.batched]
        grads = [g[start:stop] for g in self.grads]
        signs = [s[start:stop] for s in self.signs]
        from torch.func import vmap

        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_SLOW_BATCHING)
                return vmap(self._one, in_dims=(None, 0, 0, 0), randomness="error")(params, inputs, grads, signs)
        except Exception as err:
            raise RuleError(
                f"fallback=True: torch.func could not compute per-sample gradients of {self.label}: "
                f"{type(err).__name__}: {err}\n{_REMEDY}"
            ) from err


class FallbackRule(Rule):
    """Per-sample gradients of any module (with its subtree) through ``torch.func``.

    Not registered for any type: ``per_sample_grads(..., fallback=True)`` uses it
    for modules that own trainable parameters and have no rule. ``names`` may be
    dotted (parameters of submodules). ``label`` names the module in errors.
    """

    def __init__(self, label: str | None = None) -> None:
        self.label = label

    def _label(self, module: nn.Module) -> str:
        return self.label or f"the {type(module).__name__} module"

    def refuse(self, module: nn.Module) -> str | None:
        random = _random_parts(module)
        if not random:
            return None
        return (
            f"fallback=True replays this module's forward with torch.func at exit, which cannot "
            f"redraw the random mask of dropout in training mode ({', '.join(random)}). Put those "
            "submodules in eval mode (or p=0) for the per-sample pass, or write a rule with "
            "gradhooks.register_rule."
        )

    # -- the one replay every method reduces --------------------------------

    def _blocks(
        self, module: nn.Module, calls: Sequence[Call], names: Sequence[str], signed: bool = False
    ) -> Iterator[tuple[int, int, dict[str, Tensor], dict[str, Tensor]]]:
        """``(start, stop, raw, signed_raw)`` over blocks of samples: ``{name: (stop -
        start, *p.shape)}`` each, summed over ``calls``; ``signed_raw`` is that of the
        randomly signed ``G`` when ``signed``, else empty."""
        n = _batch_size(calls)
        params = {name: module.get_parameter(name).detach() for name in names}
        per_row = max(1, sum(p.numel() for p in params.values())) * (2 if signed else 1)
        rows = max(1, min(n, BLOCK_ELEMENTS // per_row))
        replays = [_Replay(module, c, n, self._label(module)) for c in calls]
        if signed:
            for replay in replays:
                replay.with_signs()
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            total: dict[str, Tensor] = {}
            total_signed: dict[str, Tensor] = {}
            for replay in replays:
                got, got_signed = replay.block(params, start, stop)
                _accumulate(total, got, names)
                if got_signed:
                    _accumulate(total_signed, got_signed, names)
            yield start, stop, total, total_signed

    def per_sample(self, module: nn.Module, calls: Sequence[Call], names: Sequence[str]) -> dict[str, Tensor]:
        """``{name: (N, *p.shape)}`` in ``p.dtype``."""
        n = _batch_size(calls)
        out: dict[str, Tensor] = {}
        for start, stop, block, _ in self._blocks(module, calls, names):
            if start == 0 and stop == n:
                return {name: block[name].to(module.get_parameter(name).dtype) for name in names}
            if not out:
                out = {name: _empty(module, name, n) for name in names}
            for name in names:
                out[name][start:stop] = block[name]
        return out

    def per_sample_into(
        self,
        module: nn.Module,
        calls: Sequence[Call],
        names: Sequence[str],
        out: dict[str, Tensor],
        accumulate: dict[str, bool],
    ) -> None:
        """Write (or add) each block into ``out[name][start:stop]``."""
        for start, stop, block, _ in self._blocks(module, calls, names):
            for name in names:
                if accumulate.get(name):
                    out[name][start:stop].add_(block[name])
                else:
                    out[name][start:stop].copy_(block[name])

    def squared_norms(self, module: nn.Module, calls: Sequence[Call], names: Sequence[str]) -> dict[str, Tensor]:
        """``{name: (N,)}``, float32+; reuses the exit check's (memo) when present."""
        memo = _memo(calls)
        key = _memo_key(calls)
        out = {name: memo[(key, name)] for name in names if (key, name) in memo}
        missing = [name for name in names if name not in out]
        if missing:
            parts: dict[str, list[Tensor]] = {name: [] for name in missing}
            for _, _, block, _ in self._blocks(module, calls, missing):
                for name in missing:
                    parts[name].append(squared_norms_of(block[name]))
            for name in missing:
                out[name] = memo[(key, name)] = torch.cat(parts[name])
        return {name: out[name] for name in names}

    def weighted_sum(
        self, module: nn.Module, calls: Sequence[Call], names: Sequence[str], weights: Tensor
    ) -> dict[str, Tensor]:
        """``{name: p.shape}``: ``sum_n weights[n] * raw_n``, float32+. ``weights``: ``(N,)``.
        All ones (the exit check's batch sum): one replay that also leaves the squared
        norms and the rounding scale in the memo."""
        if bool((weights == 1).all()):
            return self._reduce_all(module, calls, names)
        out: dict[str, Tensor] = {}
        for start, stop, block, _ in self._blocks(module, calls, names):
            for name in names:
                t = block[name]
                acc = accumulation_dtype(t.dtype)
                part = torch.tensordot(weights[start:stop].to(device=t.device, dtype=acc), t.to(acc), dims=1)
                out[name] = part if name not in out else out[name] + part
        return out

    def dots(
        self, module: nn.Module, calls: Sequence[Call], names: Sequence[str], others: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        """``{name: (N,)}``: ``<raw_n, others[name]>``, float32+."""
        parts: dict[str, list[Tensor]] = {name: [] for name in names}
        for _, _, block, _ in self._blocks(module, calls, names):
            for name in names:
                t = block[name]
                acc = accumulation_dtype(t.dtype)
                v = others[name].to(device=t.device, dtype=acc).reshape(-1)
                parts[name].append(t.reshape(t.shape[0], -1).to(acc) @ v)
        return {name: torch.cat(parts[name]) for name in names}

    def probe(
        self, module: nn.Module, calls: Sequence[Call], names: Sequence[str], vectors: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        """``{name: (rows, k)}``: ``S.reshape(rows, -1) @ vectors[name]``, ``S = sum_n raw_n``
        (``rows``: ``shape[0]``, or 1 for a scalar). The same replay leaves the squared
        norms and the rounding scale in the memo, for :meth:`magnitudes` and ``norms()``."""
        sums: dict[str, Tensor] = {}
        for name, s in self._reduce_all(module, calls, names).items():
            rows = s.shape[0] if s.dim() >= 1 and s.shape[0] > 0 else 1
            sums[name] = s.reshape(rows, -1) @ vectors[name].to(s.dtype)
        return sums

    def magnitudes(self, module: nn.Module, calls: Sequence[Call], names: Sequence[str]) -> dict[str, Tensor]:
        """``{name: scalar}``: ``sum_n (||raw_n|| + ||raw(s * G)_n||)``, the terms' scale
        (see the module docstring); from the memo of :meth:`probe` when present."""
        memo = _memo(calls)
        key = _memo_key(calls)
        if any((key, "scale", name) not in memo for name in names):
            self._reduce_all(module, calls, names)
        n = calls[0].batch_size or 1
        return {name: memo[(key, "scale", name)] * long_sum_slack(n) for name in names}

    def _reduce_all(self, module: nn.Module, calls: Sequence[Call], names: Sequence[str]) -> dict[str, Tensor]:
        """One replay: ``{name: p.shape}`` sums ``sum_n raw_n`` (float32+), and into the
        memo each name's squared norms ``(N,)`` and rounding scale."""
        memo = _memo(calls)
        key = _memo_key(calls)
        sums: dict[str, Tensor] = {}
        squares: dict[str, list[Tensor]] = {name: [] for name in names}
        scales: dict[str, Tensor | float] = dict.fromkeys(names, 0.0)
        for _, _, block, signed in self._blocks(module, calls, names, signed=True):
            for name in names:
                t = block[name]
                acc = accumulation_dtype(t.dtype)
                part = t.to(acc).sum(0)
                sums[name] = part if name not in sums else sums[name] + part
                sq = squared_norms_of(t)
                squares[name].append(sq)
                scales[name] = scales[name] + sq.sqrt().sum() + squared_norms_of(signed[name]).sqrt().sum()
        for name in names:
            memo[(key, name)] = torch.cat(squares[name])
            memo[(key, "scale", name)] = scales[name]
        return sums


def _accumulate(into: dict[str, Tensor], got: dict[str, Tensor], names: Sequence[str]) -> None:
    for name in names:
        if name in into:
            into[name] += got[name]
        else:
            into[name] = got[name]


def _random_signs(g: Tensor) -> Tensor:
    """``+-1`` of ``g``'s shape and dtype, from a fixed private generator (the
    user's random streams are left alone)."""
    gen = torch.Generator(device=g.device).manual_seed(0x5167)
    return torch.empty(g.shape, dtype=g.dtype, device=g.device).bernoulli_(0.5, generator=gen).mul_(2).sub_(1)


def _batch_size(calls: Sequence[Call]) -> int:
    """N: dimension 0 of the first gradient that arrived."""
    for call in calls:
        for g in call.grads:
            if g is not None:
                return int(g.shape[0])
    raise InvalidArgumentError("no call of this module received a gradient")


def _memo_key(calls: Sequence[Call]) -> tuple[Any, ...]:
    """Identifies this group of calls (captures are never modified after backward)."""
    return ("fallback.squared_norms", tuple(id(c) for c in calls))


def _memo(calls: Sequence[Call]) -> dict[tuple[Any, ...], Any]:
    """The fallback's cache on the first call (a ``"~"`` key: a scaled copy drops it)."""
    return calls[0].memo.setdefault("~fallback", {})


def _empty(module: nn.Module, name: str, n: int) -> Tensor:
    p = module.get_parameter(name)
    return torch.empty((n, *p.shape), dtype=p.dtype, device=p.device)
