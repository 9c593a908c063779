"""Where ``gradhooks`` spends the time beyond plain backward: a phase breakdown.

``python -m gradhooks.bench --profile [--configs ...] [--methods gradhooks-ghost,gradhooks]``
times, per step, the phases of a ``per_sample_grads`` step against plain
forward and backward on the same model: entering the context, forward (with
hooks), backward (with hooks), the exit (the self-check's probe products and
magnitudes; building per-sample tensors when materializing), ``norms()`` and
``clip_()``. Library functions are timed by wrapping their module attributes
for the duration of the profile (restored afterwards); nothing is changed on
the model. Medians over the repeats, then the top operators by self CPU time.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .configs import CONFIGS, Case
from .methods import MAX_NORM

__all__ = ["profile_ghost", "phase_times"]

#: (module, attribute, label): library functions whose time is reported as a phase.
WRAPPED = [
    ("gradhooks.selfcheck", "verify", "exit: self-check total"),
    ("gradhooks.combine", "probes", "exit: self-check probes (rules' probe)"),
    ("gradhooks.combine", "magnitudes", "exit: self-check magnitudes"),
    ("gradhooks.combine", "per_sample", "exit: build per-sample tensors"),
    ("gradhooks.combine", "squared_norms", "norms(): rules' squared_norms"),
    ("gradhooks.combine", "weighted_sums_into", "clip_(): rules' weighted_sum_into"),
]


@contextmanager
def _timed_library(acc: dict[str, float]) -> Iterator[None]:
    import importlib

    saved = []
    try:
        for mod_name, attr, label in WRAPPED:
            mod = importlib.import_module(mod_name)
            fn = getattr(mod, attr)
            saved.append((mod, attr, fn))
            setattr(mod, attr, _timer(fn, label, acc))
        yield
    finally:
        for mod, attr, fn in reversed(saved):
            setattr(mod, attr, fn)


def _timer(fn: Callable[..., Any], label: str, acc: dict[str, float]) -> Callable[..., Any]:
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            acc[label] += time.perf_counter() - start

    return timed


def _plain_step(model: torch.nn.Module, case: Case) -> dict[str, float]:
    t0 = time.perf_counter()
    loss = case.loss(model(case.x), case.y)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    return {"forward + loss": t1 - t0, "backward": t2 - t1, "total": t2 - t0}


def _hooked_step(model: torch.nn.Module, case: Case, materialize: bool) -> dict[str, float]:
    from gradhooks import per_sample_grads

    acc: dict[str, float] = defaultdict(float)
    with _timed_library(acc):
        t0 = time.perf_counter()
        ctx = per_sample_grads(model, materialize=materialize)
        g = ctx.__enter__()
        t1 = time.perf_counter()
        loss = case.loss(model(case.x), case.y)
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        ctx.__exit__(None, None, None)
        t4 = time.perf_counter()
        if not materialize:
            g.norms()
            t5 = time.perf_counter()
            g.clip_(MAX_NORM)
            t6 = time.perf_counter()
        else:
            t5 = t6 = t4
    out = {"enter": t1 - t0, "forward + loss": t2 - t1, "backward": t3 - t2, "exit": t4 - t3}
    if not materialize:
        out |= {"norms()": t5 - t4, "clip_()": t6 - t5}
    out |= dict(acc)
    out["total"] = t6 - t0
    del g
    return out


def phase_times(case: Case, materialize: bool, repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds per phase: ``(plain, hooked)``, measured alternately."""
    plain_model, hooked_model = copy.deepcopy(case.model), copy.deepcopy(case.model)
    plain: dict[str, list[float]] = defaultdict(list)
    hooked: dict[str, list[float]] = defaultdict(list)
    for r in range(repeats + 1):  # the first round warms up
        for m in (plain_model, hooked_model):
            m.zero_grad(set_to_none=True)
        got_p = _plain_step(plain_model, case)
        got_h = _hooked_step(hooked_model, case, materialize)
        if r:
            for k, v in got_p.items():
                plain[k].append(v)
            for k, v in got_h.items():
                hooked[k].append(v)
    return ({k: statistics.median(v) for k, v in plain.items()}, {k: statistics.median(v) for k, v in hooked.items()})


def _op_table(case: Case, materialize: bool, rows: int = 12) -> str:
    from torch.profiler import ProfilerActivity, profile

    model = copy.deepcopy(case.model)
    _hooked_step(model, case, materialize)  # warm-up
    model.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _hooked_step(model, case, materialize)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def _layers(case: Case) -> int:
    return sum(1 for m in case.model.modules() if any(True for _ in m.parameters(recurse=False)))


def profile_ghost(
    configs: list[str], repeats: int = 5, device: str = "cpu", say: Callable[[str], None] = print, materialize: bool = False, ops: bool = True
) -> str:
    """The phase table of one ``per_sample_grads`` step per configuration."""
    mode = "materialize=True" if materialize else "materialize=False + norms() + clip_(1.0)"
    lines = [f"per_sample_grads({mode}) against plain forward/backward; median ms of {repeats} steps"]
    for name in configs:
        say(f"[profile {name}]")
        case = CONFIGS[name].build("full", device=device)
        plain, hooked = phase_times(case, materialize, repeats)
        extra = hooked["total"] - plain["total"]
        lines.append(f"\n== {name} ({_layers(case)} hooked layers): plain {plain['total'] * 1e3:.1f} ms, "
                     f"gradhooks {hooked['total'] * 1e3:.1f} ms ({hooked['total'] / plain['total']:.2f}x), "
                     f"extra {extra * 1e3:.1f} ms")
        lines.append(f"{'phase':<44} {'ms':>8} {'plain ms':>9} {'extra ms':>9} {'% extra':>8}")
        for k, v in hooked.items():
            if k == "total":
                continue
            base = plain.get(k, 0.0)
            share = 100 * (v - base) / extra if extra > 0 else float("nan")
            lines.append(f"{k:<44} {v * 1e3:8.2f} {base * 1e3:9.2f} {(v - base) * 1e3:9.2f} {share:8.1f}")
        if ops:
            lines.append(_op_table(case, materialize))
    return "\n".join(lines)
