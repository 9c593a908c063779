"""``nn.MultiheadAttention``: a rule that needs no math of its own.

Its forward, ``F.multi_head_attention_forward``, uses every parameter through
ops the tracer has rules for: ``F.linear`` with ``in_proj_weight`` (or with its
chunks, or ``q/k/v_proj_weight``), the bias concatenation, and ``F.linear`` with
``out_proj.weight`` (a child module whose own forward never runs). The tracer
runs that function with its ops visible (see ``trace/tracer.py``), so each use
is captured at rule speed, batch_first or not, with masks and ``kdim/vdim``.
The registration makes ``rule_for`` (and ``fallback=True``) treat the module as
covered.
"""

from __future__ import annotations

from torch import nn

from ..registry import register_rule
from ..rule import Rule

__all__ = ["AttentionRule"]


@register_rule(nn.MultiheadAttention)
class AttentionRule(Rule):
    """Captured per op: the projections inside its forward."""

    by_ops = True
    subclass_forward_ok = False
