"""The benchmark: ``python -m gradhooks.bench --help``.

gradhooks against plain backward, a naive per-sample loop, ``torch.func``,
Opacus and BackPACK (when installed), on the configurations of
:mod:`gradhooks.bench.configs`: time (ratio to plain backward), peak memory
and a correctness check. Needs only torch; matplotlib for ``--plot``.
"""

from .cli import main

__all__ = ["main"]
