"""The exceptions of the DP toolkit: each a :class:`~gradhooks.GradhooksError` and the
built-in type its situation calls for."""

from __future__ import annotations

from ..errors import GradhooksError

__all__ = ["UncoveredParameterError", "DPUsageError", "PrivacyBudgetError"]


class UncoveredParameterError(GradhooksError, ValueError):
    """A parameter the optimizer will update is not clipped and noised (``strict=False``
    left it out, or the optimizer holds a parameter the model does not)."""


class DPUsageError(GradhooksError, RuntimeError):
    """The DP-SGD loop was used in a way that would make the reported epsilon wrong
    (a batch not stepped, ``optimizer.step()`` by hand, noise drawn twice for one batch)."""


class PrivacyBudgetError(GradhooksError, RuntimeError):
    """More steps than the target epsilon was calibrated for."""
