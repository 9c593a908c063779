"""Where ``gradhooks`` spends the time beyond plain backward: a phase breakdown.

``python -m gradhooks.bench --profile [--configs ...] [--methods gradhooks-ghost,gradhooks,...]``
times, per step, the phases of a ``per_sample_grads`` step (in the mode each
named gradhooks method uses) against plain forward and backward on the same
model: entering the context, forward (with hooks), backward (with hooks), the
exit (self-check; building per-sample tensors when materializing), then what
the benchmark's step does after it (every ``g[name]`` and ``norms()``, or
``norms()`` and ``clip_()``) and the release of the step's tensors. Library
functions are timed by wrapping their module attributes for the duration of
the profile (restored afterwards); nothing is changed on the model. Medians
over the repeats, then the top operators by self CPU time.
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

__all__ = ["MODES", "WRAPPED", "phase_times", "profile_modes"]

#: (module, attribute, label): library functions whose time is reported as a phase.
WRAPPED = [
    ("gradhooks.selfcheck", "verify", "exit: self-check"),
    ("gradhooks.selfcheck", "verify_dense_rules", "exit: self-check of dense rules"),
    ("gradhooks.selfcheck", "verify_unchanged", "exit: unseen-gradient check (one backward)"),
    ("gradhooks.stacking", "compact", "exit: stack equal-shape layers"),
    ("gradhooks.sites", "per_sample", "exit: build per-sample tensors"),
    ("gradhooks.sites", "squared_norms", "norms(): rules' squared norms"),
    ("gradhooks.sites", "weighted_sums", "clip_(): rules' clipped sums"),
    ("gradhooks.clip", "write_clipped", "clip_() or exit: write p.grad"),
]

#: The modes of the benchmark's gradhooks methods: ``(materialize, one_backward)``.
MODES = {
    "gradhooks": (True, False),
    "gradhooks-1bw": (True, True),
    "gradhooks-ghost": (False, False),
    "gradhooks-ghost-1bw": (False, True),
}


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
    model.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    return {"forward + loss": t1 - t0, "backward": t2 - t1, "release": t3 - t2, "total": t3 - t0}


def _hooked_step(model: torch.nn.Module, case: Case, mode: str) -> dict[str, float]:
    from gradhooks import per_sample_grads

    materialize, one_backward = MODES[mode]
    acc: dict[str, float] = defaultdict(float)
    with _timed_library(acc):
        t0 = time.perf_counter()
        ctx = per_sample_grads(model, materialize=materialize, one_backward=one_backward)
        g = ctx.__enter__()
        t1 = time.perf_counter()
        loss = case.loss(model(case.x), case.y)
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        ctx.__exit__(None, None, None)
        t4 = time.perf_counter()
        if materialize:
            kept = [g[name] for name in g]
            g.norms()
            t5 = t6 = time.perf_counter()
        else:
            kept = []
            g.norms()
            t5 = time.perf_counter()
            g.clip_(MAX_NORM)
            t6 = time.perf_counter()
        del g, ctx, loss, kept
        model.zero_grad(set_to_none=True)
        t7 = time.perf_counter()
    out = {"enter": t1 - t0, "forward + loss": t2 - t1, "backward": t3 - t2, "exit": t4 - t3}
    out |= {"g[name] + norms()": t6 - t4} if materialize else {"norms()": t5 - t4, "clip_()": t6 - t5}
    out |= {"release": t7 - t6}
    out |= dict(acc)
    out["total"] = t7 - t0
    return out


def phase_times(case: Case, mode: str, repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds per phase: ``(plain, hooked)``, measured alternately."""
    plain_model, hooked_model = copy.deepcopy(case.model), copy.deepcopy(case.model)
    plain: dict[str, list[float]] = defaultdict(list)
    hooked: dict[str, list[float]] = defaultdict(list)
    for r in range(repeats + 1):  # the first round warms up
        got_p = _plain_step(plain_model, case)
        got_h = _hooked_step(hooked_model, case, mode)
        if r:
            for k, v in got_p.items():
                plain[k].append(v)
            for k, v in got_h.items():
                hooked[k].append(v)
    return ({k: statistics.median(v) for k, v in plain.items()}, {k: statistics.median(v) for k, v in hooked.items()})


def _op_table(case: Case, mode: str, rows: int = 12) -> str:
    from torch.profiler import ProfilerActivity, profile

    model = copy.deepcopy(case.model)
    _hooked_step(model, case, mode)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _hooked_step(model, case, mode)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def _layers(case: Case) -> int:
    return sum(1 for m in case.model.modules() if any(True for _ in m.parameters(recurse=False)))


def profile_modes(
    configs: list[str], modes: list[str], repeats: int = 5, device: str = "cpu", say: Callable[[str], None] = print,
    ops: bool = True, scale: str = "full",
) -> str:
    """The phase table of one ``per_sample_grads`` step per configuration and mode
    (names of :data:`MODES`)."""
    lines = []
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"--profile: {mode!r} is not a gradhooks method; choose from {', '.join(MODES)}")
        lines.append(f"\n{mode} against plain forward/backward; median ms of {repeats} steps")
        for name in configs:
            say(f"[profile {name}: {mode}]")
            case = CONFIGS[name].build(scale, device=device)
            plain, hooked = phase_times(case, mode, repeats)
            extra = hooked["total"] - plain["total"]
            lines.append(f"\n== {name} ({_layers(case)} layers with parameters): plain {plain['total'] * 1e3:.1f} ms, "
                         f"{mode} {hooked['total'] * 1e3:.1f} ms ({hooked['total'] / plain['total']:.2f}x), "
                         f"extra {extra * 1e3:.1f} ms")
            lines.append(f"{'phase':<46} {'ms':>8} {'plain ms':>9} {'extra ms':>9} {'% extra':>8}")
            for k, v in hooked.items():
                if k == "total":
                    continue
                base = plain.get(k, 0.0)
                share = 100 * (v - base) / extra if extra > 0 else float("nan")
                lines.append(f"{k:<46} {v * 1e3:8.2f} {base * 1e3:9.2f} {(v - base) * 1e3:9.2f} {share:8.1f}")
            if ops:
                lines.append(_op_table(case, mode))
    return "\n".join(lines)
