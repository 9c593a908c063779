"""The benchmark: ``python -m gradhooks.bench --help`` (ships with the package).

gradhooks against plain backward, a naive per-sample loop, ``torch.func``,
Opacus and BackPACK (when installed), on the configurations of
:mod:`gradhooks.bench.configs`: time per training step (ratio to plain
backward), CPU time, new memory touched, peak memory and a correctness check.
Every method's timed step holds the same things: forward, backward, what the
method gives its user (every per-sample gradient and the norms, or the norms
and the clipped ``p.grad``) and the release of the step's tensors
(:mod:`gradhooks.bench.runner`). Needs only torch; matplotlib for ``--plot``.

Layout: ``configs``/``models`` (what is run), ``runner`` (the timed step),
``ours``/``incumbents``/``methods`` (who runs it), ``measure``/``correct``/
``child`` (time, correctness, memory), ``report``/``plot`` (output),
``profile`` (``--profile``: where gradhooks' time goes), ``cli``.
"""

from .cli import main

__all__ = ["main"]
