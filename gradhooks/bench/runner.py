"""What a method is to the harness: a :class:`Runner` whose ``step()`` is one
training step as its user pays for it.

The timed region, the same for every method: ``step()`` (forward, loss,
backward, the method's per-sample work and what a user then reads: every
per-sample tensor and the ``(N,)`` norms, or the norms and the clipped
``p.grad`` for clipping methods), then dropping the step's result and
``clear()`` (``zero_grad(set_to_none=True)`` and the method's own state):
in a training loop, freeing one step's tensors is part of the next step's
cost. ``outcome(raw)`` (untimed) turns a step's result into comparable
per-sample quantities.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .configs import Case

__all__ = ["Method", "Outcome", "Runner", "Unsupported", "grads", "norms_of", "trainable"]


class Unsupported(Exception):
    """A method cannot run a configuration by its own design (a layer type it does
    not support): the table says ``n/a`` and why, not ``error``."""


@dataclass
class Outcome:
    """What a step produced, in per-sample units: per-sample gradients ``(N, *p.shape)``,
    norms ``(N,)``, clipped mean gradients ``p.shape``, or the batch (mean) gradient."""

    per_sample: dict[str, Tensor] | None = None
    norms: Tensor | None = None
    clipped: dict[str, Tensor] | None = None
    batch_grad: dict[str, Tensor] | None = None


@dataclass
class Runner:
    """A prepared method: ``step()`` and ``clear()`` (timed), ``outcome(raw)`` (untimed).

    ``scale``: the step covers ``1/scale`` of the batch (the capped naive loop);
    its time is multiplied by ``scale``."""

    step: Callable[[], Any]
    outcome: Callable[[Any], Outcome]
    model: nn.Module
    scale: float = 1.0
    note: str = ""
    extra_clear: list[Callable[[], None]] = field(default_factory=list)
    #: Bytes the method keeps between steps (``reuse=``'s storage), added to its peak.
    held_bytes: int = 0

    def clear(self) -> None:
        """End of a step: ``p.grad = None`` (as ``zero_grad(set_to_none=True)``) and method state."""
        for f in self.extra_clear:
            f()
        for p in self.model.parameters():
            p.grad = None


@dataclass
class Method:
    """A named method; ``needs``: modules that must import, else "not installed"."""

    name: str
    description: str
    prepare: Callable[[Case, int], Runner]
    needs: tuple[str, ...] = ()

    def missing(self) -> str | None:
        """``None`` when usable, else how to install what is missing (``"pip install opacus"``)."""
        for mod in self.needs:
            try:
                importlib.import_module(mod)
            except ModuleNotFoundError:
                return INSTALL.get(mod, f"pip install {mod}")
            except Exception as err:  # a broken install
                return f"import {mod} failed ({type(err).__name__}: {str(err).splitlines()[0][:100] if str(err) else ''})"
        return None


#: How to install an incumbent without replacing the installed torch.
INSTALL = {
    "opacus": "pip install opacus",
    "backpack": "pip install --no-deps backpack-for-pytorch einops unfoldNd",
}


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{name: p}`` of the parameters that require grad, in ``named_parameters()`` order."""
    return {k: p for k, p in model.named_parameters() if p.requires_grad}


def grads(model: nn.Module) -> dict[str, Tensor]:
    """``{name: p.grad}`` of the trainable parameters (zeros where backward left ``None``)."""
    return {k: p.grad if p.grad is not None else torch.zeros_like(p) for k, p in trainable(model).items()}


def norms_of(tensors: Mapping[str, Tensor], n: int, scale: float = 1.0) -> Tensor:
    """``(N,)``: each sample's L2 norm over all per-sample tensors ``(N, *shape)``, times
    ``scale``: what a user of a library that returns per-sample tensors computes."""
    per_param = [torch.linalg.vector_norm(t.reshape(n, -1), dim=1) for t in tensors.values()]
    norms = torch.linalg.vector_norm(torch.stack(per_param), dim=0)
    return norms * scale if scale != 1.0 else norms
