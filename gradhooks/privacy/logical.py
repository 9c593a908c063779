"""One logical batch of DP-SGD: physical micro-batches added one by one, then one
noise draw, one all-reduce under DDP, one update of the clipping style.

After :meth:`LogicalBatch.finish` every trainable ``p.grad`` is

    (sum over all micro-batches and processes of sum_n c_{n,k} g_{n,k}  +  z) / L,
    z ~ N(0, (sigma' S)^2 I),

with ``L`` the expected batch size, ``S`` the style's sensitivity and ``sigma'``
its gradient noise multiplier. Micro-batches are summed locally (no
collective per micro-batch, so processes may have different numbers of them,
or none); the noise is drawn on rank 0 only, before the one all-reduce.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..clip import add_gaussian_
from ..distributed import World
from ..errors import NonFiniteNormError
from ..result import PerSampleGrads
from .clipping import Clipping
from .errors import DPUsageError, UncoveredParameterError
from .mechanism import check_covers_all, check_dense

__all__ = ["LogicalBatch"]


class LogicalBatch:
    """Accumulates the clipped sums of one logical batch into ``p.grad`` (see module doc).

    ``params``: the trainable parameters (``{name: p}``), which every micro-batch's
    result must cover exactly; their ``p.grad`` is cleared on construction.
    """

    def __init__(self, params: dict[str, nn.Parameter], clipping: Clipping, *, expected_batch_size: float,
                 noise_multiplier: float, generator: torch.Generator | None, world: World | None) -> None:
        self.params = params
        self.clipping = clipping
        self.divisor = float(expected_batch_size)
        self.noise_multiplier = float(noise_multiplier)
        self.generator = generator
        self.world = world
        self.statistic = 0.0
        self.bad = 0
        self.samples = 0
        for p in params.values():
            p.grad = None
        self._left: dict[str, tuple[int, int] | None] = dict.fromkeys(params)

    def check_untouched(self, where: str) -> None:
        """``DPUsageError`` if ``p.grad`` changed since the last micro-batch was added
        (``optimizer.zero_grad()`` or a backward outside the step between micro-batches)."""
        for name, p in self.params.items():
            now = None if p.grad is None else (id(p.grad), p.grad._version)
            if now != self._left[name]:
                raise DPUsageError(
                    f"{where}: p.grad of {name!r} changed between two micro-batches of one logical batch "
                    "(optimizer.zero_grad(), or a backward outside `with dp.step()`): that would drop or add "
                    "to the clipped sum. DPSGD clears and steps the gradients itself; remove the call."
                )

    def add(self, g: PerSampleGrads) -> Tensor:
        """Add one micro-batch's clipped sum to ``p.grad``. Returns its norms, ``(N,)``."""
        check_covers_all("DPSGD", g)
        if list(g.params) != list(self.params):
            missing = [k for k in self.params if k not in g.params]
            raise UncoveredParameterError(
                f"DPSGD: the step's per_sample_grads result covers {list(g.params)[:4]}..., not the trainable "
                f"parameters {missing or list(self.params)[:4]}: were parameters frozen or unfrozen inside the step?"
            )
        norms = g.norms()
        bad = int((~torch.isfinite(norms)).sum())
        if bad:
            if self.world is None:
                raise NonFiniteNormError(
                    f"DPSGD: the per-sample gradient norm is not finite for sample(s) "
                    f"{(~torch.isfinite(norms)).nonzero().flatten().tolist()} of this micro-batch; the logical "
                    "batch is discarded (no optimizer step). Check those samples' inputs and the loss."
                )
            self.bad += bad  # raised on every rank together, after the all-reduce
            return norms
        for names, factors in self.clipping.factors(g, norms):
            g._add_weighted_(factors / self.divisor, names)
        self.statistic += self.clipping.statistic(g, norms)
        self.samples += g.batch_size
        self._left = {k: None if p.grad is None else (id(p.grad), p.grad._version) for k, p in self.params.items()}
        return norms

    def finish(self) -> None:
        """Noise once (rank 0), all-reduce once (DDP), update the clipping style."""
        check_dense("DPSGD", self.params.values())
        rank0 = self.world is None or self.world.rank == 0
        with torch.no_grad():
            for p in self.params.values():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            sigma = self.clipping.gradient_noise_multiplier(self.noise_multiplier)
            std = sigma * self.clipping.sensitivity() / self.divisor
            if std > 0 and rank0:
                add_gaussian_(list(self.params.values()), std, self.generator)
            statistic = self.statistic
            count_std = self.clipping.statistic_noise_std
            if count_std > 0 and rank0:
                dev = self.generator.device if self.generator is not None else "cpu"
                z = torch.randn((), generator=self.generator, device=dev, dtype=torch.float64)
                statistic += float(z) * count_std
            status = torch.tensor([float(self.bad), statistic], dtype=torch.float64)
            if self.world is not None:
                grads = [p.grad for p in self.params.values() if p.grad is not None]  # all set above
                self.world.sum_([*grads, status])
        if status[0] > 0:
            for p in self.params.values():
                p.grad = None
            raise NonFiniteNormError(
                "DPSGD: a per-sample gradient norm was not finite on some rank (see the ranks' inputs); "
                "the logical batch is discarded (no optimizer step)"
            )
        if count_std > 0:
            self.clipping.update(float(status[1]))

    def discard(self) -> None:
        """Drop the partial sums: ``p.grad := None`` (nothing un-noised may be stepped on)."""
        for p in self.params.values():
            p.grad = None
