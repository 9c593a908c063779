"""Checks on demand, in the spirit of ``torch.autograd.gradcheck``.

* :func:`check_rule`: a per-sample rule (yours, from ``register_rule``, or a
  built-in one) against the naive loop, on a module and inputs you give, in
  float64: per-sample gradients, squared norms, clipped sums, dot products and
  the exit check's probe. A rule whose batch sum is right but whose rows belong
  to the wrong samples (a reshape-order bug) passes the exit self-check, which
  compares sums; it fails here.
* :func:`check_attribution`: a whole model. For random weights ``w`` the
  gradhooks account ``sum_n w_n g_n`` must equal the gradient of the
  ``w``-weighted loss ``sum_n w_n L_n`` (one more backward through the same
  graph); ``thorough=True`` compares every per-sample gradient with the
  naive loop (one backward per sample).

Both return ``True`` or raise :class:`gradhooks.CheckError` saying which
quantity differs, for which parameter, by how much. Neither changes the user's
model or ``p.grad`` (they work on float64 copies by default).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from . import rule_replay
from .context import per_sample_grads
from .errors import ArgumentTypeError, CheckError, InvalidArgumentError
from .registry import registered_rule, rule_for
from .rule import Rule
from .rulecheck import check_direct, norm, pct, rel, sum_hint

__all__ = ["check_rule", "check_attribution"]

#: Relative tolerance per dtype of the on-demand checks (float64 is the intended use).
RTOL = {torch.float64: 1e-9, torch.float32: 1e-3}
RTOL_LOW = 5e-2  # bf16 / fp16
#: Share of the whole model's scale below which a difference counts as rounding: a
#: gradient that cancels to ~0 (an attention key bias, a bias before a LayerNorm) is
#: the noise of its neighbours' arithmetic, not of its own (measured float32 noise:
#: up to 5e-8 of the model's scale on the bench transformer; tolerance rtol * 1e-2).
FLOOR = 1e-2


def _rtol(dtype: torch.dtype, given: float | None) -> float:
    return given if given is not None else RTOL.get(dtype, RTOL_LOW)


def _as_tuple(inputs: Any) -> tuple[Any, ...]:
    return inputs if isinstance(inputs, tuple) else (inputs,)


def _cast(tree: Any, dtype: torch.dtype | None) -> Any:
    """Floating tensors of ``tree`` in ``dtype`` (``None``: unchanged)."""
    if dtype is None:
        return tree
    return pytree.tree_map(lambda t: t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t, tree)


def _batch_size(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    first = next((t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, Tensor) and t.dim() > 0), None)
    if first is None:
        raise InvalidArgumentError("the inputs hold no tensor with a batch dimension (dimension 0)")
    n = int(first.shape[0])
    if n < 2:
        raise InvalidArgumentError(f"give at least 2 samples (the first input has batch size {n}): with one sample no row can be misattributed")
    return n


def _fail(what: str, problems: list[str], raise_exception: bool) -> bool:
    if not problems:
        return True
    if not raise_exception:
        return False
    raise CheckError(f"{what}:\n  " + "\n  ".join(problems))


# -- check_rule ----------------------------------------------------------------------


def _resolve(rule: Any, module: nn.Module) -> Rule:
    if rule is None:
        found = rule_for(module)
        if found is None:
            raise InvalidArgumentError(f"check_rule: no rule is registered for {type(module).__qualname__}; pass the rule")
        return found
    if isinstance(rule, type) and issubclass(rule, nn.Module):
        found = registered_rule(rule)
        if found is None:
            raise InvalidArgumentError(f"check_rule: no rule is registered for {rule.__qualname__}")
        return found
    if isinstance(rule, type) and issubclass(rule, Rule):
        return rule()
    if isinstance(rule, Rule):
        return rule
    raise ArgumentTypeError(f"check_rule: expected a gradhooks.Rule (class or instance) or a module type, got {rule!r}")


class _Repeat(nn.Module):
    """Calls ``inner`` ``times`` times on the same inputs; returns all the outputs."""

    def __init__(self, inner: nn.Module, times: int) -> None:
        super().__init__()
        self.inner = inner
        self.times = times

    def forward(self, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
        return tuple(self.inner(*args, **kwargs) for _ in range(self.times))


def _cotangent_loss(n: int, gen: torch.Generator) -> Callable[[Any], Tensor]:
    """Per-sample losses ``L_n = sum_leaves <out[n], G[n]>`` for fixed random ``G``
    (drawn on the first call, once per output leaf with batch size ``n``)."""
    drawn: list[Tensor] = []

    def loss(out: Any) -> Tensor:
        leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == n and t.requires_grad]
        if not drawn:
            drawn.extend(torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype) for t in leaves)
        # sum() is int 0 only without leaves, which _attribution refuses as "not a tensor".
        return sum((t * g).reshape(n, -1).sum(1) for t, g in zip(leaves, drawn, strict=True))  # type: ignore[return-value]

    return loss


def check_rule(
    rule: Rule | type[Rule] | type[nn.Module] | None,
    module: nn.Module,
    inputs: Any,
    *,
    kwargs: dict[str, Any] | None = None,
    names: Sequence[str] | None = None,
    calls: int = 2,
    rtol: float = 1e-9,
    seed: int = 0,
    raise_exception: bool = True,
) -> bool:
    """Compare ``rule`` on ``module`` with the naive loop, in float64.

    Args:
        rule: a :class:`gradhooks.Rule` (class or instance), a module type (its
            registered rule), or ``None`` (the rule ``module`` gets).
        module: the module to run (a float64 copy is used; yours is not touched).
        inputs: its positional input, or a tuple of them; dimension 0 of the first
            tensor is the batch (``N >= 2``). ``kwargs``: keyword inputs.
        names: the parameters to check (default: ``module``'s own trainable ones).
        calls: how many times the module is called in one forward (their
            gradients must add up), each output with its own random ``G``.
        rtol: allowed ``||rule - naive|| / ||naive||`` per quantity.

    A module-level rule (what ``register_rule`` registers) is called directly on
    recorded calls: ``per_sample`` (all names, and each alone),
    ``per_sample_into``, ``squared_norms``, ``weighted_sum_into`` with clip
    factors (what ``clip_`` runs), ``dots``, ``probe`` and ``magnitudes``. A
    built-in rule applied per op, or your rule once registered for
    ``type(module)``, is also checked through ``per_sample_grads`` (both
    ``materialize`` modes), as :func:`check_attribution` does.

    Returns ``True``; raises :class:`gradhooks.CheckError` naming each quantity
    that differs and by how much (``raise_exception=False``: returns ``False``).
    """
    if not isinstance(calls, int) or calls < 1:
        raise InvalidArgumentError(f"check_rule: calls must be a positive int, got {calls!r}")
    found = _resolve(rule, module)
    m = copy.deepcopy(module).double()
    args, kw = _cast(_as_tuple(inputs), torch.float64), _cast(dict(kwargs or {}), torch.float64)
    n = _batch_size(args, kw)
    problems: list[str] = []
    label = f"{type(found).__name__} on {type(module).__name__}"
    if not found.by_ops:
        wanted = list(names) if names is not None else [k for k, p in m.named_parameters(recurse=False) if p.requires_grad]
        if not wanted:
            raise InvalidArgumentError(f"check_rule: {type(module).__name__} has no trainable parameters of its own; pass names=")
        problems += check_direct(found, m, args, kw, wanted, n, calls, rtol, seed)
    if found.by_ops or rule_for(m) is found:
        gen = torch.Generator().manual_seed(seed + 1)
        model = _Repeat(m, calls) if calls > 1 else m
        for materialize in (False, True):
            found_here = _attribution(model, args, kw, _cotangent_loss(n, gen), thorough=True, materialize=materialize,
                                      rtol=rtol, seed=seed, options={})
            via = f"through per_sample_grads(materialize={materialize}): "
            problems += [via + msg.replace("'inner.", "'") for msg in found_here]
    return _fail(f"check_rule({label}) disagrees with the naive loop", list(dict.fromkeys(problems)), raise_exception)


# -- check_attribution ---------------------------------------------------------------


def check_attribution(
    model: nn.Module,
    inputs: Any,
    loss_fn: Callable[[Any], Tensor],
    *,
    kwargs: dict[str, Any] | None = None,
    thorough: bool = False,
    materialize: bool | None = None,
    dtype: torch.dtype | None = torch.float64,
    rtol: float | None = None,
    seed: int = 0,
    raise_exception: bool = True,
    **options: Any,
) -> bool:
    """Check that ``model``'s per-sample gradients belong to the right samples.

    Runs ``loss_fn(model(*inputs, **kwargs))``, which must return each sample's
    loss ``L`` (shape ``(N,)``, e.g. ``F.cross_entropy(out, y, reduction="none")``),
    inside ``per_sample_grads(..., loss_reduction="sum")`` with ``L.sum()``
    backpropagated, then, for random weights ``w ~ N(0, 1)^N``, compares
    ``g.weighted_sum(w)`` with the gradient of ``sum_n w_n L_n`` (one more
    backward through the same graph), parameter by parameter, within ``rtol``
    of their size (random signs keep the sum from cancelling) plus ``rtol / 100``
    of the whole model's (a gradient that cancels to ~0, such as an attention key
    bias's, is rounding noise). A row given to the wrong sample changes the
    weighted sum (with probability one), though not the batch sum. The default
    ``rtol`` is 1e-9 in float64, 1e-3 in float32, 5e-2 in bf16/fp16.

    ``thorough=True`` also compares every per-sample gradient and norm with the
    naive loop (one backward per sample: ``N`` times the cost). ``materialize``:
    the mode of the context (default: ``False``, the ``clip_`` path; ``True``
    when thorough). ``dtype``: the model and floating inputs are copied to it
    (default float64; ``None`` runs your model as it is and restores ``p.grad``).
    Other keywords go to ``per_sample_grads`` (``fallback=``, ``strict=``). The
    default mode of backward is used (``one_backward`` computes the same
    per-sample gradients but leaves no graph to compare with).

    Returns ``True``; raises :class:`gradhooks.CheckError` naming each parameter
    that differs and by how much (``raise_exception=False``: returns ``False``).
    """
    for bad in ("loss_reduction", "one_backward", "reuse", "grad_scaler"):
        if bad in options:
            raise ArgumentTypeError(f"check_attribution: {bad}= is chosen by the check itself")
    m = copy.deepcopy(model).to(dtype) if dtype is not None else model
    args, kw = _cast(_as_tuple(inputs), dtype), _cast(dict(kwargs or {}), dtype)
    saved = {id(p): p.grad for p in m.parameters()}
    try:
        for p in m.parameters():
            p.grad = None
        mat = thorough if materialize is None else materialize
        problems = _attribution(m, args, kw, loss_fn, thorough=thorough, materialize=mat, rtol=rtol, seed=seed, options=options)
    finally:
        if dtype is None:
            for p in m.parameters():
                p.grad = saved[id(p)]
    return _fail("check_attribution: per-sample gradients attributed to the wrong samples", problems, raise_exception)


def _attribution(m: nn.Module, args: tuple[Any, ...], kw: dict[str, Any], loss_fn: Callable[[Any], Tensor], *,
                 thorough: bool, materialize: bool, rtol: float | None, seed: int, options: dict[str, Any]) -> list[str]:
    with rule_replay.deferred(), per_sample_grads(m, loss_reduction="sum", materialize=materialize, one_backward=False, **options) as g:
        losses = loss_fn(m(*args, **kw))
        if not isinstance(losses, Tensor) or losses.dim() != 1:
            got = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
            raise InvalidArgumentError(f"check_attribution: loss_fn must return each sample's loss, shape (N,); got {got}")
        losses.sum().backward(retain_graph=True)
    n, params = g.batch_size, g.params
    if losses.shape[0] != n:
        raise InvalidArgumentError(f"check_attribution: loss_fn returned {losses.shape[0]} losses for a batch of {n}")
    if n < 2 or not params:
        return []
    w = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ref = torch.autograd.grad((w.to(losses.dtype) * losses).sum(), list(params.values()), retain_graph=thorough, allow_unused=True)
    ours = g.weighted_sum(w)
    wants = {k: torch.zeros_like(p) if r is None else r for (k, p), r in zip(params.items(), ref, strict=True)}
    # Random signs keep sum_n w_n g_n from cancelling: its size is the terms' scale.
    scales = {k: norm(wants[k]) + norm(ours[k]) for k in params}
    floor = FLOOR * sum(scales.values())  # a gradient that cancels to ~0 is rounding noise of its neighbours
    problems = []
    for k, p in params.items():
        err = rel(ours[k], wants[k], 1.0)
        if err > _rtol(p.dtype, rtol) * (scales[k] + floor):
            problems.append(f"'{k}': sum_n w_n g_n differs from the gradient of the w-weighted loss by {pct(err / max(norm(wants[k]), 1e-300))}")
    if thorough:
        problems += _per_sample(g, losses, params, rtol)
    return problems


def _per_sample(g: Any, losses: Tensor, params: dict[str, nn.Parameter], rtol: float | None) -> list[str]:
    """Every per-sample gradient (or, not materialized, norm) against one backward per sample."""
    names, tensors = list(params), list(params.values())
    rows = [torch.autograd.grad(losses[i], tensors, retain_graph=i + 1 < losses.shape[0], allow_unused=True) for i in range(losses.shape[0])]
    ref = {k: torch.stack([torch.zeros_like(p) if r[j] is None else r[j] for r in rows]) for j, (k, p) in enumerate(params.items())}
    problems = []
    materialized = g._materialize
    floor = FLOOR * norm(torch.cat([t.reshape(-1).to(torch.float64) for t in ref.values()]))
    for k in names:
        tol = _rtol(params[k].dtype, rtol)
        want_norms = ref[k].reshape(ref[k].shape[0], -1).to(torch.float64).norm(dim=1)
        err = rel(g.param_norms()[k], want_norms, 1.0)
        if err > tol * (norm(want_norms) + floor):
            problems.append(f"'{k}': per-sample norms differ from the naive loop by {pct(err / max(norm(want_norms), 1e-300))}")
        if materialized:
            err = rel(g[k], ref[k], 1.0)
            if err > tol * (norm(ref[k]) + floor):
                problems.append(f"'{k}': per-sample gradients differ from the naive loop by {pct(err / max(norm(ref[k]), 1e-300))}{sum_hint(g[k], ref[k])}")
    return problems
