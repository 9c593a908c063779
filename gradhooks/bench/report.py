"""The results: one row per (configuration, method); a terminal table, JSON, a plot."""

from __future__ import annotations

import json
import math
import os
import platform
from typing import Any

import torch

__all__ = ["LEGEND", "ROW_KEYS", "environment", "header", "table", "write_json"]

#: Keys of every row in the JSON output.
ROW_KEYS = (
    "config", "label", "method", "status", "median_s", "times_s", "ratio", "spread", "cpu_s", "cpu_ratio",
    "touched_bytes", "peak_bytes", "result_bytes", "mem_ratio", "rel_err", "err_dtype", "note",
)  # fmt: skip


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(mod: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:
        return None


def _thp() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def environment(device: str) -> dict[str, Any]:
    """What the numbers depend on: versions, threads, CPU, allocator settings."""
    env = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": _cpu_model(),
        "device": device,
        "python": platform.python_version(),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"),
        "kernel_thp": _thp(),
        "opacus": _version("opacus"),
        "backpack": _version("backpack-for-pytorch"),
    }
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def header(env: dict[str, Any]) -> str:
    lines = [
        f"torch {env['torch']}, {env['threads']} threads, {env['cpu']}, device {env['device']}",
        f"OMP_WAIT_POLICY={env['OMP_WAIT_POLICY']}  THP_MEM_ALLOC_ENABLE={env['THP_MEM_ALLOC_ENABLE']}  "
        f"kernel THP: {env['kernel_thp']}",
        f"opacus {env['opacus'] or 'not installed'}, backpack-for-pytorch {env['backpack'] or 'not installed'}",
    ]
    return "\n".join(lines)


def _fmt(x: float | None, spec: str) -> str:
    """``format(x, spec)``, or ``-`` right-aligned to the spec's width."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        width = spec.split(".")[0]
        return "-".rjust(int(width)) if width.isdigit() else "-"
    return format(x, spec)


def _line(r: dict[str, Any]) -> str:
    ms = None if r["median_s"] is None else r["median_s"] * 1e3
    new = None if r["touched_bytes"] is None else r["touched_bytes"] / 2**20
    mb = None if r["peak_bytes"] is None else r["peak_bytes"] / 2**20
    spread = None if r["spread"] is None else 100 * r["spread"]
    err = _fmt(r["rel_err"], ".1e")
    if r["rel_err"] is not None and r["err_dtype"] == "float32":
        err += "*"
    note = r["note"] if r["status"] == "ok" else f"{r['status']}: {r['note']}"
    return (
        f"{r['method']:<20} {_fmt(ms, '10.1f')} {_fmt(r['ratio'], '8.2f')} {_fmt(spread, '6.0f')} "
        f"{_fmt(r['cpu_ratio'], '6.2f')} {_fmt(new, '8.1f')} {_fmt(mb, '9.1f')} {_fmt(r['mem_ratio'], '9.2f')} "
        f"{err:>9}  {note}"
    )


LEGEND = (
    "\nmedian ms: median of the timed rounds (each after a settling step of the same method); x plain: ratio to "
    "plain's median in the same run (lower is better); +-%: interquartile range / median; cpu x: the same ratio "
    "for process CPU time; new MB: memory first touched per step (page faults: the cost of fresh storage); "
    "peak MB: peak memory growth of one step in a fresh process (CPU: VmHWM - VmRSS before the step); x result: "
    "peak / per-sample result size; rel err: max relative error against the naive loop on a small instance in "
    "float64 (* float32). Every timed step contains forward, backward, what the method gives its user (every "
    "per-sample gradient and the norms, or the norms and the clipped p.grad) and the release of the step's "
    "tensors."
)


def table(rows: list[dict[str, Any]], descriptions: dict[str, str]) -> str:
    """The terminal table: a block per configuration."""
    out = []
    cols = (
        f"{'method':<20} {'median ms':>10} {'x plain':>8} {'+-%':>6} {'cpu x':>6} {'new MB':>8} {'peak MB':>9} "
        f"{'x result':>9} {'rel err':>9}  note"
    )
    for config in dict.fromkeys(r["config"] for r in rows):
        block = [r for r in rows if r["config"] == config]
        size = block[0]["result_bytes"]
        plain = next((r["median_s"] for r in block if r["method"] == "plain" and r["median_s"]), None)
        head = f"plain {plain * 1e3:.1f} ms; " if plain else ""
        out.append(f"\n== {config} ({block[0]['label']}): {descriptions.get(config, '')}; {head}"
                   f"per-sample result {size / 2**20:.1f} MB")
        out.append(cols)
        out.extend(_line(r) for r in block)
    out.append(LEGEND)
    return "\n".join(out)


def write_json(path: str, env: dict[str, Any], args: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    with open(path, "w") as f:
        json.dump({"environment": env, "args": args, "results": rows}, f, indent=1)
