"""``python -m gradhooks.bench``: arguments, the run, the output."""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from typing import Any

from .configs import CONFIGS, GROUPS, QUICK, select_configs
from .measure import Timing, correctness, memory, time_config
from .methods import METHODS, quiet_incumbents, select_methods

__all__ = ["main", "parser"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gradhooks.bench",
        description="Time, peak memory and correctness of gradhooks against plain backward, "
        "a naive loop, torch.func, Opacus and BackPACK (those installed), in one run.",
    )
    p.add_argument("--configs", help=f"comma-separated names or groups, default all: {', '.join([*CONFIGS, *GROUPS])}")
    p.add_argument("--methods", help=f"comma-separated, default all (plain always runs): {', '.join(METHODS)}")
    p.add_argument("--repeats", type=int, help="timed rounds per configuration (default 7; --quick 5)")
    p.add_argument("--warmup", type=int, help="untimed steps per method first (default 1; the settling steps warm too)")
    p.add_argument("--naive-cap", type=int, help="samples the naive loop runs before extrapolating (default 16; --quick 4)")
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"a smoke run of about 20 s on 2 cores: the 'quick' group ({', '.join(QUICK)}) unless --configs, "
        "5 rounds, 1 warm-up, naive cap 4, no memory column; indicative ratios, not the full run's",
    )
    p.add_argument(
        "--memory",
        action=argparse.BooleanOptionalAction,
        help="peak memory, a fresh process per method (default on; --quick: off, or one process per config)",
    )
    p.add_argument(
        "--settle",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="before each timed step, an untimed step of the same method, so the timed one starts from that "
        "method's own steady state as in a training loop (default on; --no-settle: half the steps)",
    )
    p.add_argument("--no-correctness", action="store_true", help="skip the correctness column")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--scale", choices=["full", "small"], default="full", help="small: the tiny correctness instances (smoke test)")
    p.add_argument("--thp", action="store_true", help="run with THP_MEM_ALLOC_ENABLE=1 (PyTorch's CPU allocator asks for huge pages)")
    p.add_argument(
        "--profile",
        action="store_true",
        help="instead of the table: a phase breakdown of the gradhooks methods named in --methods (default "
        "gradhooks-ghost); configs default to seed-headline, mnist-mlp, sequence",
    )
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="bar chart of the time ratios (needs matplotlib)")
    return p


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _row(config: str, method: str, timing: Timing, plain: Timing, result_bytes: int) -> dict[str, Any]:
    med, base = timing.median, plain.median
    cpu = statistics.median(timing.cpu) if timing.cpu else None
    base_cpu = statistics.median(plain.cpu) if plain.cpu else None
    return {
        "config": config,
        "label": CONFIGS[config].label,
        "method": method,
        "status": timing.status,
        "median_s": med,
        "times_s": timing.times,
        "ratio": med / base if med is not None and base else None,
        "spread": timing.spread,
        "cpu_s": cpu,
        "cpu_ratio": cpu / base_cpu if cpu is not None and base_cpu else None,
        "touched_bytes": statistics.median(timing.touched) if timing.touched else None,
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
    configs = select_configs(args.configs or ("quick" if args.quick else None))
    methods = select_methods(args.methods)
    repeats = args.repeats if args.repeats is not None else (5 if args.quick else 7)
    warmup = args.warmup if args.warmup is not None else 1
    cap = args.naive_cap if args.naive_cap is not None else (4 if args.quick else 16)
    with_memory = args.memory if args.memory is not None else not args.quick

    from .report import environment, header, table, write_json

    env = environment(args.device)
    _say(header(env))
    if args.profile:
        from .profile import MODES, profile_modes

        wanted = select_configs(args.configs or "seed-headline,mnist-mlp,sequence")
        modes = [m for m in (args.methods or "gradhooks-ghost").split(",") if m in MODES]
        if not modes:
            raise SystemExit(f"--profile: name gradhooks methods in --methods ({', '.join(MODES)})")
        print(profile_modes(wanted, modes, repeats=max(repeats, 3), device=args.device, say=_say, scale=args.scale))
        return 0

    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    started = time.perf_counter()
    for config in configs:
        why = CONFIGS[config].missing()
        if why:
            skipped.append(f"{config}: {why}")
            _say(f"[{config}] skipped: {why}")
            continue
        rows += _run_config(config, methods, args, repeats=repeats, warmup=warmup, cap=cap, with_memory=with_memory)
    elapsed = time.perf_counter() - started
    _say(f"done in {elapsed:.0f} s")
    print(header(env))
    print(table(rows, {k: c.description for k, c in CONFIGS.items()}))
    for line in skipped:
        print(f"skipped {line}")
    mode = "--quick: " if args.quick else ""
    print(f"{mode}{len(rows)} rows, {repeats} rounds, settle {'on' if args.settle else 'off'}, {elapsed:.0f} s")
    run_args = {**vars(args), "repeats": repeats, "warmup": warmup, "naive_cap": cap, "memory": with_memory,
                "configs": configs, "elapsed_s": elapsed, "skipped": skipped}
    if args.json:
        write_json(args.json, env, run_args, rows)
    if args.plot:
        from .plot import write_plot

        why = write_plot(args.plot, rows)
        if why:
            _say(why)
    return 0


def _run_config(config: str, methods: list[str], args: argparse.Namespace, *, repeats: int, warmup: int, cap: int,
                with_memory: bool) -> list[dict[str, Any]]:
    """Timing, then (fresh processes) memory, then correctness rows of one configuration."""
    rounds = "settling + timed step" if args.settle else "timed step"
    _say(f"[{config}] timing {len(methods)} methods, {repeats} rounds ({rounds} each)")
    case = CONFIGS[config].build(args.scale, device=args.device)
    timings = time_config(case, methods, repeats=repeats, warmup=warmup, cap=cap, device=args.device,
                          settle=args.settle, progress=_say)
    block = [_row(config, m, timings[m], timings["plain"], case.result_bytes()) for m in methods]
    del case
    if with_memory:
        _memory_column(config, block, args.device, cap, args.quick, args.scale)
    if not args.no_correctness:
        _say(f"[{config}] correctness")
        for row in block:
            if row["status"] == "ok":
                _judge(row, *correctness(config, row["method"], args.device))
    return block


#: A relative error against the naive loop above this marks a row ``wrong``
#: (float32 instances, where a method cannot run float64, stay well below it).
WRONG = 1e-4


def _judge(row: dict[str, Any], err: float | None, how: str) -> None:
    """Fill the correctness fields; a method whose small instance fails or disagrees
    with the naive loop gets status ``n/a``, ``error`` or ``wrong`` (not plotted)."""
    row["rel_err"], row["err_dtype"] = err, (how if err is not None else None)
    if err is None:
        row["status"] = "n/a" if how.startswith("n/a: ") else "error"
        row["note"] = how.removeprefix("n/a: ") if row["status"] == "n/a" else f"correctness: {how}"
    elif err > WRONG:
        row["status"] = "wrong"
        row["note"] = f"relative error {err:.1e} against the naive loop"


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
