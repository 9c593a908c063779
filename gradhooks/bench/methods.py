"""The methods compared, by name: plain backward, gradhooks' modes
(:mod:`gradhooks.bench.ours`) and the baselines and incumbents
(:mod:`gradhooks.bench.incumbents`). What each one's timed step contains:
:mod:`gradhooks.bench.runner`.
"""

from __future__ import annotations

import warnings

from . import incumbents, ours
from .ours import MAX_NORM
from .runner import Method, Outcome, Runner, Unsupported

__all__ = ["CLIPPING", "MAX_NORM", "METHODS", "Method", "Outcome", "Runner", "Unsupported", "quiet_incumbents", "select_methods"]

#: The incumbents' own warnings, harmless here: BackPACK on container modules,
#: Opacus's full backward hooks on a first layer whose input needs no gradient,
#: its secure-RNG advice (zero noise here) and its note on accounting.
INCUMBENT_CHATTER = (
    "Extension saving to",
    "Full backward hook is firing",
    "Secure RNG turned off",
    "Optimal order is the",
    "Using a non-full backward hook",
    "For backward hooks to be called",  # BackPACK's hooks on Hugging Face modules (output objects)
)


def quiet_incumbents() -> None:
    """Ignore :data:`INCUMBENT_CHATTER` (inside ``warnings.catch_warnings()`` to scope it)."""
    for text in INCUMBENT_CHATTER:
        warnings.filterwarnings("ignore", message=text)


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("plain", "batched forward + backward (the 1.0 baseline)", incumbents.prepare_plain),
        *(Method(name, text, prepare) for name, text, prepare in ours.PREPARE),
        *(Method(name, text, prepare, needs) for name, text, prepare, needs in incumbents.PREPARE),
    ]
}

#: Methods whose step ends with the norms and the clipped mean gradient in ``p.grad``
#: (and BackPACK's norms-only method, their closest relative); the others end with
#: every per-sample gradient and the norms.
CLIPPING = ("gradhooks-ghost", "gradhooks-ghost-1bw", "opacus-clip", "opacus-ghost", "backpack-l2")


def select_methods(spec: str | None) -> list[str]:
    """Comma-separated method names; ``None`` or ``all``: every method. ``plain`` is
    always included (every ratio is to it)."""
    if not spec or spec == "all":
        return list(METHODS)
    names = [p.strip() for p in spec.split(",") if p.strip()]
    for name in names:
        if name not in METHODS:
            raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return ["plain", *[n for n in names if n != "plain"]]
