"""Where a parameter meets the batch, per op family: what each records.

Importing this package registers the handlers with the tracer
(:data:`gradhooks.trace.tracer.HANDLERS`).
"""

from . import conv, elementwise, embedding, linear, normalization, recurrent  # noqa: F401
