"""gradhooks: per-sample gradients for PyTorch models, through hooks.

::

    with per_sample_grads(model) as g:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
    g["fc1.weight"]        # (N, out, in)
    g.norms()              # (N,)
    g.clip_(max_norm=1.0)  # p.grad := mean of the clipped per-sample grads
"""

from . import diagnostics, privacy
from . import rules as _rules  # noqa: F401  (registers the built-in rules)
from .capture import Call
from .context import FallbackWarning, per_sample_grads
from .errors import GradhooksError, UnsupportedModuleError
from .registry import register_rule, rule_for, unregister_rule
from .result import PerSampleGrads
from .rule import Rule

__version__ = "0.1.0"

__all__ = [
    "Call",
    "FallbackWarning",
    "GradhooksError",
    "PerSampleGrads",
    "Rule",
    "UnsupportedModuleError",
    "__version__",
    "diagnostics",
    "per_sample_grads",
    "privacy",
    "register_rule",
    "rule_for",
    "unregister_rule",
]
