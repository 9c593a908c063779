"""The exit check of a user's module-level rule (``register_rule``): its attribution.

The batch-sum check (:mod:`gradhooks.selfcheck`) cannot see a rule that gives
sample n another sample's rows (a reshape-order bug): the sum over samples is
still right. A weighted sum is not: for random weights ``w``, the rule's
``sum_n w_n g_n`` must equal the gradient of ``sum_n w_n <G_n, f(X)_n>``, one
autograd replay of the module's own forward on the captured inputs with the
output gradient weighted per sample. Cost: one forward and backward of each
user-ruled module per step (built-in rules are tested, the fallback is such a
replay already). A module whose replay is not deterministic (dropout in
training mode) cannot be checked this way and is left to
:func:`gradhooks.check_rule`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from .capture import Call
from .errors import RuleError
from .rule import accumulation_dtype
from .sites import Site

__all__ = ["verify_user_rules", "deferred"]

#: Set while an on-demand check (gradhooks.check_rule / check_attribution) runs a
#: context: it compares per-sample results in more detail and reports them itself.
_DEFERRED: ContextVar[bool] = ContextVar("gradhooks_rule_replay_deferred", default=False)


@contextmanager
def deferred() -> Iterator[None]:
    """Skip this check in contexts opened inside the block."""
    token = _DEFERRED.set(True)
    try:
        yield
    finally:
        _DEFERRED.reset(token)


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-7 if dtype == torch.float64 else 1e-2


def _replay(site: Site, calls: Sequence[Call], w: Tensor) -> dict[str, Tensor]:
    """``{name: grad of sum_calls sum_n w_n <G_n, f(X)_n>}`` by autograd, float32+."""
    module = site.module
    params = {name: module.get_parameter(name) for name in site.names}
    total = {name: torch.zeros(p.shape, dtype=accumulation_dtype(p.dtype), device=p.device) for name, p in params.items()}
    for call in calls:
        with torch.enable_grad():
            out = module.forward(*call.args, **call.kwargs)
            leaves = [o for o in pytree.tree_leaves(out)]
            outs, cots = [], []
            for i, o in enumerate(leaves):
                g = call.grads[i] if i < len(call.grads) else None
                if not isinstance(o, Tensor) or g is None or not o.requires_grad:
                    continue
                weighted = g * w.to(g.dtype).view(-1, *[1] * (g.dim() - 1))
                if o.shape != weighted.shape:  # an output broadcast over the batch: (1, ...)
                    weighted = weighted.sum(0, keepdim=True).expand(o.shape) if o.shape[:1] == (1,) else weighted.reshape(o.shape)
                outs.append(o)
                cots.append(weighted.to(o.dtype))
            if not outs:
                continue
            grads = torch.autograd.grad(outs, list(params.values()), cots, allow_unused=True)
        for (name, _), g in zip(params.items(), grads, strict=True):
            if g is not None:
                total[name].add_(g.to(total[name].dtype))
    return total


def _off(a: dict[str, Tensor], b: dict[str, Tensor]) -> dict[str, float]:
    """Relative difference per name."""
    out = {}
    for name in a:
        scale = max(a[name].norm().item(), b[name].norm().item(), 1e-30)
        out[name] = (a[name] - b[name]).norm().item() / scale
    return out


def verify_user_rules(sites: Sequence[Site]) -> None:
    """Raise :class:`RuleError` when a user rule's per-sample attribution is wrong."""
    if _DEFERRED.get():
        return
    for site in sites:
        if not site.module_level or site.fallback:
            continue
        calls = site.live_calls()
        if not calls:
            continue
        n = calls[0].grad.shape[0]
        dtype = accumulation_dtype(site.module.get_parameter(site.names[0]).dtype)
        w = torch.randn(n, generator=torch.Generator().manual_seed(n + 7), dtype=dtype).to(calls[0].grad.device)
        with torch.no_grad():
            ours = site.run("weighted_sum", calls, site.names, w)
        replayed = _replay(site, calls, w)
        off = {k: v for k, v in _off(ours, replayed).items() if v > _tolerance(dtype)}
        if not off:
            continue
        if max(_off(replayed, _replay(site, calls, w)).values(), default=0.0) > _tolerance(dtype):
            continue  # not deterministic (dropout): cannot tell
        worst = ", ".join(f"{name!r} off by {v:.0%}" for name, v in off.items())
        raise RuleError(
            f"{site.label}: the rule {type(site.rule).__name__} attributes gradients to the wrong samples: "
            f"its per-sample gradients weighted by random sample weights differ from autograd's replay of the "
            f"module ({worst}), although their batch sum may be right (e.g. a reshape in the wrong order). "
            "Test the rule with gradhooks.check_rule(rule, module, inputs)."
        )
