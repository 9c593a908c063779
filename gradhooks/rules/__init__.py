"""Built-in per-sample rules, one file per family of parameter use.

Importing this package registers the module types they cover (for the entry
checks and :func:`gradhooks.rule_for`); the tracer applies them per op.
``fallback`` holds the ``torch.func`` fallback, used only with ``fallback=True``.
"""

from . import attention, conv, dense, embedding, linear, normalization, recurrent  # noqa: F401
