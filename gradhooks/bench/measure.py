"""Timing, correctness and (through :mod:`gradhooks.bench.child`) peak memory.

Timing: every method of a configuration is prepared on the same weights and
batch and warmed up; then, in each round, every method (the starting one
rotates each round, so drift hits all alike) runs one untimed *settling*
step and one timed step. Settling puts the process, the allocator's free
lists and the pages it keeps, in the state a training loop of that method
leaves them in: without it a method's step inherits the previous method's
heap, and memory that a loop would find warm is cold (or the reverse).
Each timed step is wall time (the median is reported, divided by plain's
median from the same run), process CPU time, and the new memory the step
touched (minor page faults times the page size: the cost of fresh storage).

Correctness: on a small instance of the configuration (N=4, narrow layers),
in float64 where the method runs in it, each method's per-sample gradients,
norms, clipped mean gradient or batch gradient against the naive loop's.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .configs import Case
from .correct import correctness, short_error
from .methods import METHODS, Runner, Unsupported

__all__ = ["Timing", "time_config", "correctness", "memory", "short_error", "PAGE"]

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _now() -> tuple[float, float, int]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), r.ru_utime + r.ru_stime, r.ru_minflt


def run_step(runner: Runner, device: str) -> tuple[float, float, float]:
    """One step, its result dropped and ``clear()`` done, all inside the measurement:
    ``(wall s, CPU s, new bytes touched)``, each scaled by ``runner.scale``."""
    _sync(device)
    t0, c0, f0 = _now()
    raw = runner.step()
    del raw
    runner.clear()
    _sync(device)
    t1, c1, f1 = _now()
    s = runner.scale
    return (t1 - t0) * s, (c1 - c0) * s, (f1 - f0) * PAGE * s


@dataclass
class Timing:
    """One method's timings on one configuration, or why there are none.
    ``status``: ``ok``, ``not installed``, ``n/a`` (the method cannot run this model)
    or ``error``."""

    times: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    touched: list[float] = field(default_factory=list)
    status: str = "ok"
    error: str | None = None
    note: str = ""

    @property
    def median(self) -> float | None:
        return statistics.median(self.times) if self.times else None

    @property
    def spread(self) -> float | None:
        """Interquartile range of the times over their median (``None`` below 4 rounds)."""
        if len(self.times) < 4:
            return None
        q = statistics.quantiles(self.times, n=4)
        return (q[2] - q[0]) / statistics.median(self.times)

    def fail(self, err: BaseException) -> None:
        # NotImplementedError: a library saying "not supported" (Opacus' ghost clipping on tied weights).
        self.status = "n/a" if isinstance(err, (Unsupported, NotImplementedError)) else "error"
        self.error = str(err) if isinstance(err, Unsupported) else short_error(err)


def _prepare(name: str, case: Case, cap: int, warmup: int, device: str, timing: Timing) -> Runner | None:
    why = METHODS[name].missing()
    if why:
        timing.status, timing.error = "not installed", why
        return None
    try:
        runner = METHODS[name].prepare(case, cap)
        for _ in range(warmup):
            run_step(runner, device)
    except Exception as err:  # a method that cannot run this model: say why in the table
        timing.fail(err)
        return None
    timing.note = runner.note
    return runner


def time_config(
    case: Case,
    methods: list[str],
    *,
    repeats: int,
    warmup: int,
    cap: int,
    device: str = "cpu",
    settle: bool = True,
    progress: Callable[[str], None] = lambda s: None,
) -> dict[str, Timing]:
    """Warm up each method, then ``repeats`` interleaved rounds (settling step + timed step)."""
    out = {name: Timing() for name in methods}
    runners: dict[str, Runner] = {}
    for name in methods:
        runner = _prepare(name, case, cap, warmup, device, out[name])
        if runner is None:
            if out[name].status == "error":
                progress(f"  {name}: {out[name].error}")
            continue
        runners[name] = runner
    order = list(runners)
    for r in range(repeats):
        k = r % max(1, len(order))
        for name in order[k:] + order[:k]:
            timing = out[name]
            if timing.error:
                continue
            try:
                if settle:
                    run_step(runners[name], device)
                wall, cpu, touched = run_step(runners[name], device)
            except Exception as err:
                timing.fail(err)
                continue
            timing.times.append(wall)
            timing.cpu.append(cpu)
            timing.touched.append(touched)
        progress(f"  round {r + 1}/{repeats}")
    return out


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

