"""gradhooks' methods: ``per_sample_grads`` in each of its modes, timed as a user's step.

Materialized (``gradhooks``, ``gradhooks-reuse``, ``gradhooks-1bw``): the
context, forward and backward, every ``g[name]`` read and ``g.norms()``.
Clipping (``gradhooks-ghost``, ``gradhooks-ghost-1bw``): ``materialize=False``,
then ``g.norms()`` and ``g.clip_(1.0)``, which writes the clipped mean
gradient into ``p.grad``.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import Tensor

from .configs import Case
from .runner import Outcome, Runner, grads

__all__ = ["MAX_NORM", "PREPARE"]

#: Clipping bound of every clipping method.
MAX_NORM = 1.0


def _materialized(case: Case, *, one_backward: bool = False, reuse: bool = False) -> Runner:
    from gradhooks import per_sample_grads

    model = copy.deepcopy(case.model)
    held: dict[str, Any] = {"prev": None}

    def step() -> tuple[dict[str, Tensor], Tensor]:
        with per_sample_grads(model, one_backward=one_backward, reuse=held["prev"] if reuse else None) as g:
            case.loss(model(case.x), case.y).backward()
        tensors = {name: g[name] for name in g}
        norms = g.norms()
        if reuse:
            held["prev"] = g
        return tensors, norms

    def outcome(raw: tuple[dict[str, Tensor], Tensor]) -> Outcome:
        # Both modes leave the batch's mean gradient in p.grad (one_backward: written by us).
        return Outcome(per_sample=raw[0], norms=raw[1], batch_grad=grads(model))

    return Runner(step, outcome, model, held_bytes=case.result_bytes() if reuse else 0)


def _clipping(case: Case, *, one_backward: bool = False) -> Runner:
    from gradhooks import per_sample_grads

    model = copy.deepcopy(case.model)

    def step() -> Tensor:
        with per_sample_grads(model, materialize=False, one_backward=one_backward) as g:
            case.loss(model(case.x), case.y).backward()
        norms = g.norms()
        g.clip_(MAX_NORM)
        return norms

    return Runner(step, lambda norms: Outcome(norms=norms, clipped=grads(model)), model)


def prepare_gradhooks(case: Case, cap: int) -> Runner:
    return _materialized(case)


def prepare_gradhooks_reuse(case: Case, cap: int) -> Runner:
    """A training loop's steady state: each step passes the previous result as
    ``reuse=``, so the per-sample tensors are written into warm storage."""
    return _materialized(case, reuse=True)


def prepare_gradhooks_1bw(case: Case, cap: int) -> Runner:
    """Materialized, one backward: backward computes no weight gradient; ``p.grad`` is
    the per-sample gradients' mean, written at exit."""
    return _materialized(case, one_backward=True)


def prepare_gradhooks_ghost(case: Case, cap: int) -> Runner:
    return _clipping(case)


def prepare_gradhooks_ghost_1bw(case: Case, cap: int) -> Runner:
    """``materialize=False``, one backward: norms, then ``clip_`` writes ``p.grad``."""
    return _clipping(case, one_backward=True)


#: ``(name, description, prepare)`` in table order.
PREPARE = [
    ("gradhooks", "materialize=True: every g[name] and g.norms(); fresh storage each step", prepare_gradhooks),
    ("gradhooks-reuse", "as gradhooks, with reuse= the previous step's result (warm storage)", prepare_gradhooks_reuse),
    ("gradhooks-1bw", "as gradhooks with one_backward=True: no weight gradients in backward, p.grad written at exit",
     prepare_gradhooks_1bw),
    ("gradhooks-ghost", "materialize=False, then g.norms() and g.clip_(1.0) (clipped mean in p.grad)", prepare_gradhooks_ghost),
    ("gradhooks-ghost-1bw", "as gradhooks-ghost with one_backward=True", prepare_gradhooks_ghost_1bw),
]
