"""``DPSGD``'s arguments, validated once: every wrong combination is an error that
says what to pass instead."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..distributed import World
from ..errors import ArgumentTypeError, InvalidArgumentError
from .accounting import Mechanism
from .clipping import Clipping, FlatClipping
from .errors import UncoveredParameterError
from .mechanism import positive

if TYPE_CHECKING:
    from ..context import LossReduction

__all__ = ["Config", "configure", "check_optimizer", "device_of", "seeded", "broadcast_state"]


@dataclass
class Config:
    dataset_size: int
    expected_batch_size: float
    sample_rate: float
    delta: float
    clipping: Clipping
    noise_multiplier: float  # given, or calibrated by DPSGD
    target_epsilon: float | None
    epochs: int | None
    steps_per_epoch: int
    planned_steps: int | None
    max_physical_batch_size: int | None
    loss_reduction: LossReduction  # checked by configure()
    accountant: Mechanism


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgumentError(f"DPSGD: {name} must be a positive int, got {value!r}")
    return value


def configure(model: nn.Module, optimizer: Any, *, dataset_size: Any, expected_batch_size: Any, delta: Any,
              max_norm: Any, clipping: Any, noise_multiplier: Any, target_epsilon: Any, epochs: Any,
              max_physical_batch_size: Any, loss_reduction: Any, accountant: Any,
              noise_generator: Any, world: World | None, ddp: nn.Module) -> Config:
    """Validate ``DPSGD``'s arguments (``model``: the inner module under DDP)."""
    if not isinstance(model, nn.Module):
        raise ArgumentTypeError(f"DPSGD: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ArgumentTypeError(f"DPSGD: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    dataset_size = _positive_int("dataset_size", dataset_size)
    expected = positive("DPSGD", "expected_batch_size", expected_batch_size)
    if expected > dataset_size:
        raise InvalidArgumentError(f"DPSGD: expected_batch_size ({expected:g}) exceeds dataset_size ({dataset_size})")
    ok = isinstance(delta, (int, float)) and not isinstance(delta, bool) and 0 < delta < 1
    if not ok:
        raise InvalidArgumentError(f"DPSGD: delta must be in (0, 1) (typically << 1/dataset_size), got {delta!r}")
    if (max_norm is None) == (clipping is None):
        raise InvalidArgumentError("DPSGD: pass exactly one of max_norm= (flat clipping) and clipping= (a clipping style)")
    if clipping is not None and not isinstance(clipping, Clipping):
        raise ArgumentTypeError(f"DPSGD: clipping must be a gradhooks.privacy clipping style, got {type(clipping).__name__}")
    style = clipping if clipping is not None else FlatClipping(max_norm)
    if (noise_multiplier is None) == (target_epsilon is None):
        raise InvalidArgumentError("DPSGD: pass exactly one of noise_multiplier= and target_epsilon=")
    if epochs is not None:
        epochs = _positive_int("epochs", epochs)
    if target_epsilon is not None:
        positive("DPSGD", "target_epsilon", target_epsilon)
        if epochs is None:
            raise InvalidArgumentError("DPSGD: target_epsilon needs epochs= (the noise is calibrated for that many steps)")
    sigma = 0.0 if noise_multiplier is None else positive(
        "DPSGD", "noise_multiplier", noise_multiplier, allow_zero=True, hint=" (0: clipping only, epsilon = inf)")
    if max_physical_batch_size is not None:
        max_physical_batch_size = _positive_int("max_physical_batch_size", max_physical_batch_size)
    if loss_reduction not in ("sum", "mean"):
        raise InvalidArgumentError(f"DPSGD: loss_reduction must be 'sum' or 'mean', got {loss_reduction!r}")
    if accountant not in ("rdp", "prv"):
        raise InvalidArgumentError(f"DPSGD: accountant must be 'rdp' or 'prv', got {accountant!r}")
    if noise_generator is not None and not isinstance(noise_generator, torch.Generator):
        raise ArgumentTypeError(f"DPSGD: noise_generator must be a torch.Generator, got {type(noise_generator).__name__}")
    if _is_fsdp(model):
        raise ArgumentTypeError(
            "DPSGD: FSDP-sharded models are not supported (its micro-batches are summed locally and reduced once, "
            "which FSDP's sharded gradients do not allow); use per_sample_grads and privatize_ per batch, with "
            "PoissonBatchSampler and Accountant"
        )
    if world is not None and getattr(ddp, "broadcast_buffers", False) and any(True for _ in model.buffers()):
        raise InvalidArgumentError(
            "DPSGD: this DistributedDataParallel model broadcasts buffers in every forward (a collective), "
            "but ranks run different numbers of micro-batches under Poisson sampling; construct it with "
            "DistributedDataParallel(..., broadcast_buffers=False)"
        )
    q = expected / dataset_size
    per_epoch = max(1, round(1 / q))
    return Config(
        dataset_size=dataset_size, expected_batch_size=expected, sample_rate=q, delta=float(delta), clipping=style,
        noise_multiplier=sigma, target_epsilon=None if target_epsilon is None else float(target_epsilon),
        epochs=epochs, steps_per_epoch=per_epoch, planned_steps=None if epochs is None else epochs * per_epoch,
        max_physical_batch_size=max_physical_batch_size, loss_reduction=loss_reduction, accountant=accountant,
    )


def check_optimizer(optimizer: torch.optim.Optimizer, trainable: dict[str, nn.Parameter]) -> None:
    ids = {id(p) for p in trainable.values()}
    foreign = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad and id(p) not in ids]
    if foreign:
        raise UncoveredParameterError(
            f"DPSGD: the optimizer updates {len(foreign)} trainable parameter(s) (shapes "
            f"{[tuple(p.shape) for p in foreign[:3]]}) that are not the model's: their gradients would be "
            "neither clipped nor noised. Give the optimizer the model's parameters only."
        )


def device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def seeded(device: Any) -> torch.Generator:
    """A generator seeded from PyTorch's global RNG (``torch.manual_seed`` makes it reproducible)."""
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    return torch.Generator(device=device).manual_seed(seed)


def broadcast_state(generator: torch.Generator | None, world: World) -> None:
    """Every rank's sampling generator takes rank 0's state: one Poisson batch for all."""
    import torch.distributed as dist

    assert generator is not None
    state = generator.get_state().to(world.device)
    dist.broadcast(state, src=0, group=world.group)
    generator.set_state(state.cpu())


def _is_fsdp(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())
