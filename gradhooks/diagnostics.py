"""Gradient diagnostics for a training loop, from one batch's per-sample gradients.

Everything here works with ``materialize=False`` (norms, dots with the batch
gradient and weighted sums are exact without per-sample tensors)::

    with per_sample_grads(model, materialize=False) as g:
        F.cross_entropy(model(x), y).backward()
    norm_stats(g)["fc1.weight"]     # NormStats(mean=..., std=..., max=..., quantiles=...)
    cosine_to_batch(g)              # (N,): alignment of each sample with the batch gradient
    tracker.update(g)               # tracker = RunningNoiseScale(): McCandlish et al. 2018,
    tracker.b_simple                # B_simple averaged over steps (None until it is defined)

``names`` (where accepted) restricts a diagnostic to some covered parameters
(one layer, say); by default it covers all of them. Statistics are float64
Python numbers (one host sync per call); per-sample results are tensors.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .errors import InvalidArgumentError, UnknownNameError
from .result import PerSampleGrads

__all__ = [
    "NoiseScale",
    "NormStats",
    "RunningNoiseScale",
    "cosine_to",
    "cosine_to_batch",
    "mean_gradient",
    "noise_scale",
    "norm_stats",
]

DEFAULT_QUANTILES = (0.5, 0.9, 0.99)


@dataclass(frozen=True)
class NormStats:
    """Summary of one batch's per-sample gradient norms (std divides by N)."""

    count: int
    mean: float
    std: float
    min: float
    max: float
    quantiles: dict[float, float]

    @classmethod
    def of(cls, norms: Tensor, quantiles: Sequence[float] = DEFAULT_QUANTILES) -> NormStats:
        """Statistics of ``norms`` (``(N,)``, e.g. ``g.norms()``); quantiles interpolate linearly."""
        if norms.dim() != 1 or norms.numel() == 0:
            raise InvalidArgumentError(f"NormStats.of: norms must be a non-empty (N,) tensor, got shape {tuple(norms.shape)}")
        qs = [float(q) for q in quantiles]
        if any(not 0 <= q <= 1 for q in qs):
            raise InvalidArgumentError(f"NormStats.of: quantiles must be in [0, 1], got {list(quantiles)}")
        x = norms.detach().to(torch.float64)
        parts = [x.mean(), x.std(correction=0), x.min(), x.max()]
        if qs:
            parts.append(torch.quantile(x, torch.tensor(qs, dtype=torch.float64, device=x.device)))
        flat = torch.cat([t.reshape(-1) for t in parts]).tolist()
        return cls(len(x), flat[0], flat[1], flat[2], flat[3], dict(zip(qs, flat[4:], strict=False)))

    def __str__(self) -> str:
        qs = " ".join(f"p{100 * q:g} {v:.4g}" for q, v in self.quantiles.items())
        return f"mean {self.mean:.4g} std {self.std:.4g} min {self.min:.4g} max {self.max:.4g} {qs}".rstrip()


def norm_stats(
    g: PerSampleGrads,
    *,
    by: Literal["parameter", "layer"] = "parameter",
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
) -> dict[str, NormStats]:
    """``{name: NormStats}`` of the per-sample gradient norms, per parameter (keys of
    ``g``) or per layer (``by="layer"``: the module prefix of the names, e.g.
    ``"fc1"`` for ``fc1.weight`` and ``fc1.bias``, norm over its parameters).
    For the whole model: ``NormStats.of(g.norms())``."""
    if by not in ("parameter", "layer"):
        raise InvalidArgumentError(f"norm_stats: by must be 'parameter' or 'layer', got {by!r}")
    norms = g.param_norms()
    if by == "layer":
        squares: dict[str, Tensor] = {}
        for name, t in norms.items():
            layer = name.rpartition(".")[0]
            sq = t.to(torch.float64).square()
            squares[layer] = squares[layer] + sq if layer in squares else sq
        norms = {k: v.sqrt() for k, v in squares.items()}
    return {k: NormStats.of(v, quantiles) for k, v in norms.items()}


def _names(g: PerSampleGrads, names: Iterable[str] | None) -> list[str]:
    keys = list(g.params)
    if names is None:
        return keys
    chosen = list(names)
    unknown = [k for k in chosen if k not in keys]
    if unknown or not chosen:
        raise UnknownNameError(f"names must be covered parameters of g (some of {keys}), got {chosen}")
    return chosen


def mean_gradient(g: PerSampleGrads, *, names: Iterable[str] | None = None) -> dict[str, Tensor]:
    """``{name: p.shape}``: the batch's mean gradient ``(1/N) sum_n g[name][n]``,
    float32 (float64 for float64 parameters). With ``loss_reduction="mean"`` it
    is what ``backward()`` added to ``p.grad``; ``"sum"`` added ``N`` times it."""
    n = g.batch_size
    chosen = _names(g, names)
    weights = torch.full((n,), 1.0 / n, dtype=torch.float64)
    return g.weighted_sum(weights, names=chosen)


def _squared_norms(g: PerSampleGrads, names: list[str]) -> Tensor:
    """``(N,)`` float64: each sample's squared norm over ``names``."""
    pn = g.param_norms()
    parts = [pn[k].to(torch.float64).square() for k in names]
    dev = parts[0].device
    return torch.stack([t.to(dev) for t in parts]).sum(0)


def _total_sq(tensors: Mapping[str, Tensor]) -> Tensor:
    parts = [t.detach().to(torch.float64).square().sum() for t in tensors.values()]
    dev = parts[0].device
    return torch.stack([t.to(dev) for t in parts]).sum()


@dataclass(frozen=True)
class NoiseScale:
    """Unbiased one-batch estimates behind the simple gradient noise scale.

    ``trace_cov`` estimates ``tr(Sigma)``, the summed per-coordinate variance of
    one sample's gradient; ``grad_sq`` estimates ``|G|^2``, the squared norm of
    the true (expected) gradient. Each is unbiased, and ``grad_sq`` is often
    negative on one batch (it subtracts the noise from ``|gbar|^2``), so their
    one-batch ratio means little: feed them to :class:`RunningNoiseScale`, which
    averages both over steps before dividing, as McCandlish et al. do.
    """

    batch_size: int
    trace_cov: float
    grad_sq: float

    @property
    def b_simple(self) -> float | None:
        """``tr(Sigma) / |G|^2`` of this batch alone, or ``None`` when ``grad_sq <= 0``
        (no ratio exists then). Noisy and biased even when defined: prefer
        :attr:`RunningNoiseScale.b_simple`."""
        return self.trace_cov / self.grad_sq if self.grad_sq > 0 else None


class RunningNoiseScale:
    """``B_simple`` over a training run: exponential moving averages of the two
    unbiased parts (:class:`NoiseScale`), then their ratio.

    ``update(g)`` (or ``update(noise_scale(g, names=...))``) once per step; with
    ``beta``, step ``t``'s estimate enters with weight ``(1 - beta) beta^(T - t)``,
    normalised by ``1 - beta^T`` (the zero start removed, as in Adam): each
    average is a weighted mean of unbiased estimates, whatever the batch sizes. ``beta=0`` keeps the last
    step only; the default 0.99 averages about the last 100 steps.
    """

    def __init__(self, beta: float = 0.99) -> None:
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
            raise InvalidArgumentError(f"RunningNoiseScale: beta must be a number in [0, 1), got {beta!r}")
        self.beta = float(beta)
        self.steps = 0
        self._trace = 0.0  # un-normalised moving averages
        self._sq = 0.0

    def update(self, g: PerSampleGrads | NoiseScale, *, names: Iterable[str] | None = None) -> NoiseScale:
        """Add one step's estimates (from ``g``, over ``names``, or a ready
        :class:`NoiseScale`); returns that step's :class:`NoiseScale`."""
        if isinstance(g, NoiseScale):
            if names is not None:
                raise InvalidArgumentError("RunningNoiseScale.update: names= applies to a PerSampleGrads, not a NoiseScale")
            est = g
        else:
            est = noise_scale(g, names=names)
        b = self.beta
        self._trace = b * self._trace + (1.0 - b) * est.trace_cov
        self._sq = b * self._sq + (1.0 - b) * est.grad_sq
        self.steps += 1
        return est

    @property
    def trace_cov(self) -> float | None:
        """The averaged ``tr(Sigma)`` estimate (``None`` before the first update)."""
        return self._trace / (1.0 - self.beta**self.steps) if self.steps else None

    @property
    def grad_sq(self) -> float | None:
        """The averaged ``|G|^2`` estimate (``None`` before the first update)."""
        return self._sq / (1.0 - self.beta**self.steps) if self.steps else None

    @property
    def b_simple(self) -> float | None:
        """``trace_cov / grad_sq`` of the averages; ``None`` (see :attr:`reason`) before
        the first update or while the averaged ``|G|^2`` estimate is not positive."""
        sq = self.grad_sq
        return None if sq is None or sq <= 0 or self.trace_cov is None else self.trace_cov / sq

    @property
    def reason(self) -> str | None:
        """Why :attr:`b_simple` is ``None`` (``None`` when it is a number)."""
        if not self.steps:
            return "no step yet: call update(g) once per training step"
        sq = self.grad_sq
        if sq is not None and sq <= 0:
            return (f"the |G|^2 estimate averaged over {self.steps} step(s) is {sq:.3g} <= 0: the gradient noise "
                    "still hides the mean gradient; average over more steps (or a larger beta)")
        return None

    def __repr__(self) -> str:
        value = f"{self.b_simple:.4g}" if self.b_simple is not None else f"None ({self.reason})"
        return f"RunningNoiseScale(beta={self.beta}, steps={self.steps}, b_simple={value})"


def noise_scale(g: PerSampleGrads, *, names: Iterable[str] | None = None) -> NoiseScale:
    """The simple gradient noise scale ``B_simple = tr(Sigma) / |G|^2`` of this batch.

    McCandlish, Kaplan, Amodei et al. 2018, "An Empirical Model of Large-Batch
    Training" (arXiv:1812.06162), section 2.2 and appendix A.1: the batch size
    beyond which larger batches stop paying off. With per-sample gradients
    ``g_n`` (i.i.d., mean ``G``, covariance ``Sigma``), ``B = N``,
    ``m = (1/B) sum_n |g_n|^2`` and ``gbar = (1/B) sum_n g_n``:
    ``E|gbar|^2 = |G|^2 + tr(Sigma)/B`` and ``E m = |G|^2 + tr(Sigma)``, so

        tr(Sigma) ~ B/(B-1) (m - |gbar|^2),    |G|^2 ~ (B |gbar|^2 - m) / (B-1)

    are unbiased (the paper's two-batch-size estimator with ``B_small = 1``,
    ``B_big = B``). Needs ``N >= 2`` (``ValueError`` otherwise). One batch's
    ratio is rarely meaningful: average over steps with :class:`RunningNoiseScale`.
    """
    n = g.batch_size
    if n < 2:
        raise InvalidArgumentError(
            f"noise_scale: needs at least 2 samples in the batch to separate the gradient's mean from its "
            f"variance, got batch size {n}"
        )
    chosen = _names(g, names)
    m = _squared_norms(g, chosen).mean()
    gbar_sq = _total_sq(mean_gradient(g, names=chosen)).to(m.device)
    trace_cov = n / (n - 1) * (m - gbar_sq)
    grad_sq = (n * gbar_sq - m) / (n - 1)
    tc, gs = torch.stack([trace_cov, grad_sq]).tolist()
    return NoiseScale(n, tc, gs)


def cosine_to(
    g: PerSampleGrads, direction: Mapping[str, Tensor], *, names: Iterable[str] | None = None
) -> Tensor:
    """``(N,)``: cosine between each sample's gradient (over ``names``, default the
    keys of ``direction``) and ``direction`` (``{name: p.shape}``, e.g. a
    validation batch's gradient). 0 where either norm is 0."""
    chosen = _names(g, direction.keys() if names is None else names)
    missing = [k for k in chosen if k not in direction]
    if missing:
        raise UnknownNameError(f"cosine_to: direction has no tensor for {missing}")
    d = {k: direction[k] for k in chosen}
    dots = g.dot(d).to(torch.float64)
    norms = _squared_norms(g, chosen).sqrt().to(dots.device)
    denom = norms * _total_sq(d).sqrt().to(dots.device)
    cos = torch.where(denom > 0, dots / denom.clamp(min=torch.finfo(torch.float64).tiny), torch.zeros_like(dots))
    return cos.clamp(-1.0, 1.0).to(g.norms().dtype)


def cosine_to_batch(g: PerSampleGrads, *, names: Iterable[str] | None = None) -> Tensor:
    """``(N,)``: cosine between each sample's gradient and the batch's mean gradient
    (:func:`mean_gradient`), over ``names`` (default all covered parameters).
    Float32 (float64 for float64 parameters); 0 where a norm is 0."""
    chosen = _names(g, names)
    return cosine_to(g, mean_gradient(g, names=chosen), names=chosen)
