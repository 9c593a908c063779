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
    "CheckError",
    "RuleError",
    "LossReductionWarning",
    "InvalidArgumentError",
    "ArgumentTypeError",
    "UnknownNameError",
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


class CheckError(GradhooksError, RuntimeError):
    """An on-demand check (:func:`gradhooks.check_rule`, :func:`gradhooks.check_attribution`)
    found a result that differs from the naive per-sample loop."""


class RuleError(GradhooksError, RuntimeError):
    """A rule failed on a module's recorded calls; the message names the module,
    its type, the rule, and what to do."""


class LossReductionWarning(UserWarning):
    """The loss passed to ``backward()`` is reduced over the batch in the other way
    than ``loss_reduction`` says (a sum with ``"mean"``, or a mean with ``"sum"``):
    every per-sample result is N times off (``g[name].mean(0)`` still equals what
    backward added, which is why this is a warning and not an error)."""


class InvalidArgumentError(GradhooksError, ValueError):
    """An argument has a valid type but a value the call cannot accept."""


class ArgumentTypeError(GradhooksError, TypeError):
    """An argument has the wrong type."""


class UnknownNameError(GradhooksError, KeyError):
    """A parameter name (or rule key) that the result or registry does not hold."""

    def __str__(self) -> str:  # KeyError's str() would repr the message
        return str(self.args[0]) if self.args else ""
