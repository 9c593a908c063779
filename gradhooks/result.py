"""``PerSampleGrads``: the read-only mapping the context manager returns.

It holds either the materialized per-sample gradients or, with
``materialize=False``, the captured inputs and output gradients from which
norms and clipped sums are computed exactly on demand.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

from . import combine
from .combine import Covered
from .distributed import World
from .errors import ContextStateError, NonFiniteNormError
from .rule import accumulation_dtype, squared_norms_of

__all__ = ["PerSampleGrads", "add_gaussian_", "gaussian_like"]

_State = Literal["open", "ready", "failed", "no_backward"]

#: Added to each norm before dividing, as in SPEC.md and torch.nn.utils.clip_grad_norm_.
CLIP_EPS = 1e-6


def gaussian_like(p: Tensor, std: float, generator: torch.Generator | None) -> Tensor:
    """``N(0, std^2)`` of ``p.shape`` on ``p.device``, drawn in float32 (float64 for
    float64 ``p``) from ``generator`` (PyTorch's global one when ``None``)."""
    z = torch.randn(p.shape, generator=generator, device=p.device, dtype=accumulation_dtype(p.dtype))
    return z.mul_(std)


def add_gaussian_(params: Iterable[Tensor], std: float, generator: torch.Generator | None) -> None:
    """``p.grad += gaussian_like(p, std, generator)`` for each ``p`` in order
    (``p.grad`` of ``None`` counts as zeros)."""
    with torch.no_grad():
        for p in params:
            z = gaussian_like(p, std, generator)
            if p.grad is None:
                p.grad = z.to(p.dtype)
            else:
                p.grad.add_(z.to(p.grad.dtype))


class PerSampleGrads(Mapping[str, Tensor]):
    """Per-sample gradients of one batch: ``g[name]`` is ``(N, *p.shape)``.

    Keys are the covered parameters' names as in ``model.named_parameters()``,
    in that order. ``g[name][n]`` is the gradient of sample ``n``'s own loss
    term. Valid once the ``per_sample_grads`` context has exited normally after
    a backward pass; using it otherwise raises ``RuntimeError``.
    """

    def __init__(self, covered: Sequence[Covered], loss_reduction: str, materialize: bool) -> None:
        self._covered = list(covered)
        self._names = [c.name for c in self._covered]
        self._loss_reduction = loss_reduction
        self._materialize = materialize
        self._state: _State = "open"
        self._why = "the per_sample_grads context has not exited yet: use g after the with block"
        self._n = 0
        self._grads: dict[str, Tensor] = {}
        self._before: dict[str, Tensor | None] = {}
        self._squared: dict[str, Tensor] | None = None
        self._world: World | None = None  # the DDP process group, for clip_
        self._grad_scale = 1.0  # GradScaler's scale of the captured gradients
        params = [c.param for c in self._covered]
        self._norm_dtype = (
            torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
        )
        self._fallback_modules: list[str] = []

    # -- lifecycle (called by the context) --------------------------------

    def _ready(
        self,
        n: int,
        before: dict[str, Tensor | None],
        grads: dict[str, Tensor] | None,
        world: World | None = None,
        grad_scale: float = 1.0,
    ) -> None:
        self._n = n
        self._before = before
        self._grads = grads or {}
        self._world = world
        self._grad_scale = grad_scale
        self._state = "ready"

    def _fail(self, why: str) -> None:
        self._state = "failed"
        self._why = why
        self._release()

    def _no_backward(self) -> None:
        self._state = "no_backward"
        self._why = (
            "no backward pass ran inside the per_sample_grads context (no hooked module's "
            "output received a gradient): call loss.backward() inside the with block"
        )
        self._release()

    def _release(self) -> None:
        for cov in self._covered:
            for site, _ in cov.owners:
                for call in site.calls:
                    call.release()
                site.calls.clear()
        self._grads = {}
        self._squared = None

    def _require(self) -> None:
        if self._state != "ready":
            raise ContextStateError(self._why)

    # -- Mapping -------------------------------------------------------------

    def __getitem__(self, name: str) -> Tensor:
        self._require()
        if name not in self._names:
            raise KeyError(name)
        if not self._materialize:
            raise ContextStateError(
                f"per-sample gradients were not materialized (materialize=False), so g[{name!r}] "
                "does not exist; use g.norms(), g.param_norms() or g.clip_(), or enter the "
                "context with materialize=True"
            )
        return self._grads[name]

    def __iter__(self) -> Iterator[str]:
        self._require()
        return iter(self._names)

    def __len__(self) -> int:
        self._require()
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        self._require()
        return name in self._names

    def __repr__(self) -> str:
        if self._state != "ready":
            return f"PerSampleGrads(<{self._state}>)"
        mode = "materialized" if self._materialize else "not materialized"
        return f"PerSampleGrads(batch_size={self._n}, {len(self._names)} parameters, {mode})"

    # -- results -----------------------------------------------------------

    @property
    def batch_size(self) -> int:
        """N, the batch size of the model's input (local samples under DDP)."""
        self._require()
        return self._n

    @property
    def loss_reduction(self) -> str:
        """``"mean"`` or ``"sum"``, as passed to ``per_sample_grads``."""
        return self._loss_reduction

    @property
    def fallback_modules(self) -> list[str]:
        """Qualified names of the modules handled through ``torch.func`` (``fallback=True``)."""
        return list(self._fallback_modules)

    @property
    def params(self) -> dict[str, torch.nn.Parameter]:
        """``{name: parameter}`` for the covered parameters, in key order."""
        return {c.name: c.param for c in self._covered}

    def dot(self, others: Mapping[str, Tensor]) -> Tensor:
        """``(N,)``: ``sum_name <g[name][n], others[name]>`` for each sample.

        ``others`` maps covered parameter names to tensors of the parameter's
        shape (names left out count as zero), e.g. the batch gradient for each
        sample's alignment with it. Exact without materializing.
        """
        self._require()
        unknown = [k for k in others if k not in self._names]
        if unknown:
            raise KeyError(f"dot: not covered parameters: {unknown}")
        for k, v in others.items():
            shape = self.params[k].shape
            if tuple(v.shape) != tuple(shape):
                raise ValueError(f"dot: others[{k!r}] has shape {tuple(v.shape)}, expected {tuple(shape)}")
        if self._materialize:
            terms = []
            for k, v in others.items():
                g = self._grads[k]
                acc = accumulation_dtype(g.dtype)
                terms.append((g.reshape(g.shape[0], math.prod(g.shape[1:])).to(acc) @ v.to(device=g.device, dtype=acc).reshape(-1)).to(self._norm_dtype))
        else:
            got = combine.dots(self._covered, dict(others), self._n)
            terms = [t.to(self._norm_dtype) * self._scale() for t in got.values()]
        if not terms:
            return torch.zeros(self._n, dtype=self._norm_dtype)
        return torch.stack([t.to(terms[0].device) for t in terms]).sum(0)

    def _scale(self) -> float:
        """Raw (gradient of the reduced, possibly GradScaler-scaled loss) to unscaled
        per-sample: N for "mean", 1 for "sum", divided by the loss scale."""
        n = float(self._n) if self._loss_reduction == "mean" else 1.0
        return n / self._grad_scale

    def _squared_norms(self) -> dict[str, Tensor]:
        if self._squared is None:
            if self._materialize:
                sq = {name: squared_norms_of(self._grads[name]) for name in self._names}
                factor = 1.0
            else:
                sq = combine.squared_norms(self._covered, self._n)
                factor = self._scale() ** 2
            self._squared = {name: (sq[name].to(self._norm_dtype) * factor) for name in self._names}
        return self._squared

    def param_norms(self) -> dict[str, Tensor]:
        """``{name: (N,)}``: each sample's L2 gradient norm, per parameter."""
        self._require()
        return {name: sq.sqrt() for name, sq in self._squared_norms().items()}

    def norms(self) -> Tensor:
        """``(N,)``: each sample's L2 gradient norm over all covered parameters."""
        self._require()
        sq = self._squared_norms()
        if not sq:
            return torch.zeros(self._n, dtype=self._norm_dtype)
        devices = {t.device for t in sq.values()}
        dev = next(iter(devices))
        return torch.stack([t.to(dev) for t in sq.values()]).sum(0).sqrt()

    def weighted_sum(self, weights: Tensor, *, names: Iterable[str] | None = None) -> dict[str, Tensor]:
        """``{name: p.shape}``: ``sum_n weights[n] * g[name][n]`` (``weights``: ``(N,)``).

        Exact in both modes (no per-sample tensor when ``materialize=False``);
        float32, or float64 for float64 parameters; in unscaled units under a
        GradScaler. ``names`` restricts it to some covered parameters.
        E.g. ``weights = torch.full((N,), 1 / N)`` gives the batch's mean gradient.
        """
        self._require()
        chosen = self._chosen(names, "weighted_sum")
        if not isinstance(weights, Tensor) or tuple(weights.shape) != (self._n,):
            got = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
            raise ValueError(f"weighted_sum: weights must be a tensor of shape ({self._n},), got {got}")
        if self._materialize:
            out = {}
            for name in chosen:
                t = self._grads[name]
                acc = accumulation_dtype(t.dtype)
                out[name] = torch.tensordot(weights.to(device=t.device, dtype=acc), t.to(acc), dims=1)
            return out
        covered = [c for c in self._covered if c.name in chosen]
        scale = self._scale()
        return {k: v * scale for k, v in combine.weighted_sums(covered, weights).items()}

    def _chosen(self, names: Iterable[str] | None, fn: str) -> list[str]:
        if names is None:
            return list(self._names)
        chosen = [names] if isinstance(names, str) else list(names)
        unknown = [k for k in chosen if k not in self._names]
        if unknown:
            raise KeyError(f"{fn}: not covered parameters: {unknown} (covered: {self._names})")
        return chosen

    def clip_(self, max_norm: float) -> Tensor:
        """Clip each sample's whole gradient to ``max_norm`` and set ``p.grad``.

        Factor ``c_n = min(1, max_norm / (norm_n + 1e-6))``; for every covered
        parameter ``p.grad = grad_before_context + reduce_n(c_n * g_n)``
        (``reduce``: mean for ``"mean"``, sum for ``"sum"``). Idempotent.
        Raises ``FloatingPointError`` (nothing changed) if a norm is not finite.
        Under DDP this is a collective call (see :mod:`gradhooks.distributed`).
        Returns the factors, ``(N,)``.
        """
        return self._clip(max_norm)

    def _clip(
        self,
        max_norm: float,
        *,
        divisor: float | None = None,
        noise_std: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``clip_`` with DP-SGD's options: ``p.grad = before + (sum_n c_n g_n + z) / D``,
        ``z ~ N(0, noise_std^2 I)`` (per-sample units), ``D = divisor`` or the
        reduction's own (global N for "mean", 1 for "sum"). Under DDP the noise
        is drawn once, on rank 0, from its ``generator``, and summed with the rest."""
        self._require()
        if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or math.isnan(max_norm) or max_norm <= 0:
            raise ValueError(f"clip_: max_norm must be a positive number, got {max_norm!r}")
        norms = self.norms()
        bad = (~torch.isfinite(norms)).nonzero().flatten().tolist()
        world = self._world
        total_n = float(self._n)
        if world is not None:
            info = torch.tensor([float(self._n), float(len(bad))], dtype=torch.float64)
            world.sum_([info])
            total_n, bad_anywhere = info.tolist()
        else:
            bad_anywhere = len(bad)
        factors = (max_norm / (norms + CLIP_EPS)).clamp(max=1.0)
        if bad_anywhere:
            if self._grad_scale != 1.0:
                return factors  # GradScaler overflow: p.grad keeps its inf/nan, the scaler skips
            where = f"sample(s) {bad}" if bad else "samples of another rank"
            raise NonFiniteNormError(
                f"clip_: the per-sample gradient norm is not finite for {where}; "
                "p.grad was left unchanged. Check those samples' inputs and the loss."
            )
        if divisor is not None:
            div = float(divisor)
        else:
            div = total_n if self._loss_reduction == "mean" else 1.0
        if world is None:
            self._write_clipped(factors, div)
            if noise_std > 0:
                add_gaussian_([c.param for c in self._covered], noise_std * self._grad_scale / div, generator)
            return factors
        totals = self._clipped_totals(factors)
        if noise_std > 0 and world.rank == 0:
            for cov in self._covered:
                t = totals[cov.name]
                t.add_(gaussian_like(cov.param, noise_std * self._grad_scale, generator).to(t.device, t.dtype))
        out = {}
        for cov in self._covered:
            t = totals[cov.name] / div
            prior = self._before.get(cov.name)
            if prior is not None:
                prior = (prior.to_dense() if prior.is_sparse else prior).to(device=t.device, dtype=t.dtype)
                t = t + prior / world.size
            out[cov.name] = t
        world.sum_(list(out.values()))
        self._write_grads(out)
        return factors

    def _write_clipped(self, factors: Tensor, div: float) -> None:
        """``p.grad := before + sum_n c_n g_n / div``, accumulated straight into
        ``p.grad``'s memory where its dtype allows (no temporaries of p's size)."""
        buffers: dict[str, Tensor] = {}
        with torch.no_grad():
            for cov in self._covered:
                p, acc = cov.param, accumulation_dtype(cov.param.dtype)
                grad = p.grad
                in_place = grad is not None and not grad.is_sparse and grad.dtype == acc and grad.shape == p.shape
                buf = grad if in_place else torch.empty(p.shape, dtype=acc, device=p.device)
                prior = self._before.get(cov.name)
                if prior is None:
                    buf.zero_()
                else:
                    buf.copy_(prior.to_dense() if prior.is_sparse else prior)
                buffers[cov.name] = buf
            if self._materialize:
                for cov in self._covered:
                    g, buf = self._grads[cov.name], buffers[cov.name]
                    c = (factors * (self._grad_scale / div)).to(device=g.device, dtype=buf.dtype)
                    if g.dtype == buf.dtype:
                        buf.view(-1).addmv_(g.reshape(g.shape[0], math.prod(g.shape[1:])).T, c)
                    else:
                        buf.add_(torch.tensordot(c, g.to(buf.dtype), dims=1))
            else:
                n = float(self._n) if self._loss_reduction == "mean" else 1.0
                combine.weighted_sums_into(self._covered, factors * (n / div), buffers)
        grads = {c.name: c.param.grad for c in self._covered}
        self._write_grads({k: v for k, v in buffers.items() if v is not grads[k]})

    def _clipped_totals(self, factors: Tensor) -> dict[str, Tensor]:
        """``{name: p.shape}``: ``sum_n c_n g_n`` in ``p.grad``'s units (scaled by the
        GradScaler's scale, if any), float32+."""
        if not self._materialize:
            # raw_n * N ("mean") is the per-sample gradient in the loss's (scaled) units.
            n = float(self._n) if self._loss_reduction == "mean" else 1.0
            return combine.weighted_sums(self._covered, factors * n if n != 1.0 else factors)
        out = {}
        for cov in self._covered:
            g = self._grads[cov.name]
            acc = accumulation_dtype(g.dtype)
            c = factors.to(device=g.device, dtype=acc)
            out[cov.name] = torch.tensordot(c, g.to(acc), dims=1) * self._grad_scale
        return out

    def _write_grads(self, new_grads: dict[str, Tensor]) -> None:
        for cov in self._covered:
            if cov.name not in new_grads:
                continue
            p = cov.param
            new = new_grads[cov.name].to(p.dtype)
            with torch.no_grad():
                if p.grad is not None and p.grad.is_sparse:
                    p.grad = new.to_sparse(sparse_dim=1)
                elif p.grad is not None and p.grad.shape == p.shape and p.grad.dtype == p.dtype:
                    p.grad.copy_(new)  # keeps p.grad's identity (DDP bucket views, optimizers)
                else:
                    p.grad = new
