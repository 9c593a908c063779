"""Peak memory of one step, measured in a process of its own.

``python -m gradhooks.bench.child CONFIG METHOD[,METHOD...] DEVICE CAP SCALE`` prints
one JSON line per method: ``{"method": {"peak_bytes": int, "how": str}}`` or
``{"method": {"error": str}}``. Run by :func:`gradhooks.bench.measure.memory`.

CPU: build the case, prepare the method, one warm-up step (one-time
allocations: thread pools, lazily built structures), free its result, reset
the kernel's peak-RSS mark (``/proc/self/clear_refs`` = 5), read ``VmRSS``,
run one step keeping its result alive, read ``VmHWM``: the peak minus the
pre-step RSS. CUDA: ``max_memory_allocated`` minus ``memory_allocated``.
"""

from __future__ import annotations

import gc
import json
import sys

import torch

from .configs import CONFIGS
from .measure import short_error
from .methods import METHODS, quiet_incumbents

__all__ = ["peak_of_step"]


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_of_step(config: str, method: str, device: str, cap: int, scale: str = "full") -> dict[str, object]:
    """``{"peak_bytes": ..., "how": ...}`` for one step of ``method`` on ``config``."""
    case = CONFIGS[config].build(scale, device=device)
    runner = METHODS[method].prepare(case, cap)
    raw = runner.step()  # warm-up
    del raw
    runner.clear()
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        raw = runner.step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        how = "cuda max_memory_allocated"
    else:
        reset = _reset_hwm()
        base_kb = _status_kb("VmRSS")
        raw = runner.step()
        peak = (_status_kb("VmHWM") - base_kb) * 1024
        how = "VmHWM - VmRSS before the step" + ("" if reset else " (HWM not reset: includes warm-up)")
    del raw
    runner.clear()
    if runner.held_bytes:
        peak += runner.held_bytes
        how += " + the result storage kept between steps"
    return {"peak_bytes": int(peak), "how": how}


def main(argv: list[str]) -> None:
    quiet_incumbents()
    config, methods, device, cap, scale = argv[0], argv[1].split(","), argv[2], int(argv[3]), argv[4]
    for method in methods:
        try:
            got = peak_of_step(config, method, device, cap, scale)
        except Exception as err:
            got = {"error": short_error(err)}
        print(json.dumps({method: got}), flush=True)
        gc.collect()


if __name__ == "__main__":
    main(sys.argv[1:])
