"""``DPSGD``: the DP-SGD loop as one object that owns sampling, clipping, noise and
accounting, and leaves the model unchanged::

    dp = DPSGD(model, optimizer, dataset_size=len(x), expected_batch_size=256,
               target_epsilon=3.0, delta=1e-5, epochs=20, max_norm=1.0)
    for idx in dp.batches():                  # Poisson sampling; empty batches handled
        with dp.step():                       # per-sample clipping; noise, step, account
            F.cross_entropy(model(x[idx]), y[idx], reduction="sum").backward()
    dp.epsilon()

The loop cannot be gotten wrong silently: a yielded batch that is not stepped,
``optimizer.step()`` or ``zero_grad()`` by hand inside the loop, or a step
outside ``batches()`` raise :class:`~gradhooks.privacy.DPUsageError`; a
calibrated run refuses steps beyond its plan (:class:`PrivacyBudgetError`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..context import per_sample_grads
from ..distributed import World, world_of
from ..errors import InvalidArgumentError
from ..result import PerSampleGrads
from .accounting import Accountant, Mechanism, noise_multiplier_for
from .clipping import Clipping
from .config import Config, broadcast_state, check_optimizer, configure, device_of, seeded
from .errors import DPUsageError, PrivacyBudgetError
from .logical import LogicalBatch
from .sampling import PoissonBatchSampler, shard, split

__all__ = ["DPSGD"]


@dataclass
class _Micro:
    indices: Tensor
    last: bool


class DPSGD:
    """DP-SGD with Poisson sampling for ``model`` and ``optimizer`` (see the module doc).

    Args:
        model: any ``nn.Module``, or a ``DistributedDataParallel`` one (then every
            rank constructs ``DPSGD`` and runs the loop; the constructor is collective).
        optimizer: the optimizer of the model's trainable parameters; ``DPSGD``
            calls its ``zero_grad()`` and ``step()``, once per logical batch.
        dataset_size: number of training examples (the accounting's population).
        expected_batch_size: ``L``; each example is in a batch with probability
            ``q = L / dataset_size``, and the noisy sum is divided by ``L``.
        delta: the ``delta`` of the reported (epsilon, delta).
        max_norm: per-sample clipping norm ``C`` (flat clipping); or pass ``clipping``.
        clipping: a :mod:`~gradhooks.privacy.clipping` style instead of ``max_norm``.
        noise_multiplier: ``sigma`` (noise std ``sigma * sensitivity``); or
        target_epsilon: calibrate ``sigma`` for ``epochs`` epochs with Opacus' search.
        epochs: planned epochs (``round(1/q)`` steps each); needed with ``target_epsilon``.
        max_physical_batch_size: split each logical batch into micro-batches of at
            most this many examples (one noise draw, one accountant step per logical batch).
        loss_reduction: how the loss in the step sums over the micro-batch
            (``"sum"``, recommended, or ``"mean"``).
        accountant: ``"rdp"`` or ``"prv"`` (Opacus).
        sample_generator: CPU ``torch.Generator`` for the batches (same state on every rank).
        noise_generator: ``torch.Generator`` on the parameters' device for the noise.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, dataset_size: int,
                 expected_batch_size: float, delta: float, max_norm: float | None = None,
                 clipping: Clipping | None = None, noise_multiplier: float | None = None,
                 target_epsilon: float | None = None, epochs: int | None = None,
                 max_physical_batch_size: int | None = None, loss_reduction: str = "sum",
                 accountant: Mechanism = "rdp", sample_generator: torch.Generator | None = None,
                 noise_generator: torch.Generator | None = None) -> None:
        self.model = model
        self.optimizer = optimizer
        self._world: World | None = world_of(model)
        inner = model.module if self._world is not None else model  # DDP: the wrapped module
        assert isinstance(inner, nn.Module)
        self._inner = inner
        cfg: Config = configure(
            self._inner, optimizer, dataset_size=dataset_size, expected_batch_size=expected_batch_size,
            delta=delta, max_norm=max_norm, clipping=clipping, noise_multiplier=noise_multiplier,
            target_epsilon=target_epsilon, epochs=epochs, max_physical_batch_size=max_physical_batch_size,
            loss_reduction=loss_reduction, accountant=accountant, noise_generator=noise_generator,
            world=self._world, ddp=model,
        )
        self.config = cfg
        self.clipping = cfg.clipping
        if cfg.target_epsilon is not None:
            assert cfg.planned_steps is not None
            cfg.noise_multiplier = noise_multiplier_for(
                target_epsilon=cfg.target_epsilon, delta=cfg.delta, sample_rate=cfg.sample_rate,
                steps=cfg.planned_steps, mechanism=cfg.accountant,
            )
        self.clipping.bind(list(self._trainable()), cfg.expected_batch_size)
        self.clipping.gradient_noise_multiplier(cfg.noise_multiplier)  # refuses an impossible split early
        self.sampler = PoissonBatchSampler(dataset_size, cfg.sample_rate, generator=sample_generator or seeded("cpu"))
        self.noise_generator = noise_generator or seeded(device_of(self._inner))
        if self._world is not None:
            broadcast_state(self.sampler.generator, self._world)
        self._history: list[list[float]] = []  # Opacus' format: [sigma, q, steps]
        self._steps = 0
        self._batch: LogicalBatch | None = None
        self._pending: _Micro | None = None
        self._stepping = False
        self._external_step = False  # True: the caller steps the optimizer after each logical batch (HF Trainer)
        self._last: PerSampleGrads | None = None
        self.last_norms: list[Tensor] = []  # the current/last logical batch's per-sample norms (not private)

    # -- what the run is ------------------------------------------------------

    @property
    def noise_multiplier(self) -> float:
        """``sigma``, given or calibrated from the target epsilon."""
        return self.config.noise_multiplier

    @property
    def sample_rate(self) -> float:
        """``q = expected_batch_size / dataset_size``."""
        return self.config.sample_rate

    @property
    def steps(self) -> int:
        """Logical batches taken (empty ones included)."""
        return self._steps

    @property
    def steps_per_epoch(self) -> int:
        """``round(1 / q)``: one pass over the data in expectation."""
        return self.config.steps_per_epoch

    def epsilon(self, delta: float | None = None) -> float:
        """Epsilon of (epsilon, delta)-DP after the steps taken (``delta`` defaults to the
        constructor's), from Opacus' accountant; ``inf`` with ``noise_multiplier=0``."""
        delta = self.config.delta if delta is None else delta
        if any(s == 0 for s, _, _ in self._history):
            return math.inf
        acc = Accountant(self.config.accountant)
        acc.load_state_dict({"mechanism": self.config.accountant, "history": self._history})
        return acc.epsilon(delta)

    # -- the loop -------------------------------------------------------------

    def batches(self, epochs: int | None = None) -> Iterator[Tensor]:
        """Yield the int64 indices of each physical micro-batch (this rank's share under DDP).

        ``epochs``: how many epochs to sample now (default: the rest of the
        constructor's ``epochs``). Every yielded batch must be used in one
        ``with dp.step():``. An empty logical batch is never yielded: its step
        (noise alone, optimizer step, accounting) is taken here.
        """
        total = self._steps_to_run(epochs)
        handle = self.optimizer.register_step_pre_hook(self._guard_step)
        try:
            for _ in range(total):
                self._open()
                indices = self.sampler.draw()
                if self._world is not None:
                    indices = shard(indices, self._world.rank, self._world.size)
                yield from self._micro_batches(indices)
        finally:
            handle.remove()
            self._pending = None
            if self._batch is not None:
                self._abandon()

    def _micro_batches(self, indices: Tensor) -> Iterator[Tensor]:
        """The open logical batch's micro-batches of ``indices``, each to be stepped; the
        last step (or, for an empty batch, this generator) finishes the logical batch."""
        chunks = split(indices, self.config.max_physical_batch_size)
        for i, chunk in enumerate(chunks):
            self._pending = _Micro(chunk, last=i == len(chunks) - 1)
            yield chunk
            if self._pending is not None:
                self._pending = None
                self._abandon()
                raise DPUsageError(
                    "DPSGD.batches(): a yielded batch was not used in `with dp.step():` before the next one "
                    "was requested; every batch must be stepped (skipping one changes what was sampled, "
                    "and the epsilon with it)"
                )
            if self._batch is None:
                return  # the step failed: the rest of this logical batch is dropped
        if not chunks:
            self._end()

    @contextlib.contextmanager
    def step(self) -> Iterator[PerSampleGrads]:
        """Run the forward and ``backward()`` of the batch just yielded inside this block.

        Inside: ``per_sample_grads(model, materialize=False, one_backward=True)``
        (and ``no_sync()`` under DDP). On exit the micro-batch's clipped sum is
        added; after the last micro-batch of a logical batch the noise is drawn,
        the optimizer steps and the accountant records one step. Yields the
        result ``g`` (norms for diagnostics: they are *not* private), valid until
        the next ``dp.step()`` begins.
        """
        micro, batch = self._pending, self._batch
        if micro is None or batch is None:
            raise DPUsageError("DPSGD.step(): use it inside `for idx in dp.batches():`, once per yielded batch")
        batch.check_untouched("DPSGD.step()")
        if self._last is not None:
            self._last._fail("DPSGD released this result when the next dp.step() began")
            self._last = None
        ok = False
        try:
            # DDP's no_sync(); torch types Module.__getattr__ as Tensor | Module.
            sync = self.model.no_sync() if self._world is not None else contextlib.nullcontext()  # pyright: ignore[reportCallIssue]
            ctx = per_sample_grads(self._inner, loss_reduction=self.config.loss_reduction, materialize=False, one_backward=True)
            with sync, ctx as g:
                yield g
            self.last_norms.append(batch.add(g).detach())
            self._last = g
            self._pending = None
            if micro.last:
                self._end()
            ok = True
        finally:
            self._pending = None
            if not ok and self._batch is not None:
                self._abandon()

    # -- internals ------------------------------------------------------------

    def _trainable(self) -> dict[str, nn.Parameter]:
        return {k: p for k, p in self._inner.named_parameters() if p.requires_grad}

    def _steps_to_run(self, epochs: int | None) -> int:
        if epochs is not None:
            if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
                raise InvalidArgumentError(f"DPSGD.batches: epochs must be a positive int, got {epochs!r}")
            return epochs * self.config.steps_per_epoch
        if self.config.planned_steps is None:
            raise InvalidArgumentError("DPSGD.batches: pass epochs= (the constructor was given no epochs)")
        return max(0, self.config.planned_steps - self._steps)

    def _open(self) -> None:
        """Start a logical batch: budget, parameters checked, gradients cleared."""
        cfg = self.config
        if cfg.target_epsilon is not None and cfg.planned_steps is not None and self._steps >= cfg.planned_steps:
            raise PrivacyBudgetError(
                f"DPSGD: the noise multiplier {cfg.noise_multiplier:.4g} was calibrated for target_epsilon="
                f"{cfg.target_epsilon:g} over {cfg.planned_steps} steps ({cfg.epochs} epochs), all taken; "
                "another step would exceed it. Plan more epochs (a new calibration) to train longer."
            )
        params = self._trainable()
        check_optimizer(self.optimizer, params)
        self.optimizer.zero_grad(set_to_none=True)
        self.clipping.bind(list(params), cfg.expected_batch_size)
        self.last_norms = []
        self._batch = LogicalBatch(params, self.clipping, expected_batch_size=cfg.expected_batch_size,
                                   noise_multiplier=cfg.noise_multiplier, generator=self.noise_generator, world=self._world)

    def _end(self) -> None:
        batch = self._batch
        assert batch is not None
        try:
            batch.finish()
            if not self._external_step:
                self._stepping = True
                try:
                    self.optimizer.step()
                finally:
                    self._stepping = False
        except BaseException:
            batch.discard()
            raise
        finally:
            self._batch = None
            self._record()

    def _abandon(self) -> None:
        """A logical batch that cannot finish: no step, nothing un-noised left in ``p.grad``.
        It was sampled, so it is accounted (conservatively)."""
        if self._batch is not None:
            self._batch.discard()
            self._batch = None
            self._record()

    def _record(self) -> None:
        self._steps += 1
        sigma, q = self.config.noise_multiplier, self.config.sample_rate
        if self._history and self._history[-1][0] == sigma and self._history[-1][1] == q:
            self._history[-1][2] += 1
        else:
            self._history.append([sigma, q, 1])

    def _guard_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if not self._stepping:
            raise DPUsageError(
                "optimizer.step() was called by hand inside dp.batches(): DPSGD steps the optimizer itself "
                "after each logical batch's noise (a step on the un-noised partial sum would release it); remove the call"
            )

    # -- checkpoints ----------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Steps, accountant history, generators' states and the clipping style's state:
        plain numbers, lists and tensors (``torch.load(weights_only=True)`` loads it).
        Save the model's and optimizer's state dicts alongside."""
        if self._batch is not None:
            raise DPUsageError("DPSGD.state_dict(): inside a logical batch; save between logical batches")
        return {
            "format": "gradhooks.privacy.DPSGD/1",
            "steps": self._steps,
            "history": [list(h) for h in self._history],
            "accountant": self.config.accountant,
            "dataset_size": self.config.dataset_size,
            "sample_rate": self.config.sample_rate,
            "noise_multiplier": self.config.noise_multiplier,
            "sampler": self.sampler.state_dict(),
            "noise_generator": self.noise_generator.get_state(),
            "clipping": self.clipping.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume a run saved by :meth:`state_dict` (same dataset, rate and noise multiplier)."""
        if self._batch is not None:
            raise DPUsageError("DPSGD.load_state_dict(): inside a logical batch")
        if state.get("format") != "gradhooks.privacy.DPSGD/1":
            raise InvalidArgumentError("DPSGD.load_state_dict: not a DPSGD state dict")
        cfg = self.config
        for key, mine in (("dataset_size", cfg.dataset_size), ("sample_rate", cfg.sample_rate),
                          ("noise_multiplier", cfg.noise_multiplier), ("accountant", cfg.accountant)):
            if state[key] != mine:
                raise InvalidArgumentError(f"DPSGD.load_state_dict: saved with {key}={state[key]!r}, this DPSGD has {mine!r}")
        self.sampler.load_state_dict(state["sampler"])
        self.noise_generator.set_state(state["noise_generator"])
        self.clipping.load_state_dict(state["clipping"])
        self._history = [[float(s), float(q), int(k)] for s, q, k in state["history"]]
        self._steps = int(state["steps"])
        if self._world is not None:
            broadcast_state(self.sampler.generator, self._world)
