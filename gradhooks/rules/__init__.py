"""Built-in per-sample rules, one file per layer family.

Importing this package registers them; each file registers its own module
types with :func:`gradhooks.register_rule`. ``vmap`` holds the ``torch.func``
fallback, used only with ``fallback=True`` and never registered by type.
"""

from . import conv, embedding, linear, norms  # noqa: F401
