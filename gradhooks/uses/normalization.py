"""Normalization ops with an affine weight and bias: ``layer_norm``, ``rms_norm``,
``group_norm``, ``instance_norm``, ``batch_norm`` (running statistics only).

The op runs as its native form (``native_layer_norm``, ``_fused_rms_norm``,
``native_group_norm``), which returns the statistics the forward used; when the
output's gradient arrives, each sample's ``sum_t G * xhat`` and ``sum_t G`` are
computed from them (:func:`gradhooks.rules.normalization.affine_grads`) and kept
(a dense site). Under autocast, and for ``instance_norm`` (whose native form
returns no statistics), the op runs as called and the statistics are
recomputed in float32 or better from the input when the gradient arrives.
Nothing but the per-sample ``(N, *shape)`` results outlives the backward step.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..rule import accumulation_dtype
from ..rules.normalization import NO_STATS_REASON, TRAINING_REASON, Grads, Stats, affine_grads, batch_stats
from ..trace.derive import Origin
from ..trace.layout import AnyLayout, Layout, batch_first, split_batch
from ..trace.tracer import Tracer, register_handler
from .common import arg, dense_site

_EPS = 1e-5


def _operands(tr: Tracer, origins: dict[int, Origin], w: Any, b: Any) -> dict[str, tuple[Tensor, Origin]]:
    ops = {}
    for local, t in (("weight", w), ("bias", b)):
        if isinstance(t, Tensor) and id(t) in origins:
            ops[local] = (t, origins[id(t)])
    return ops


def _capture(
    tr: Tracer, key: Any, ops: dict[str, tuple[Tensor, Origin]], run: Any, x: Tensor, lx: AnyLayout, kind: str, shape: torch.Size, stats_of: Any
) -> Any:
    """Run ``run(w_op, b_op) -> (out, stats or None)`` and hook its output: when its
    gradient arrives, the per-sample gradients (and in the default mode the exit
    check's rounding scale) are computed and added to the site's call."""
    rec = tr.rec
    site, call = dense_site(tr, key, ops)
    w_op = rec.operand(ops["weight"][0], ops["weight"][1], site, "weight") if "weight" in ops else None
    b_op = rec.operand(ops["bias"][0], ops["bias"][1], site, "bias") if "bias" in ops else None
    out, stats = run(w_op, b_op)
    n = tr.n or 0
    acc = accumulation_dtype(next(iter(ops.values()))[0].dtype)
    want = ("weight" in ops, "bias" in ops)
    names = call.memo["names"]
    slots = [(names.index(local), local) for local, wanted in zip(("weight", "bias"), want, strict=True) if wanted]
    out_shape, per_row = out.shape, max(1, math.prod(shape))
    call.keep_version(x)
    check = not rec.one_backward  # the exit check compares with autograd's gradient
    if check:
        # PyTorch's backward of a lower-precision input (bf16 under autocast) is only as
        # accurate as that input: the check's rounding unit.
        call.memo["eps"] = max([call.memo.get("eps", 0.0)] + [torch.finfo(t.dtype).eps for t in (x, *(o[0] for o in ops.values()))])

    def on_grad(g: Tensor) -> None:
        st = stats if stats is not None else stats_of(x)
        if check and g.dtype != acc:
            call.memo["eps"] = max(call.memo.get("eps", 0.0), torch.finfo(g.dtype).eps)
        got = _per_sample(kind, x, g.reshape(out_shape), st, lx, n, shape, want, acc, check)
        values = {"weight": (got.dw, got.mw), "bias": (got.db, got.mb)}
        for index, local in slots:
            call.add_grad(index, values[local][0])  # type: ignore[arg-type]
        if check:
            mags = call.memo.setdefault("magnitude", {})
            for _, local in slots:
                mag = values[local][1]
                mags[local] = mag if local not in mags else mags[local] + mag
            call.memo["rows"] = call.memo.get("rows", 0) + g.numel() // per_row

    tr.set_layout(out, lx)
    watched = rec.watch_fn(out, on_grad, [x])
    if watched is not out:
        tr.set_layout(watched, lx)
    return watched


def _per_sample(kind: str, x: Tensor, g: Tensor, stats: Stats, lx: AnyLayout, n: int,
                shape: torch.Size, want: tuple[bool, bool], acc: torch.dtype, scales: bool) -> Grads:
    """:func:`affine_grads` of one call, its batch put first (layer/RMS norm) or its
    dimension-0 rows split into samples (group, instance and batch norm)."""
    if kind in ("layer", "rms"):
        xc, gc = batch_first(x, lx, n), batch_first(g, lx, n)
        st = tuple(None if s is None else batch_first(s, lx, n) for s in stats)
        return affine_grads(kind, xc, gc, st, shape, want, acc, scales)  # type: ignore[arg-type]
    xs, gs = split_batch(x, lx, n), split_batch(g, lx, n)
    if len(xs) == 1:
        return affine_grads(kind, xs[0], gs[0], stats, shape, want, acc, scales)
    running = kind == "channel" and stats[1].dim() == 1  # (C,): the same for every row
    parts = [stats] * len(xs) if running else list(zip(*(split_batch(s, lx, n) for s in stats), strict=True))  # type: ignore[arg-type]
    total = Grads()
    for xi, gi, si in zip(xs, gs, parts, strict=True):
        total = total + affine_grads(kind, xi, gi, si, shape, want, acc, scales)
    return total


def _check(tr: Tracer, name: str, lx: AnyLayout, x: Tensor, origins: dict[int, Origin], leading: int | None) -> bool:
    """Whether the batch is where the op keeps samples apart (``leading``: number of
    leading dims for layer/RMS norm; ``None``: dimension 0)."""
    ok = True
    if isinstance(lx, Layout):
        ok = lx.dim < leading if leading is not None else (lx.dim == 0 and lx.rows is None)
    if not ok:
        tr.rec.problem(tr, "layout", name, origins, f"{name} normalizes over the batch dimension")
    return ok


@register_handler(F.layer_norm, torch.layer_norm)
def layer_norm(tr: Tracer, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], batched: dict[int, AnyLayout], origins: dict[int, Origin]) -> Any:
    x, shape = args[0], arg(args, kwargs, 1, "normalized_shape")
    w, b, eps = arg(args, kwargs, 2, "weight"), arg(args, kwargs, 3, "bias"), arg(args, kwargs, 4, "eps", _EPS)
    shape = torch.Size([shape] if isinstance(shape, int) else shape)
    lx = batched.get(id(x))
    ops = _operands(tr, origins, w, b)
    if lx is None or not ops or not _check(tr, "layer_norm", lx, x, origins, x.dim() - len(shape)):
        return tr.rec.plain(tr, func, args, kwargs, batched, origins)
    dims = tuple(range(-len(shape), 0))

    def run(w_op: Any, b_op: Any) -> tuple[Tensor, Any]:
        w_use = w_op if "weight" in ops else w
        b_use = b_op if "bias" in ops else b
        if torch.is_autocast_enabled(x.device.type):
            return F.layer_norm(x, shape, w_use, b_use, eps), None
        out, mean, rstd = torch.native_layer_norm(x, shape, w_use, b_use, eps)
        return out, (mean, rstd)

    def stats_of(xv: Tensor) -> Stats:
        return batch_stats(xv, dims, eps, accumulation_dtype(xv.dtype))

    key = ("layer_norm", tuple(shape), eps, *(id(o) for _, o in ops.values()))
    return _capture(tr, key, ops, run, x, lx, "layer", _param_shape(ops, shape), stats_of)


@register_handler(F.rms_norm, torch.rms_norm)
def rms_norm(tr: Tracer, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], batched: dict[int, AnyLayout], origins: dict[int, Origin]) -> Any:
    x, shape = args[0], arg(args, kwargs, 1, "normalized_shape")
    w, eps = arg(args, kwargs, 2, "weight"), arg(args, kwargs, 3, "eps", None)
    shape = torch.Size([shape] if isinstance(shape, int) else shape)
    lx = batched.get(id(x))
    ops = _operands(tr, origins, w, None)
    if lx is None or not ops or not _check(tr, "rms_norm", lx, x, origins, x.dim() - len(shape)):
        return tr.rec.plain(tr, func, args, kwargs, batched, origins)
    dims = tuple(range(-len(shape), 0))

    def run(w_op: Any, b_op: Any) -> tuple[Tensor, Any]:
        if torch.is_autocast_enabled(x.device.type):
            return func(x, shape, w_op, eps), None
        out, rstd = torch._fused_rms_norm(x, list(shape), w_op, eps)  # pyright: ignore[reportPrivateImportUsage]
        return out, (None, rstd)

    def stats_of(xv: Tensor) -> Stats:
        xa = xv.to(accumulation_dtype(xv.dtype))
        e = torch.finfo(xa.dtype).eps if eps is None else eps
        return None, xa.square().mean(dims, keepdim=True).add_(e).rsqrt_()

    key = ("rms_norm", tuple(shape), eps, *(id(o) for _, o in ops.values()))
    return _capture(tr, key, ops, run, x, lx, "rms", _param_shape(ops, shape), stats_of)


@register_handler(F.group_norm, torch.group_norm)
def group_norm(tr: Tracer, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], batched: dict[int, AnyLayout], origins: dict[int, Origin]) -> Any:
    x, groups = args[0], arg(args, kwargs, 1, "num_groups")
    w, b, eps = arg(args, kwargs, 2, "weight"), arg(args, kwargs, 3, "bias"), arg(args, kwargs, 4, "eps", _EPS)
    lx = batched.get(id(x))
    ops = _operands(tr, origins, w, b)
    if lx is None or not ops or not _check(tr, "group_norm", lx, x, origins, None):
        return tr.rec.plain(tr, func, args, kwargs, batched, origins)
    rows, channels = x.shape[0], x.shape[1]

    def run(w_op: Any, b_op: Any) -> tuple[Tensor, Any]:
        w_use = w_op if "weight" in ops else w
        b_use = b_op if "bias" in ops else b
        if torch.is_autocast_enabled(x.device.type):
            return F.group_norm(x, groups, w_use, b_use, eps), None
        out, mean, rstd = torch.native_group_norm(x, w_use, b_use, rows, channels, math.prod(x.shape[2:]), groups, eps)
        return out, (mean, rstd)

    def stats_of(xv: Tensor) -> Stats:
        mean, rstd = batch_stats(xv.reshape(rows, groups, -1), (-1,), eps, accumulation_dtype(xv.dtype))
        return mean.reshape(rows, groups), rstd.reshape(rows, groups)

    key = ("group_norm", groups, eps, *(id(o) for _, o in ops.values()))
    return _capture(tr, key, ops, run, x, lx, "group", torch.Size([channels]), stats_of)


def _channel_stats(x: Tensor, eps: float) -> Stats:
    """Instance statistics ``(rows, C)`` each (``F.instance_norm`` does not return its own)."""
    mean, rstd = batch_stats(x.reshape(x.shape[0], x.shape[1], -1), (-1,), eps, accumulation_dtype(x.dtype))
    return mean.reshape(x.shape[:2]), rstd.reshape(x.shape[:2])


@register_handler(F.instance_norm)
def instance_norm(tr: Tracer, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], batched: dict[int, AnyLayout], origins: dict[int, Origin]) -> Any:
    x = args[0]
    rm, rv = arg(args, kwargs, 1, "running_mean"), arg(args, kwargs, 2, "running_var")
    w, b = arg(args, kwargs, 3, "weight"), arg(args, kwargs, 4, "bias")
    use_input_stats, momentum, eps = arg(args, kwargs, 5, "use_input_stats", True), arg(args, kwargs, 6, "momentum", 0.1), arg(args, kwargs, 7, "eps", _EPS)
    lx = batched.get(id(x))
    ops = _operands(tr, origins, w, b)
    if lx is None or not ops or not _check(tr, "instance_norm", lx, x, origins, None):
        return tr.rec.plain(tr, func, args, kwargs, batched, origins)
    stats = None if use_input_stats else _running(rm, rv, eps)

    def run(w_op: Any, b_op: Any) -> tuple[Tensor, Any]:
        w_use = w_op if "weight" in ops else w
        b_use = b_op if "bias" in ops else b
        return func(x, rm, rv, w_use, b_use, use_input_stats, momentum, eps), stats

    key = ("instance_norm", bool(use_input_stats), eps, *(id(o) for _, o in ops.values()))
    return _capture(tr, key, ops, run, x, lx, "channel", torch.Size([x.shape[1]]), lambda xv: _channel_stats(xv, eps))


def _running(rm: Tensor, rv: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    acc = accumulation_dtype(rv.dtype)
    return rm.detach().to(acc).clone(), torch.rsqrt(rv.detach().to(acc) + eps)


@register_handler(F.batch_norm)
def batch_norm(tr: Tracer, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], batched: dict[int, AnyLayout], origins: dict[int, Origin]) -> Any:
    x, rm, rv = args[0], arg(args, kwargs, 1, "running_mean"), arg(args, kwargs, 2, "running_var")
    w, b = arg(args, kwargs, 3, "weight"), arg(args, kwargs, 4, "bias")
    training, momentum, eps = arg(args, kwargs, 5, "training", False), arg(args, kwargs, 6, "momentum", 0.1), arg(args, kwargs, 7, "eps", _EPS)
    lx = batched.get(id(x))
    ops = _operands(tr, origins, w, b)
    if training or rm is None or rv is None:
        tr.rec.problem(tr, "coupled", "batch_norm", origins, TRAINING_REASON if training else NO_STATS_REASON)
        return tr.rec.plain(tr, func, args, kwargs, batched, origins)
    if lx is None or not ops or not _check(tr, "batch_norm", lx, x, origins, None):
        return tr.rec.plain(tr, func, args, kwargs, batched, origins)
    stats = _running(rm, rv, eps)

    def run(w_op: Any, b_op: Any) -> tuple[Tensor, Any]:
        w_use = w_op if "weight" in ops else w
        b_use = b_op if "bias" in ops else b
        return func(x, rm, rv, w_use, b_use, False, momentum, eps), stats

    key = ("batch_norm", eps, *(id(o) for _, o in ops.values()))
    return _capture(tr, key, ops, run, x, lx, "channel", torch.Size([x.shape[1]]), lambda xv: stats)


def _param_shape(ops: dict[str, tuple[Tensor, Origin]], shape: torch.Size) -> torch.Size:
    return next(iter(ops.values()))[0].shape if ops else shape
