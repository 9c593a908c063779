"""Privacy accounting through Opacus' accountants (the optional ``privacy`` extra).

Nothing here re-derives the analysis: :class:`Accountant` keeps Opacus' own
history format ``[(noise_multiplier, sample_rate, steps)]`` and asks Opacus for
epsilon; :func:`noise_multiplier_for` is Opacus' search.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from ..errors import InvalidArgumentError
from .mechanism import positive

if TYPE_CHECKING:
    from opacus.accountants import IAccountant

__all__ = ["Accountant", "Mechanism", "epsilon", "noise_multiplier_for"]

Mechanism = Literal["rdp", "prv"]


def _opacus_accountant(mechanism: str) -> IAccountant:
    if mechanism not in ("rdp", "prv"):
        raise InvalidArgumentError(f"mechanism must be 'rdp' or 'prv', got {mechanism!r}")
    try:
        from opacus.accountants import create_accountant
    except ImportError as err:
        raise ImportError(
            "privacy accounting uses Opacus' accountants, which are not installed: "
            "pip install 'gradhooks[privacy]' (or pip install opacus)"
        ) from err
    return create_accountant(mechanism)


def _rate(fn: str, sample_rate: Any) -> float:
    ok = isinstance(sample_rate, (int, float)) and not isinstance(sample_rate, bool)
    if not ok or not 0 < sample_rate <= 1:
        raise InvalidArgumentError(f"{fn}: sample_rate must be in (0, 1], got {sample_rate!r}")
    return float(sample_rate)


def _delta(delta: Any) -> float:
    ok = isinstance(delta, (int, float)) and not isinstance(delta, bool)
    if not ok or not 0 < delta < 1:
        raise InvalidArgumentError(f"epsilon: delta must be in (0, 1) (typically << 1/dataset_size), got {delta!r}")
    return float(delta)


class Accountant:
    """Privacy spent by DP-SGD steps, computed by Opacus (``"rdp"``:
    ``RDPAccountant``, Renyi DP of the subsampled Gaussian, Mironov et al. 2019;
    ``"prv"``: ``PRVAccountant``, numerical composition, Gopi et al. 2021, tighter).

    Call :meth:`step` once per optimizer step with the noise multiplier and
    the Poisson sampling rate ``q``. :class:`~gradhooks.privacy.DPSGD` does it for
    you, once per logical batch, and cannot forget. Needs the ``privacy`` extra.
    """

    def __init__(self, mechanism: Mechanism = "rdp") -> None:
        self.mechanism = mechanism
        self._acc = _opacus_accountant(mechanism)

    def step(self, *, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Record ``steps`` DP-SGD steps with this ``noise_multiplier`` and rate ``q``."""
        positive("Accountant.step", "noise_multiplier", noise_multiplier)
        sample_rate = _rate("Accountant.step", sample_rate)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise InvalidArgumentError(f"Accountant.step: steps must be a positive int, got {steps!r}")
        hist = self._acc.history  # Opacus' format: [(noise_multiplier, sample_rate, steps)]
        if hist and hist[-1][0] == noise_multiplier and hist[-1][1] == sample_rate:
            hist[-1] = (hist[-1][0], hist[-1][1], hist[-1][2] + steps)
        else:
            hist.append((float(noise_multiplier), sample_rate, steps))

    @property
    def steps(self) -> int:
        """The number of steps recorded so far."""
        return sum(s for _, _, s in self._acc.history)

    def epsilon(self, delta: float) -> float:
        """The epsilon of (epsilon, delta)-DP after the recorded steps (0 before any)."""
        delta = _delta(delta)
        if not self._acc.history:
            return 0.0
        return float(self._acc.get_epsilon(delta=delta))

    def state_dict(self) -> dict[str, Any]:
        """``{"mechanism", "history"}``, plain lists and numbers (``torch.load(weights_only=True)``)."""
        return {"mechanism": self.mechanism, "history": [[float(s), float(q), int(k)] for s, q, k in self._acc.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the history with a saved one (same mechanism)."""
        if state.get("mechanism") != self.mechanism:
            raise InvalidArgumentError(f"Accountant.load_state_dict: saved with mechanism {state.get('mechanism')!r}, this one is {self.mechanism!r}")
        history = []
        for entry in state["history"]:
            sigma, q, k = entry
            positive("Accountant.load_state_dict", "noise_multiplier", sigma)
            history.append((float(sigma), _rate("Accountant.load_state_dict", q), int(k)))
        self._acc.history = history


def epsilon(
    *, noise_multiplier: float, sample_rate: float, steps: int, delta: float, mechanism: Mechanism = "rdp"
) -> float:
    """Epsilon after ``steps`` DP-SGD steps at one noise multiplier and rate ``q``."""
    acc = Accountant(mechanism)
    acc.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
    return acc.epsilon(delta)


def noise_multiplier_for(
    *, target_epsilon: float, delta: float, sample_rate: float, steps: int, mechanism: Mechanism = "rdp"
) -> float:
    """The smallest noise multiplier (to Opacus' search tolerance, 0.01 in epsilon)
    whose epsilon after ``steps`` steps at rate ``q`` is at most ``target_epsilon``."""
    _opacus_accountant(mechanism)  # the extra's ImportError, argument check
    positive("noise_multiplier_for", "target_epsilon", target_epsilon)
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
            steps=steps, accountant=mechanism,
        )
    )
