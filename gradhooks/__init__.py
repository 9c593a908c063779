"""gradhooks: exact per-sample gradients for PyTorch models, unchanged.

::

    with per_sample_grads(model) as g:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
    g["fc1.weight"]        # (N, out, in)
    g.norms()              # (N,)
    g.clip_(max_norm=1.0)  # p.grad := mean of the clipped per-sample grads

How data flows (each step in the file its name promises):

1. ``context.py`` enters: ``plan.py`` decides what is covered, ``hooks.py`` marks
   the model's input as the batch, the tracer (``trace/tracer.py``) turns on;
2. for every op the tracer follows which dimension holds the batch
   (``trace/layout.py``, ``trace/optable.py``); where a parameter meets the batch,
   a handler (``uses/*.py``) records a call (``capture.py``) and hooks its output;
3. backward delivers each call's output gradient to that hook;
4. at exit ``finish.py`` puts every batch first, runs ``selfcheck.py`` and builds
   the result (``result.py``), whose queries go through ``accounts.py`` and
   ``sites.py`` to the rules (``rules/*.py``); ``clip.py`` writes ``p.grad``.
"""

from . import diagnostics, privacy
from . import rules as _rules  # noqa: F401  (registers the built-in rules' module types)
from . import uses as _uses  # noqa: F401  (registers the tracer's handlers)
from .capture import Call
from .check import check_attribution, check_rule
from .context import per_sample_grads
from .errors import (
    BatchLayoutError,
    BatchSizeError,
    CheckError,
    ContextStateError,
    GradhooksError,
    LossReductionWarning,
    NonFiniteNormError,
    RuleError,
    UnseenGradientError,
    UnsupportedModuleError,
)
from .plan import FallbackWarning
from .registry import register_rule, rule_for, unregister_rule
from .result import PerSampleGrads
from .rule import Rule

__version__ = "0.2.0.dev0"

__all__ = [
    "BatchLayoutError",
    "BatchSizeError",
    "Call",
    "CheckError",
    "ContextStateError",
    "FallbackWarning",
    "GradhooksError",
    "LossReductionWarning",
    "NonFiniteNormError",
    "PerSampleGrads",
    "Rule",
    "RuleError",
    "UnseenGradientError",
    "UnsupportedModuleError",
    "__version__",
    "check_attribution",
    "check_rule",
    "diagnostics",
    "per_sample_grads",
    "privacy",
    "register_rule",
    "rule_for",
    "unregister_rule",
]
