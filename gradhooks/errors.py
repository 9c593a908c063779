"""The exceptions gradhooks raises.

Every one derives from :class:`GradhooksError` (catch that to catch all of
ours) and from the built-in type the README's error table names for the
situation, so ``except ValueError`` keeps working too.
"""

from __future__ import annotations

__all__ = [
    "GradhooksError",
    "UnsupportedModuleError",
    "BatchSizeError",
    "BatchLayoutError",
    "UnseenGradientError",
    "NonFiniteNormError",
    "ContextStateError",
]


class GradhooksError(Exception):
    """Base class of every exception raised by gradhooks."""


class UnsupportedModuleError(GradhooksError, TypeError):
    """A module owns trainable parameters but has no per-sample rule, or its
    configuration couples the samples of a batch (BatchNorm in training mode)."""


class BatchSizeError(GradhooksError, ValueError):
    """Hooked modules saw inputs whose batch dimension differs from the model's."""


class BatchLayoutError(BatchSizeError):
    """A parameter met a tensor whose rows cannot be attributed to the samples of the
    batch exactly (the batch was reduced, sliced or mixed before the use)."""


class UnseenGradientError(GradhooksError, RuntimeError):
    """``backward()`` added gradient to a covered parameter that its hooked
    module did not see (functional use, a weight penalty, ...)."""


class NonFiniteNormError(GradhooksError, FloatingPointError):
    """A per-sample gradient norm is inf or nan, so clipping is undefined."""


class ContextStateError(GradhooksError, RuntimeError):
    """The result object was used when it holds no valid result."""
