"""The Gaussian mechanism on clipped sums: :func:`privatize_` and :func:`add_noise_`.

These are the low-level steps :class:`~gradhooks.privacy.DPSGD` is built from.
Used by hand they leave sampling and accounting to the caller; they refuse what
would silently break the guarantee: a result that left trainable parameters
out (``strict=False``), noise drawn a second time on an accumulated gradient,
noise on frozen parameters.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ..clip import add_gaussian_
from ..errors import ArgumentTypeError, InvalidArgumentError
from ..result import PerSampleGrads
from .errors import DPUsageError, UncoveredParameterError

__all__ = ["add_noise_", "privatize_"]


def positive(fn: str, name: str, value: Any, *, allow_zero: bool = False, hint: str = "") -> float:
    """``value`` as a float, or ``ValueError`` saying what ``name`` must be."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        what = "a finite number >= 0" if allow_zero else "a finite positive number"
        raise InvalidArgumentError(f"{fn}: {name} must be {what}, got {value!r}{hint}")
    return float(value)


def check_generator(fn: str, generator: torch.Generator | None, params: Iterable[Tensor]) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise ArgumentTypeError(f"{fn}: generator must be a torch.Generator or None, got {type(generator).__name__}")
    gdev = torch.device(generator.device)
    for p in params:
        if p.device != gdev:
            raise InvalidArgumentError(
                f"{fn}: the generator is on {gdev} but a parameter is on {p.device}; "
                f"pass torch.Generator(device={str(p.device)!r}).manual_seed(seed)"
            )


def check_dense(fn: str, params: Iterable[Tensor]) -> None:
    if any(p.grad is not None and p.grad.is_sparse for p in params):
        raise InvalidArgumentError(
            f"{fn}: noise makes every row of a sparse gradient nonzero; use dense gradients "
            "(nn.Embedding(sparse=False)) for DP-SGD"
        )


def check_covers_all(fn: str, g: PerSampleGrads) -> None:
    """Refuse a result that left trainable parameters out (``strict=False``): their
    ``p.grad`` is backward's raw gradient, which the optimizer would step on."""
    left = g._left_out()
    if left:
        raise UncoveredParameterError(
            f"{fn}: per_sample_grads(strict=False) left the trainable parameter(s) {left} out, so their "
            "p.grad holds the raw, unclipped, un-noised gradient and the optimizer would step on it: "
            "no epsilon holds for that. Freeze them (p.requires_grad_(False)) before the context, cover "
            "them (fallback=True or gradhooks.register_rule), or use strict=True."
        )


def add_noise_(params: Iterable[Tensor], *, std: float, generator: torch.Generator | None = None) -> None:
    """``p.grad += z``, ``z ~ N(0, std^2 I)`` of ``p.shape``, for each trainable ``p`` in order.

    The noise-alone DP step of an *empty* Poisson batch (no forward pass, so no
    ``g``): ``add_noise_(model.parameters(), std=noise_multiplier * max_norm /
    expected_batch_size, generator=gen)``; skipping the step instead would reveal
    that the batch was empty. Frozen parameters (``requires_grad=False``) are
    skipped, exactly as :func:`privatize_` never touches them (noising them would
    move weights the user froze, and only on empty steps); a parameter listed
    twice is noised once. ``p.grad`` of ``None`` counts as zeros. Noise is drawn in
    float32 (float64 for float64 parameters) from ``generator`` (on the parameters'
    device), or from PyTorch's global generator when ``None``.
    """
    unique: dict[int, Tensor] = {}
    for p in params:
        if p.requires_grad:
            unique.setdefault(id(p), p)
    chosen = list(unique.values())
    std = positive("add_noise_", "std", std, allow_zero=True)
    check_generator("add_noise_", generator, chosen)
    check_dense("add_noise_", chosen)
    add_gaussian_(chosen, std, generator)


def _holds_gradient(before: dict[str, Tensor | None]) -> list[str]:
    """Names whose ``before`` is nonzero (one host synchronisation for all of them)."""
    held = {k: t for k, t in before.items() if t is not None}
    if not held:
        return []
    local = [getattr(t, "to_local", lambda t=t: t)() for t in held.values()]  # FSDP's DTensor: this rank's shard
    flags = torch.stack([(t.to_dense() if t.is_sparse else t).ne(0).any().cpu() for t in local])
    return [k for k, f in zip(held, flags.tolist(), strict=True) if f]


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
    like the reduction). Calling it twice on one ``g`` redraws the noise instead
    of adding it twice.

    One logical batch gets one noise draw. Micro-batches: call it with
    ``noise_multiplier=0`` on each (clipping alone composes with accumulation),
    then :func:`add_noise_` once with ``std = sigma * C / D``; or let
    :class:`~gradhooks.privacy.DPSGD` (``max_physical_batch_size=``) do it. With
    ``noise_multiplier > 0`` on a ``g`` whose context was entered with a nonzero
    ``p.grad`` it raises :class:`DPUsageError` (that would be a second draw, or
    a previous step's gradient not cleared). A result built with
    ``strict=False`` that left trainable parameters out raises
    :class:`UncoveredParameterError`: their raw gradient would be released.

    Under ``DistributedDataParallel`` it is a collective call, like ``clip_``:
    ``D`` is the global batch size for ``"mean"`` (pass the global
    ``expected_batch_size``), the noise is drawn once, on rank 0 from its
    ``generator``, and added into the one all-reduce of the clipped sums.

    ``generator`` must be on the parameters' device; ``None`` uses PyTorch's
    global generator. Draws one ``randn(p.shape)`` per parameter in key order,
    after clipping. Returns the clip factors ``c`` (``(N,)``).
    """
    fn = "privatize_"
    if not isinstance(g, PerSampleGrads):
        raise ArgumentTypeError(f"{fn}: g must be the PerSampleGrads of a per_sample_grads context, got {type(g).__name__}")
    max_norm = positive(fn, "max_norm", max_norm, hint=" (the per-sample clipping norm C)")
    sigma = positive(
        fn, "noise_multiplier", noise_multiplier, allow_zero=True,
        hint=" (noise std divided by max_norm; 0 for clipping alone)",
    )
    if expected_batch_size is not None:
        expected_batch_size = positive(
            fn, "expected_batch_size", expected_batch_size,
            hint=" (with Poisson sampling: sample_rate * dataset_size)",
        )
    g._require()
    check_covers_all(fn, g)
    params = g.params
    check_generator(fn, generator, params.values())
    check_dense(fn, params.values())
    if sigma > 0:
        held = _holds_gradient({k: g._before.get(k) for k in params})
        if held:
            raise DPUsageError(
                f"{fn}: p.grad of {held[:3]}{' ...' if len(held) > 3 else ''} was nonzero when the "
                "per_sample_grads context was entered, and noise would be drawn on top of it. If that is an "
                "earlier micro-batch of the same logical batch, its noise was drawn already (twice the noise "
                "the accountant counts): clip micro-batches with noise_multiplier=0 and call add_noise_ once, "
                "or use DPSGD(max_physical_batch_size=...). Otherwise call optimizer.zero_grad() before the context."
            )
    return g._clip(max_norm, divisor=expected_batch_size, noise_std=sigma * max_norm, generator=generator)
