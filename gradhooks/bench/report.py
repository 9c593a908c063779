"""The results: one row per (configuration, method); a terminal table, JSON, a plot."""

from __future__ import annotations

import json
import math
import os
import platform
from typing import Any

import torch

__all__ = ["header", "environment", "table", "write_json", "write_plot", "ROW_KEYS"]

#: Keys of every row in the JSON output.
ROW_KEYS = (
    "config", "method", "status", "median_s", "times_s", "ratio", "peak_bytes",
    "result_bytes", "mem_ratio", "rel_err", "err_dtype", "note",
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


def table(rows: list[dict[str, Any]], descriptions: dict[str, str]) -> str:
    """The terminal table: a block per configuration."""
    out = []
    cols = f"{'method':<16} {'median ms':>10} {'x plain':>8} {'peak MB':>9} {'x result':>9} {'rel err':>9}  note"
    for config in dict.fromkeys(r["config"] for r in rows):
        block = [r for r in rows if r["config"] == config]
        size = block[0]["result_bytes"]
        out.append(f"\n== {config}: {descriptions.get(config, '')}; per-sample result {size / 2**20:.1f} MB")
        out.append(cols)
        for r in block:
            ms = None if r["median_s"] is None else r["median_s"] * 1e3
            mb = None if r["peak_bytes"] is None else r["peak_bytes"] / 2**20
            err = _fmt(r["rel_err"], ".1e")
            if r["rel_err"] is not None and r["err_dtype"] == "float32":
                err += "*"
            note = r["note"] if r["status"] == "ok" else f"{r['status']}: {r['note']}"
            out.append(
                f"{r['method']:<16} {_fmt(ms, '10.1f')} {_fmt(r['ratio'], '8.2f')} {_fmt(mb, '9.1f')} "
                f"{_fmt(r['mem_ratio'], '9.2f')} {err:>9}  {note}"
            )
    out.append(
        "\nmedian of interleaved repeats; x plain: ratio to plain's median in the same run; peak MB: peak memory "
        "growth of one step in a fresh process (CPU: VmHWM - VmRSS before the step); x result: peak / per-sample "
        "result size; rel err: max relative error against the naive loop on a small instance in float64 "
        "(* float32)."
    )
    return "\n".join(out)


def write_json(path: str, env: dict[str, Any], args: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    with open(path, "w") as f:
        json.dump({"environment": env, "args": args, "results": rows}, f, indent=1)


def write_plot(path: str, rows: list[dict[str, Any]]) -> str | None:
    """A bar chart of time ratios to plain (log scale), one group per configuration.
    Returns an explanation instead when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "--plot needs matplotlib: pip install matplotlib (or the 'bench' extra)"
    configs = list(dict.fromkeys(r["config"] for r in rows))
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "plain"]
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(configs)), 5))
    for k, method in enumerate(methods):
        ratios = []
        for c in configs:
            got = [r["ratio"] for r in rows if r["config"] == c and r["method"] == method]
            ratios.append(got[0] if got and got[0] is not None else float("nan"))
        ax.bar([i + k * width for i in range(len(configs))], ratios, width, label=method)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(configs))], configs, rotation=20, ha="right")
    ax.set_ylabel("time / plain backward")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
