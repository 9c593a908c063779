"""Timing, correctness and (through :mod:`gradhooks.bench.child`) peak memory.

Timing: every method of a configuration is prepared on the same weights and
batch, warmed up, then stepped round-robin (the starting method rotates each
round) so that drift, thermal or otherwise, hits all methods alike; the
median is reported and divided by ``plain``'s median from the same run.

Correctness: on a small instance of the configuration (N=4, narrow layers),
in float64 where the method runs in it, each method's per-sample gradients,
norms, clipped mean gradient or batch gradient against the naive loop's.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .configs import CONFIGS, Case
from .methods import MAX_NORM, METHODS, Outcome, Runner, prepare_naive, quiet_incumbents

__all__ = ["Timing", "time_config", "correctness", "memory", "short_error"]


def short_error(err: BaseException, limit: int = 160) -> str:
    """``"TypeError: first line of the message"``, cut to ``limit`` characters."""
    text = str(err).strip().splitlines()
    line = f"{type(err).__name__}: {text[0] if text else ''}"
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _run_once(runner: Runner, device: str) -> float:
    """One timed step in seconds (scaled by ``runner.scale``); result freed untimed."""
    _sync(device)
    start = time.perf_counter()
    raw = runner.step()
    _sync(device)
    elapsed = time.perf_counter() - start
    del raw
    runner.clear()
    gc.collect()
    return elapsed * runner.scale


@dataclass
class Timing:
    """One method's timings on one configuration (seconds), or why there are none."""

    times: list[float] = field(default_factory=list)
    error: str | None = None
    note: str = ""

    @property
    def median(self) -> float | None:
        return statistics.median(self.times) if self.times else None


def time_config(
    case: Case,
    methods: list[str],
    *,
    repeats: int,
    warmup: int,
    cap: int,
    device: str = "cpu",
    progress: Callable[[str], None] = lambda s: None,
) -> dict[str, Timing]:
    """Warm up each method, then ``repeats`` interleaved rounds over all of them."""
    out: dict[str, Timing] = {}
    runners: dict[str, Runner] = {}
    for name in methods:
        timing = out[name] = Timing()
        why = METHODS[name].missing()
        if why:
            timing.error = why
            continue
        try:
            runner = METHODS[name].prepare(case, cap)
            for _ in range(warmup):
                _run_once(runner, device)
        except Exception as err:  # a method that cannot run this model: say why in the table
            timing.error = short_error(err)
            progress(f"  {name}: {timing.error}")
            continue
        timing.note = runner.note
        runners[name] = runner
    order = list(runners)
    for r in range(repeats):
        k = r % max(1, len(order))
        for name in order[k:] + order[:k]:
            if out[name].error:
                continue
            try:
                out[name].times.append(_run_once(runners[name], device))
            except Exception as err:
                out[name].error = short_error(err)
        progress(f"  round {r + 1}/{repeats}")
    return out


# -- correctness -------------------------------------------------------------


def _rel(got: Tensor, ref: Tensor) -> float:
    """``||got - ref|| / ||ref||`` (absolute when ``ref`` is zero), in float64."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    if got.shape != ref.shape:
        raise ValueError(f"shape {tuple(got.shape)} != reference {tuple(ref.shape)}")
    den = float(ref.norm())
    num = float((got - ref).norm())
    return num / den if den > 0 else num


def _reference(case: Case) -> Outcome:
    per_sample = prepare_naive(case, case.n).step()
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


def _compare(got: Outcome, ref: Outcome) -> float:
    """Max relative error over what the method produced. Per-sample gradients and
    norms: worst sample, each sample's gradient taken over all parameters at once
    (a parameter whose gradient is exactly zero, such as attention's key bias,
    cannot inflate it); clipped and batch gradients: over all parameters."""
    errors: list[float] = []
    keys = list(ref.per_sample or {})
    if got.per_sample is not None:
        errors.append(_rel_rows(_flat(got.per_sample, keys, True), _flat(ref.per_sample, keys, True)))
    for field_name in ("clipped", "batch_grad"):
        mine = getattr(got, field_name)
        if mine is not None:
            errors.append(_rel(_flat(mine, keys, False), _flat(getattr(ref, field_name), keys, False)))
    if got.norms is not None:
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
                ref = _reference(case)
                runner = METHODS[method].prepare(case, case.n)
                runner.step()  # twice: a second step must not see the first's state
                runner.clear()
                got = runner.outcome(runner.step())
            return _compare(got, ref), str(dtype).replace("torch.", "")
        except Exception as err:
            last = short_error(err)
    return None, last


# -- memory ------------------------------------------------------------------


def memory(
    config: str, methods: list[str], device: str = "cpu", cap: int = 4, scale: str = "full", timeout: float = 600
) -> dict[str, Any]:
    """Peak memory growth of one step per method, from a fresh subprocess
    (:mod:`gradhooks.bench.child`): ``{method: {"peak_bytes": int} or {"error": str}}``.

    The child runs with glibc's mmap threshold fixed at 64 KiB, so every freed
    tensor goes back to the OS: the RSS before the step is the live data only,
    and no memory retained from warm-up hides part of the step's peak.
    """
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    cmd = [sys.executable, "-m", "gradhooks.bench.child", config, ",".join(methods), device, str(cap), scale]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {m: {"error": f"memory child timed out after {timeout:.0f} s"} for m in methods}
    got: dict[str, Any] = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            got.update(json.loads(line))
    for m in methods:
        if m not in got:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            got[m] = {"error": f"memory child failed (exit {proc.returncode}): {tail[:160]}"}
    return got
