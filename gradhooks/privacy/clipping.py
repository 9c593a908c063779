"""Clipping styles: how each sample's gradient is bounded before the noisy sum.

A style turns one micro-batch's per-sample norms into factors ``c_{n,k}`` for
groups ``k`` of parameters (the clipped sum is ``sum_n c_{n,k} g_{n,k}``, written
without per-sample tensors), and states its *sensitivity*: the largest L2 norm
one sample's clipped contribution can have, which the noise std is
``noise_multiplier`` times. All work from ``g.norms()`` / ``g.param_norms()``,
so they are exact with ``materialize=False`` and ``one_backward=True``.

- :class:`FlatClipping`: ``c_n = min(1, C / (||g_n|| + 1e-6))`` (Abadi et al. 2016).
- :class:`PerGroupClipping`: per layer or any grouping, a threshold per group;
  sensitivity ``sqrt(sum_k C_k^2)`` (as Opacus' per-layer clipping).
- :class:`AutomaticClipping`: ``c_n = C / (||g_n|| + gamma)`` (Bu et al. 2023,
  "Automatic Clipping"), no threshold to tune; sensitivity ``C``.
- :class:`AdaptiveClipping`: the threshold follows a private quantile of the
  norms (Andrew et al. 2021, "Differentially Private Learning with Adaptive
  Clipping").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..clip import clip_factors
from ..errors import ContextStateError, InvalidArgumentError
from ..result import PerSampleGrads
from .mechanism import positive

__all__ = ["Clipping", "FlatClipping", "PerGroupClipping", "AutomaticClipping", "AdaptiveClipping"]

Groups = list[tuple[list[str], Tensor]]


class Clipping:
    """Base class of the clipping styles (see the module docstring)."""

    def bind(self, names: Sequence[str], expected_batch_size: float) -> None:
        """Called with the covered parameter names before a logical batch."""

    def factors(self, g: PerSampleGrads, norms: Tensor) -> Groups:
        """``[(names, c)]``: factors ``c`` (``(N,)``) for each group of parameter names."""
        raise NotImplementedError

    def sensitivity(self) -> float:
        """The largest L2 norm of one sample's clipped contribution."""
        raise NotImplementedError

    def gradient_noise_multiplier(self, noise_multiplier: float) -> float:
        """The noise multiplier of the gradient noise when the step's is ``noise_multiplier``."""
        return noise_multiplier

    def statistic(self, g: PerSampleGrads, norms: Tensor) -> float:
        """A private per-batch statistic's local sum (adaptive clipping's count); 0 if none."""
        return 0.0

    @property
    def statistic_noise_std(self) -> float:
        """Std of the Gaussian noise added to the statistic's sum (0: no statistic)."""
        return 0.0

    def update(self, noisy_statistic: float) -> None:
        """End of a logical batch, with the noised statistic."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""


class FlatClipping(Clipping):
    """Each sample's whole gradient to ``max_norm``: ``c_n = min(1, C / (||g_n|| + 1e-6))``."""

    def __init__(self, max_norm: float) -> None:
        self.max_norm = positive("FlatClipping", "max_norm", max_norm, hint=" (the per-sample clipping norm C)")

    def factors(self, g: PerSampleGrads, norms: Tensor) -> Groups:
        return [(list(g.params), clip_factors(norms, self.max_norm))]

    def sensitivity(self) -> float:
        return self.max_norm

    def __repr__(self) -> str:
        return f"FlatClipping(max_norm={self.max_norm:g})"


class PerGroupClipping(Clipping):
    """Clip each group of parameters separately, group ``k`` to its own ``C_k``.

    ``groups``: ``"parameter"`` (every parameter tensor its own group, Opacus'
    "per-layer" clipping), ``"module"`` (parameters grouped by the module that owns
    them: ``"0.weight"`` and ``"0.bias"`` form group ``"0"``), or an explicit
    ``{group: [parameter names]}`` that must name every trainable parameter once.
    ``max_norm``: one threshold for every group, or ``{group: C_k}`` for each.
    The noise std is ``noise_multiplier * sqrt(sum_k C_k^2)``.
    """

    def __init__(self, max_norm: float | Mapping[str, float], *, groups: str | Mapping[str, Sequence[str]] = "module") -> None:
        if isinstance(groups, str) and groups not in ("parameter", "module"):
            raise InvalidArgumentError(f"PerGroupClipping: groups must be 'parameter', 'module' or a mapping, got {groups!r}")
        if isinstance(max_norm, Mapping):
            self._norms: dict[str, float] | float = {str(k): positive("PerGroupClipping", f"max_norm[{k!r}]", v) for k, v in max_norm.items()}
        else:
            self._norms = positive("PerGroupClipping", "max_norm", max_norm)
        self._spec = groups if isinstance(groups, str) else {str(k): list(v) for k, v in groups.items()}
        self.groups: dict[str, list[str]] = {}
        self.max_norms: dict[str, float] = {}

    def bind(self, names: Sequence[str], expected_batch_size: float) -> None:
        if self._spec == "parameter":
            groups = {n: [n] for n in names}
        elif self._spec == "module":
            groups = {}
            for n in names:
                groups.setdefault(n.rpartition(".")[0], []).append(n)
        else:
            groups = self._explicit(names)
        if isinstance(self._norms, dict):
            if set(self._norms) != set(groups):
                raise InvalidArgumentError(
                    f"PerGroupClipping: max_norm names groups {sorted(self._norms)} but the groups are {sorted(groups)}"
                )
            norms = dict(self._norms)
        else:
            norms = {k: float(self._norms) for k in groups}
        self.groups, self.max_norms = groups, norms

    def _explicit(self, names: Sequence[str]) -> dict[str, list[str]]:
        assert isinstance(self._spec, dict)
        seen: dict[str, str] = {}
        for group, members in self._spec.items():
            for n in members:
                if n in seen:
                    raise InvalidArgumentError(f"PerGroupClipping: {n!r} is in groups {seen[n]!r} and {group!r}")
                seen[n] = group
        unknown = sorted(set(seen) - set(names))
        missing = [n for n in names if n not in seen]
        if unknown or missing:
            raise InvalidArgumentError(
                "PerGroupClipping: the groups must name every trainable parameter exactly once"
                + (f"; not trainable parameters: {unknown}" if unknown else "")
                + (f"; in no group (they would not be clipped): {missing}" if missing else "")
            )
        return {k: list(v) for k, v in self._spec.items() if v}

    def factors(self, g: PerSampleGrads, norms: Tensor) -> Groups:
        if not self.groups:
            raise ContextStateError("PerGroupClipping: bind() was not called (DPSGD calls it before each logical batch)")
        sq = {k: v.square() for k, v in g.param_norms().items()}
        out: Groups = []
        for group, members in self.groups.items():
            norm = torch.stack([sq[n] for n in members]).sum(0).sqrt()
            out.append((members, clip_factors(norm, self.max_norms[group])))
        return out

    def sensitivity(self) -> float:
        return math.sqrt(sum(c * c for c in self.max_norms.values()))

    def __repr__(self) -> str:
        return f"PerGroupClipping(max_norm={self._norms!r}, groups={self._spec!r})"


class AutomaticClipping(Clipping):
    """Automatic (normalized) clipping, Bu et al. 2023: ``c_n = C / (||g_n|| + gamma)``.

    Every sample contributes a vector of norm ``C ||g_n|| / (||g_n|| + gamma) < C``;
    with the default ``C = 1`` there is no threshold to tune (the learning rate
    absorbs the scale). ``gamma``: the stability constant (the paper uses 0.01).
    """

    def __init__(self, *, gamma: float = 0.01, max_norm: float = 1.0) -> None:
        self.gamma = positive("AutomaticClipping", "gamma", gamma)
        self.max_norm = positive("AutomaticClipping", "max_norm", max_norm)

    def factors(self, g: PerSampleGrads, norms: Tensor) -> Groups:
        return [(list(g.params), self.max_norm / (norms + self.gamma))]

    def sensitivity(self) -> float:
        return self.max_norm

    def __repr__(self) -> str:
        return f"AutomaticClipping(gamma={self.gamma:g}, max_norm={self.max_norm:g})"


class AdaptiveClipping(Clipping):
    """Flat clipping whose threshold tracks a private quantile of the norms
    (Andrew et al. 2021, geometric update).

    Each logical batch counts the samples with ``||g_n|| <= C`` as the centred sum
    ``s = sum_n (1[||g_n|| <= C] - 1/2)``, whose sensitivity is 1/2, adds
    ``N(0, count_noise_std^2)``, and estimates the unclipped fraction as
    ``b = s_noisy / L + 1/2`` with ``L`` the *expected* batch size (a constant,
    so an empty batch is fine: ``s = 0``). Then
    ``C <- C * exp(-learning_rate * (b - target_quantile))``. The two releases
    together are a Gaussian mechanism with the step's noise multiplier ``sigma``
    when the gradient noise uses ``(sigma^-2 - (2 count_noise_std)^-2)^-1/2``
    (the paper's Theorem 1), so the accountant is stepped with ``sigma``; that
    needs ``count_noise_std > sigma / 2``. Default ``count_noise_std = L / 20``
    (the paper's suggestion).
    """

    def __init__(self, initial_max_norm: float, *, target_quantile: float = 0.5, learning_rate: float = 0.2,
                 count_noise_std: float | None = None) -> None:
        self.max_norm = positive("AdaptiveClipping", "initial_max_norm", initial_max_norm)
        if not (isinstance(target_quantile, (int, float)) and 0 < target_quantile < 1):
            raise InvalidArgumentError(f"AdaptiveClipping: target_quantile must be in (0, 1), got {target_quantile!r}")
        self.target_quantile = float(target_quantile)
        self.learning_rate = positive("AdaptiveClipping", "learning_rate", learning_rate)
        self._count_std = None if count_noise_std is None else positive("AdaptiveClipping", "count_noise_std", count_noise_std)
        self._expected: float | None = None

    def bind(self, names: Sequence[str], expected_batch_size: float) -> None:
        self._expected = float(expected_batch_size)

    @property
    def statistic_noise_std(self) -> float:
        if self._count_std is not None:
            return self._count_std
        if self._expected is None:
            raise ContextStateError("AdaptiveClipping: bind() was not called (DPSGD calls it before each logical batch)")
        return self._expected / 20.0

    def gradient_noise_multiplier(self, noise_multiplier: float) -> float:
        if noise_multiplier == 0:
            return 0.0
        sb = self.statistic_noise_std
        if not 2 * sb > noise_multiplier:
            raise InvalidArgumentError(
                f"AdaptiveClipping: count_noise_std ({sb:g}) must exceed noise_multiplier / 2 ({noise_multiplier / 2:g}) "
                "for the count's noise to fit in the step's privacy budget; pass a larger count_noise_std"
            )
        return (noise_multiplier ** -2 - (2 * sb) ** -2) ** -0.5

    def factors(self, g: PerSampleGrads, norms: Tensor) -> Groups:
        return [(list(g.params), clip_factors(norms, self.max_norm))]

    def statistic(self, g: PerSampleGrads, norms: Tensor) -> float:
        return float((norms <= self.max_norm).to(torch.float64).sub(0.5).sum())

    def update(self, noisy_statistic: float) -> None:
        assert self._expected is not None
        unclipped = noisy_statistic / self._expected + 0.5
        self.max_norm *= math.exp(-self.learning_rate * (unclipped - self.target_quantile))

    def sensitivity(self) -> float:
        return self.max_norm

    def state_dict(self) -> dict[str, Any]:
        return {"max_norm": self.max_norm}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.max_norm = positive("AdaptiveClipping.load_state_dict", "max_norm", state["max_norm"])

    def __repr__(self) -> str:
        return f"AdaptiveClipping(max_norm={self.max_norm:g}, target_quantile={self.target_quantile:g})"

