"""Start ``world`` gloo worker processes for a distributed test and collect what
they report, bounded in time; every process is reaped on every path.

A worker is ``target(rank, *args, out)`` and puts ``(rank, "ok", result)`` or
``(rank, "fail", traceback)`` on ``out``."""

from __future__ import annotations

from typing import Any

import torch.multiprocessing as mp


def spawn(world: int, target: Any, *args: Any, timeout_s: float = 120) -> list[tuple[int, str, Any]]:
    """Run the workers; fail the test with every failing rank's traceback."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, *args, out)) for r in range(world)]
    for p in procs:
        p.start()
    results = []
    try:
        for _ in range(world):
            results.append(out.get(timeout=timeout_s))
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    failures = [r for r in results if r[1] != "ok"]
    assert not failures, "\n".join(str(f[2]) for f in failures)
    return results
