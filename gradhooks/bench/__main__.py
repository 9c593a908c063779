"""``python -m gradhooks.bench``: set the environment torch reads at import, then run.

``OMP_WAIT_POLICY=PASSIVE`` (unless already set; without it, 2-thread CPU runs
stall) and, with ``--thp``, ``THP_MEM_ALLOC_ENABLE=1`` must be in the
environment before torch is imported: the OpenMP runtime and PyTorch's CPU
allocator read them once, at load. ``python -m`` imports the ``gradhooks``
package, and with it torch, before this file runs, so when a variable is
missing the process re-executes itself with it set.
"""

from __future__ import annotations

import os
import sys

_MARK = "GRADHOOKS_BENCH_REEXEC"


def _wanted_env(argv: list[str]) -> dict[str, str]:
    want = {}
    if "OMP_WAIT_POLICY" not in os.environ:
        want["OMP_WAIT_POLICY"] = "PASSIVE"
    if "--thp" in argv and os.environ.get("THP_MEM_ALLOC_ENABLE") != "1":
        want["THP_MEM_ALLOC_ENABLE"] = "1"
    return want


def _prepare_environment() -> None:
    want = _wanted_env(sys.argv[1:])
    if not want:
        return
    os.environ.update(want)
    if "torch" not in sys.modules:
        return  # set in time
    if os.environ.get(_MARK):
        print(f"gradhooks.bench: could not set {sorted(want)} before torch was imported", file=sys.stderr)
        return
    os.environ[_MARK] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "gradhooks.bench", *sys.argv[1:]])


if __name__ == "__main__":
    _prepare_environment()
    from .cli import main

    sys.exit(main())
