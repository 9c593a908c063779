"""The correctness column: each method against the naive loop on a small instance.

On the configuration's ``scale="small"`` instance (N=4, narrow layers), in
float64 where the method runs in it, float32 otherwise, whatever the method
produced (per-sample gradients, norms, clipped mean gradient, batch gradient)
is compared with the same quantity built from one ``autograd.grad`` per sample.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .configs import CONFIGS, Case
from .incumbents import prepare_naive
from .methods import MAX_NORM, METHODS, Outcome, Unsupported, quiet_incumbents

__all__ = ["compare", "correctness", "reference"]


def _rel(got: Tensor, ref: Tensor) -> float:
    """``||got - ref|| / ||ref||`` (absolute when ``ref`` is zero), in float64."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    if got.shape != ref.shape:
        raise ValueError(f"shape {tuple(got.shape)} != reference {tuple(ref.shape)}")
    den = float(ref.norm())
    num = float((got - ref).norm())
    return num / den if den > 0 else num


def reference(case: Case) -> Outcome:
    """Every quantity a method may produce, from the naive loop over all N samples."""
    per_sample, _ = prepare_naive(case, case.n).step()
    flat = torch.cat([t.reshape(case.n, -1) for t in per_sample.values()], 1)
    norms = flat.norm(dim=1)
    factors = (MAX_NORM / (norms + 1e-6)).clamp(max=1.0)
    clipped = {k: torch.tensordot(factors, t, dims=1) / case.n for k, t in per_sample.items()}
    batch = {k: t.mean(0) for k, t in per_sample.items()}
    return Outcome(per_sample=per_sample, norms=norms, clipped=clipped, batch_grad=batch)


def _flat(tensors: dict[str, Tensor], keys: list[str], batched: bool) -> Tensor:
    """Concatenate over parameters: ``(N, total)`` when ``batched``, else ``(total,)``."""
    if batched:
        return torch.cat([tensors[k].detach().double().cpu().reshape(tensors[k].shape[0], -1) for k in keys], 1)
    return torch.cat([tensors[k].detach().double().cpu().reshape(-1) for k in keys])


def _rel_rows(got: Tensor, ref: Tensor) -> float:
    """Max over samples of ``||got_n - ref_n|| / ||ref_n||`` (rows of ``(N, ...)``)."""
    if got.shape != ref.shape:
        raise ValueError(f"shape {tuple(got.shape)} != reference {tuple(ref.shape)}")
    got, ref = got.double().cpu().reshape(got.shape[0], -1), ref.double().cpu().reshape(ref.shape[0], -1)
    den = ref.norm(dim=1)
    num = (got - ref).norm(dim=1)
    return float(torch.where(den > 0, num / den.clamp(min=1e-300), num).max())


def compare(got: Outcome, ref: Outcome) -> float:
    """Max relative error over what the method produced. Per-sample gradients and
    norms: worst sample, each sample's gradient taken over all parameters at once
    (a parameter whose gradient is exactly zero, such as attention's key bias,
    cannot inflate it); clipped and batch gradients: over all parameters."""
    errors: list[float] = []
    keys = list(ref.per_sample or {})
    if got.per_sample is not None and ref.per_sample is not None:
        errors.append(_rel_rows(_flat(got.per_sample, keys, True), _flat(ref.per_sample, keys, True)))
    for field_name in ("clipped", "batch_grad"):
        mine, theirs = getattr(got, field_name), getattr(ref, field_name)
        if mine is not None and theirs is not None:
            errors.append(_rel(_flat(mine, keys, False), _flat(theirs, keys, False)))
    if got.norms is not None and ref.norms is not None:
        errors.append(_rel_rows(got.norms.reshape(-1, 1), ref.norms.reshape(-1, 1)))
    if not errors:
        raise ValueError("the method produced nothing to compare")
    return max(errors)


def correctness(config: str, method: str, device: str = "cpu") -> tuple[float | None, str]:
    """Max relative error against the naive loop on the small instance:
    ``(error, dtype used)``, or ``(None, why)``."""
    if method == "naive":
        return 0.0, "reference"
    why = METHODS[method].missing()
    if why:
        return None, why
    last = ""
    for dtype in (torch.float64, torch.float32):
        case = CONFIGS[config].build("small", dtype=dtype, device=device)
        try:
            with warnings.catch_warnings():
                quiet_incumbents()
                ref = reference(case)
                runner = METHODS[method].prepare(case, case.n)
                runner.step()  # twice: a second step must not see the first's state
                runner.clear()
                got = runner.outcome(runner.step())
            return compare(got, ref), str(dtype).replace("torch.", "")
        except Unsupported as err:
            return None, f"n/a: {err}"
        except NotImplementedError as err:
            return None, f"n/a: {short_error(err)}"
        except Exception as err:
            last = short_error(err)
    return None, last


def short_error(err: BaseException, limit: int = 160) -> str:
    """``"TypeError: first line of the message"``, cut to ``limit`` characters."""
    text = str(err).strip().splitlines()
    line = f"{type(err).__name__}: {text[0] if text else ''}"
    return line if len(line) <= limit else line[: limit - 3] + "..."
