"""``python -m gradhooks.bench``: arguments, the run, the output."""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from typing import Any

from .configs import CONFIGS, GROUPS, select_configs
from .measure import Timing, correctness, memory, time_config
from .methods import METHODS, quiet_incumbents, select_methods

__all__ = ["main", "parser"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gradhooks.bench",
        description="Time, peak memory and correctness of gradhooks against plain backward, "
        "a naive loop, torch.func, Opacus and BackPACK (those installed), in one run.",
    )
    p.add_argument("--configs", help=f"comma-separated, default all: {', '.join([*CONFIGS, *GROUPS])}")
    p.add_argument("--methods", help=f"comma-separated, default all (plain always runs): {', '.join(METHODS)}")
    p.add_argument("--repeats", type=int, help="timed rounds per configuration (default 7; --quick 1)")
    p.add_argument("--warmup", type=int, help="untimed steps per method first (default 2; --quick 1)")
    p.add_argument("--naive-cap", type=int, help="samples the naive loop runs before extrapolating (default 16; --quick 1)")
    p.add_argument("--quick", action="store_true", help="about a minute: 1 warm-up, 1 round, naive cap 1, no memory column")
    p.add_argument(
        "--memory",
        action=argparse.BooleanOptionalAction,
        help="peak memory, a fresh process per method (default on; --quick: off, or one process per config)",
    )
    p.add_argument("--no-correctness", action="store_true", help="skip the correctness column")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--scale", choices=["full", "small"], default="full", help="small: the tiny correctness instances (smoke test)")
    p.add_argument("--thp", action="store_true", help="run with THP_MEM_ALLOC_ENABLE=1 (PyTorch's CPU allocator asks for huge pages)")
    p.add_argument(
        "--profile",
        action="store_true",
        help="instead of the table: a phase breakdown of gradhooks-ghost (and of gradhooks if named in --methods); "
        "configs default to seed-headline, mnist-mlp, sequence",
    )
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="bar chart of the time ratios (needs matplotlib)")
    return p


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _row(config: str, method: str, timing: Timing, plain: float | None, result_bytes: int) -> dict[str, Any]:
    med = timing.median
    missing = timing.error is not None and timing.error.startswith("not installed")
    return {
        "config": config,
        "method": method,
        "status": "ok" if timing.error is None else ("not installed" if missing else "error"),
        "median_s": med,
        "times_s": timing.times,
        "ratio": med / plain if med is not None and plain else None,
        "peak_bytes": None,
        "result_bytes": result_bytes,
        "mem_ratio": None,
        "rel_err": None,
        "err_dtype": None,
        "note": timing.error or timing.note,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark with command-line ``argv``; returns the exit status."""
    args = parser().parse_args(argv)
    with warnings.catch_warnings():
        quiet_incumbents()
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    if os.environ.get("OMP_WAIT_POLICY") is None:
        warnings.warn(
            "OMP_WAIT_POLICY is not set: multi-threaded CPU timings may stall; run "
            "`python -m gradhooks.bench`, which sets it before importing torch",
            RuntimeWarning,
            stacklevel=2,
        )
    if args.thp and os.environ.get("THP_MEM_ALLOC_ENABLE") != "1":
        warnings.warn("--thp needs THP_MEM_ALLOC_ENABLE=1 before torch is imported; run `python -m gradhooks.bench --thp`", RuntimeWarning, stacklevel=2)
    configs = select_configs(args.configs)
    methods = select_methods(args.methods)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 7)
    warmup = args.warmup if args.warmup is not None else 1 if args.quick else 2
    cap = args.naive_cap if args.naive_cap is not None else (1 if args.quick else 16)
    with_memory = args.memory if args.memory is not None else not args.quick

    from .report import environment, header, table, write_json, write_plot

    env = environment(args.device)
    _say(header(env))
    if args.profile:
        from .profile import profile_ghost

        wanted = select_configs(args.configs or "seed-headline,mnist-mlp,sequence")
        modes = [m for m in (args.methods or "gradhooks-ghost").split(",") if m.startswith("gradhooks")]
        for mode in modes:
            print(profile_ghost(wanted, repeats=max(repeats, 3), device=args.device, say=_say, materialize=mode == "gradhooks"))
        return 0

    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for config in configs:
        _say(f"[{config}] timing {len(methods)} methods, {repeats} rounds")
        case = CONFIGS[config].build(args.scale, device=args.device)
        timings = time_config(case, methods, repeats=repeats, warmup=warmup, cap=cap, device=args.device, progress=_say)
        plain = timings["plain"].median
        block = [_row(config, m, timings[m], plain, case.result_bytes()) for m in methods]
        del case
        if with_memory:
            _memory_column(config, block, args.device, cap, args.quick, args.scale)
        if not args.no_correctness:
            _say(f"[{config}] correctness")
            for row in block:
                row["rel_err"], row["err_dtype"] = correctness(config, row["method"], args.device)
                if row["rel_err"] is None and row["status"] == "ok":
                    row["note"] = f"correctness: {row['err_dtype']}"
                    row["err_dtype"] = None
        rows += block
    _say(f"done in {time.perf_counter() - started:.0f} s")
    print(header(env))
    print(table(rows, {k: c.description for k, c in CONFIGS.items()}))
    run_args = {**vars(args), "repeats": repeats, "warmup": warmup, "naive_cap": cap, "memory": with_memory}
    if args.json:
        write_json(args.json, env, run_args, rows)
    if args.plot:
        why = write_plot(args.plot, rows)
        if why:
            _say(why)
    return 0


def _memory_column(config: str, block: list[dict[str, Any]], device: str, cap: int, one_process: bool, scale: str) -> None:
    """Fill ``peak_bytes``/``mem_ratio``: a fresh process per method (``--quick``: one per config)."""
    todo = [r["method"] for r in block if r["status"] == "ok" and r["method"] != "naive"]
    _say(f"[{config}] peak memory of {len(todo)} methods")
    groups = [todo] if one_process else [[m] for m in todo]
    got: dict[str, Any] = {}
    for group in groups:
        if group:
            got.update(memory(config, group, device, cap, scale))
    for row in block:
        m = got.get(row["method"])
        if m is None:
            continue
        if "error" in m:
            row["note"] = (row["note"] + "; " if row["note"] else "") + m["error"]
            continue
        row["peak_bytes"] = m["peak_bytes"]
        row["mem_ratio"] = m["peak_bytes"] / row["result_bytes"] if row["result_bytes"] else None
