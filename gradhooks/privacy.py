"""DP-SGD on top of ``per_sample_grads``: clip, add Gaussian noise, account.

One step of DP-SGD (Abadi et al. 2016, "Deep Learning with Differential
Privacy") with Poisson sampling, the setting the accountants analyse::

    sampler = PoissonBatchSampler(len(train), sample_rate=q, generator=gen)
    accountant = Accountant()
    L = sampler.expected_batch_size                       # q * len(train)
    for idx in sampler:                                   # variable-size batches
        optimizer.zero_grad(set_to_none=True)
        if not idx:                                       # empty: the step is noise alone
            add_noise_(model.parameters(), std=sigma * C / L, generator=gen)
        else:
            with per_sample_grads(model, loss_reduction="sum", materialize=False) as g:
                F.cross_entropy(model(x[idx]), y[idx], reduction="sum").backward()
            privatize_(g, max_norm=C, noise_multiplier=sigma, expected_batch_size=L, generator=gen)
        optimizer.step()
        accountant.step(noise_multiplier=sigma, sample_rate=q)
    accountant.epsilon(delta=1e-5)

What the guarantee covers. The (epsilon, delta) reported by :class:`Accountant`
is that of the Poisson-subsampled Gaussian mechanism: each step includes each
training example independently with probability ``q`` (use
:class:`PoissonBatchSampler`), clips every example's gradient to ``max_norm``,
adds ``N(0, (noise_multiplier * max_norm)^2)`` to the *sum* of the clipped
gradients and divides by a constant (the expected batch size ``q * dataset``,
never by the realised batch size, which depends on the data). Fixed-size
shuffled batches are common in practice but are not what the analysis assumes:
their epsilon is not formally guaranteed by these numbers. Only the model (or
the noisy gradients) may be released; the per-sample gradients, norms and
clip factors of ``g`` are not private. The noise comes from PyTorch's
(non-cryptographic) generator and floating-point Gaussian sampler, as in
Opacus without ``secure_mode``: not hardened against floating-point attacks
(Mironov 2012).

Reductions. With Poisson batches pass ``expected_batch_size``: ``p.grad`` is
then the same for ``loss_reduction="sum"`` and ``"mean"`` (``privatize_``
rescales), but prefer ``"sum"``: a ``"mean"`` loss divides by the random
batch size before clipping sees it (harmless here, misleading elsewhere) and
is nan for an empty batch. Without ``expected_batch_size`` the divisor is the
reduction's own (``N`` or 1), the usual choice for fixed-size batches.

Accounting calls Opacus' accountants (the optional extra: ``pip install
'gradhooks[privacy]'``, i.e. ``opacus``); nothing here re-derives them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor
from torch.utils.data import Sampler

from .clip import add_gaussian_
from .result import PerSampleGrads

if TYPE_CHECKING:
    from opacus.accountants import IAccountant

__all__ = [
    "Accountant",
    "PoissonBatchSampler",
    "add_noise_",
    "epsilon",
    "noise_multiplier_for",
    "privatize_",
]

Mechanism = Literal["rdp", "prv"]


def _positive(fn: str, name: str, value: Any, *, allow_zero: bool = False, hint: str = "") -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        what = "a finite number >= 0" if allow_zero else "a finite positive number"
        raise ValueError(f"{fn}: {name} must be {what}, got {value!r}{hint}")
    return float(value)


def _check_generator(fn: str, generator: torch.Generator | None, params: Iterable[Tensor]) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"{fn}: generator must be a torch.Generator or None, got {type(generator).__name__}")
    gdev = torch.device(generator.device)
    for p in params:
        if p.device != gdev:
            raise ValueError(
                f"{fn}: the generator is on {gdev} but a parameter is on {p.device}; "
                f"pass torch.Generator(device={str(p.device)!r}).manual_seed(seed)"
            )


def _check_dense(fn: str, params: Iterable[Tensor]) -> None:
    if any(p.grad is not None and p.grad.is_sparse for p in params):
        raise ValueError(
            f"{fn}: noise makes every row of a sparse gradient nonzero; use dense gradients "
            "(nn.Embedding(sparse=False)) for DP-SGD"
        )


def add_noise_(params: Iterable[Tensor], *, std: float, generator: torch.Generator | None = None) -> None:
    """``p.grad += z``, ``z ~ N(0, std^2 I)`` of ``p.shape``, for each ``p`` in order.

    The low-level step of :func:`privatize_`, public for an *empty* Poisson
    batch (no forward pass, so no ``g``): its DP update is noise alone,
    ``add_noise_(params, std=noise_multiplier * max_norm / expected_batch_size,
    generator=gen)``; skipping the step instead would reveal that the batch
    was empty. ``p.grad`` of ``None`` counts as zeros. The noise is drawn in
    float32 (float64 for float64 parameters) from ``generator`` (on the
    parameters' device), or from PyTorch's global generator when ``None``.
    """
    params = list(params)
    std = _positive("add_noise_", "std", std, allow_zero=True)
    _check_generator("add_noise_", generator, params)
    _check_dense("add_noise_", params)
    add_gaussian_(params, std, generator)


def privatize_(
    g: PerSampleGrads,
    *,
    max_norm: float,
    noise_multiplier: float,
    expected_batch_size: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Clip each sample's gradient and add Gaussian noise: one DP-SGD gradient.

    For every covered parameter (``C = max_norm``, ``sigma = noise_multiplier``,
    ``c_n = min(1, C / (||g_n|| + 1e-6))`` as in ``g.clip_``)::

        p.grad = grad_before_context + (sum_n c_n g_n + z) / D,   z ~ N(0, (sigma C)^2 I)

    with ``D = expected_batch_size`` when given (Poisson sampling: pass
    ``q * dataset_size``, whatever ``g.loss_reduction``), else ``D = N`` for
    ``loss_reduction="mean"`` and ``D = 1`` for ``"sum"`` (the noise is scaled
    like the reduction: std ``sigma C / N`` for ``"mean"``). So it composes
    with gradient accumulation like ``clip_``, and calling it twice redraws the
    noise instead of adding it twice. Micro-batches of one logical batch:
    call it on each with the same ``expected_batch_size`` and
    ``noise_multiplier = sigma / sqrt(k)`` for ``k`` micro-batches: the summed
    noise is then ``N(0, (sigma C)^2)``, as accounted for one step with
    ``sigma``, provided the intermediate ``p.grad`` is never released.

    Under ``DistributedDataParallel`` it is a collective call, like ``clip_``:
    ``D`` is the global batch size for ``"mean"`` (pass the global
    ``expected_batch_size``), the noise is drawn once, on rank 0 from its
    ``generator``, and added into the one all-reduce of the clipped sums, so
    every rank ends with the same ``p.grad``.

    ``noise_multiplier=0`` gives clipping alone. ``generator`` must be on the
    parameters' device; ``None`` uses PyTorch's global generator. Draws one
    ``randn(p.shape)`` per parameter in key order, after clipping.
    Returns the clip factors ``c`` (``(N,)``).
    """
    fn = "privatize_"
    if not isinstance(g, PerSampleGrads):
        raise TypeError(f"{fn}: g must be the PerSampleGrads of a per_sample_grads context, got {type(g).__name__}")
    max_norm = _positive(fn, "max_norm", max_norm, hint=" (the per-sample clipping norm C)")
    sigma = _positive(
        fn, "noise_multiplier", noise_multiplier, allow_zero=True,
        hint=" (noise std divided by max_norm; 0 for clipping alone)",
    )
    if expected_batch_size is not None:
        expected_batch_size = _positive(
            fn, "expected_batch_size", expected_batch_size,
            hint=" (with Poisson sampling: sample_rate * dataset_size)",
        )
    params = g.params
    _check_generator(fn, generator, params.values())
    _check_dense(fn, params.values())
    return g._clip(max_norm, divisor=expected_batch_size, noise_std=sigma * max_norm, generator=generator)


class PoissonBatchSampler(Sampler[list[int]]):
    """Batches of Poisson sampling: each index in ``range(dataset_size)`` is
    included independently with probability ``sample_rate``.

    Batch sizes vary (mean ``sample_rate * dataset_size``) and a batch may be
    empty (probability ``(1 - q)^dataset_size``, about ``exp(-expected size)``);
    take the DP step anyway (:func:`add_noise_` alone). Yields ``steps``
    lists of indices (default ``round(1 / sample_rate)``: one epoch in
    expectation). Use as ``DataLoader(ds, batch_sampler=...)`` (whose default
    collate cannot stack an empty batch: handle it before) or index tensors
    directly. ``generator``: a CPU ``torch.Generator`` for reproducible batches.
    """

    def __init__(
        self,
        dataset_size: int,
        sample_rate: float,
        *,
        steps: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if isinstance(dataset_size, bool) or not isinstance(dataset_size, int) or dataset_size < 1:
            raise ValueError(f"PoissonBatchSampler: dataset_size must be a positive int, got {dataset_size!r}")
        ok = isinstance(sample_rate, (int, float)) and not isinstance(sample_rate, bool)
        if not ok or not 0 < sample_rate <= 1:
            raise ValueError(
                f"PoissonBatchSampler: sample_rate must be in (0, 1], got {sample_rate!r} "
                "(expected batch size / dataset_size)"
            )
        if steps is None:
            steps = max(1, round(1 / sample_rate))
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"PoissonBatchSampler: steps must be a positive int or None, got {steps!r}")
        if generator is not None and torch.device(generator.device).type != "cpu":
            raise ValueError("PoissonBatchSampler: generator must be a CPU torch.Generator")
        self.dataset_size = dataset_size
        self.sample_rate = float(sample_rate)
        self.steps = steps
        self.generator = generator

    @property
    def expected_batch_size(self) -> float:
        """``sample_rate * dataset_size``: the divisor :func:`privatize_` needs."""
        return self.sample_rate * self.dataset_size

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            keep = torch.rand(self.dataset_size, generator=self.generator) < self.sample_rate
            yield keep.nonzero().flatten().tolist()


def _opacus_accountant(mechanism: str) -> IAccountant:
    if mechanism not in ("rdp", "prv"):
        raise ValueError(f"mechanism must be 'rdp' or 'prv', got {mechanism!r}")
    try:
        from opacus.accountants import create_accountant
    except ImportError as err:
        raise ImportError(
            "privacy accounting uses Opacus' accountants, which are not installed: "
            "pip install 'gradhooks[privacy]' (or pip install opacus)"
        ) from err
    return create_accountant(mechanism)


class Accountant:
    """Privacy spent by DP-SGD steps, computed by Opacus (``"rdp"``:
    ``RDPAccountant``, Renyi DP of the subsampled Gaussian, Mironov et al. 2019;
    ``"prv"``: ``PRVAccountant``, numerical composition, Gopi et al. 2021, tighter).

    Call :meth:`step` once per optimizer step with the noise multiplier and
    the Poisson sampling rate ``q`` (see the module docstring for what the
    number guarantees). Needs the ``privacy`` extra (``opacus``).
    """

    def __init__(self, mechanism: Mechanism = "rdp") -> None:
        self.mechanism = mechanism
        self._acc = _opacus_accountant(mechanism)

    def step(self, *, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Record ``steps`` DP-SGD steps with this ``noise_multiplier`` and rate ``q``."""
        _positive("Accountant.step", "noise_multiplier", noise_multiplier)
        ok = isinstance(sample_rate, (int, float)) and not isinstance(sample_rate, bool)
        if not ok or not 0 < sample_rate <= 1:
            raise ValueError(f"Accountant.step: sample_rate must be in (0, 1], got {sample_rate!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"Accountant.step: steps must be a positive int, got {steps!r}")
        hist = self._acc.history  # Opacus' format: [(noise_multiplier, sample_rate, steps)]
        if hist and hist[-1][0] == noise_multiplier and hist[-1][1] == sample_rate:
            hist[-1] = (hist[-1][0], hist[-1][1], hist[-1][2] + steps)
        else:
            hist.append((float(noise_multiplier), float(sample_rate), steps))

    @property
    def steps(self) -> int:
        """The number of steps recorded so far."""
        return sum(s for _, _, s in self._acc.history)

    def epsilon(self, delta: float) -> float:
        """The epsilon of (epsilon, delta)-DP after the recorded steps (0 before any)."""
        ok = isinstance(delta, (int, float)) and not isinstance(delta, bool)
        if not ok or not 0 < delta < 1:
            raise ValueError(f"epsilon: delta must be in (0, 1) (typically << 1/dataset_size), got {delta!r}")
        if not self._acc.history:
            return 0.0
        return float(self._acc.get_epsilon(delta=delta))


def epsilon(
    *, noise_multiplier: float, sample_rate: float, steps: int, delta: float, mechanism: Mechanism = "rdp"
) -> float:
    """Epsilon after ``steps`` DP-SGD steps at one noise multiplier and rate ``q``."""
    acc = Accountant(mechanism)
    acc.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
    return acc.epsilon(delta)


def noise_multiplier_for(
    *, target_epsilon: float, delta: float, sample_rate: float, steps: int, mechanism: Mechanism = "rdp"
) -> float:
    """The smallest noise multiplier (to Opacus' search tolerance, 0.01 in epsilon)
    whose epsilon after ``steps`` steps at rate ``q`` is at most ``target_epsilon``."""
    _opacus_accountant(mechanism)  # the extra's ImportError, argument check
    _positive("noise_multiplier_for", "target_epsilon", target_epsilon)
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
            steps=steps, accountant=mechanism,
        )
    )

