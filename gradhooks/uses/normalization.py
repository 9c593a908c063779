"""Normalization ops with an affine weight and bias: ``layer_norm``, ``rms_norm``,
``group_norm``, ``instance_norm``, ``batch_norm`` (running statistics only).

The op runs as its native form (``native_layer_norm``, ``_fused_rms_norm``,
``native_group_norm``), which returns the statistics the forward used; when the
output's gradient arrives, each sample's ``sum_t G * xhat`` and ``sum_t G`` are
computed from them (:func:`gradhooks.rules.normalization.affine_grads`) and kept
(a dense site). Under autocast the op runs as called and the statistics are
recomputed in float32 from the input.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..rule import accumulation_dtype
from ..rules.normalization import NO_STATS_REASON, TRAINING_REASON, affine_grads
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
    """Run ``run(w_op, b_op) -> (out, stats or None)`` and hook its output."""
    rec = tr.rec
    site, call = dense_site(tr, key, ops)
    w_op = rec.operand(ops["weight"][0], ops["weight"][1], site, "weight") if "weight" in ops else None
    b_op = rec.operand(ops["bias"][0], ops["bias"][1], site, "bias") if "bias" in ops else None
    out, stats = run(w_op, b_op)
    n = tr.n or 0
    acc = accumulation_dtype(next(iter(ops.values()))[0].dtype)
    want = ("weight" in ops, "bias" in ops)
    names = call.memo["names"]
    call.keep_version(x)

    check = not rec.one_backward  # the exit check compares with autograd's gradient

    def on_grad(g: Tensor) -> None:
        st = stats if stats is not None else stats_of(x)
        g = g.reshape(out.shape)
        per = _per_sample(kind, x, g, st, lx, n, shape, want, acc)
        for local, t in zip(("weight", "bias"), per):
            if t is not None:
                call.add_grad(names.index(local), t)
        if check:
            mags = call.memo.setdefault("magnitude", {})
            got = _per_sample(kind, x.abs(), g.abs(), _abs_stats(kind, st), lx, n, shape, want, acc)
            for local, t in zip(("weight", "bias"), got):
                if t is not None:
                    mags[local] = t.sum(0) if local not in mags else mags[local] + t.sum(0)
            call.memo["rows"] = call.memo.get("rows", 0) + g.numel() // max(1, math.prod(shape))

    tr.set_layout(out, lx)
    watched = rec.watch_fn(out, on_grad, [x])
    if watched is not out:
        tr.set_layout(watched, lx)
    return watched


def _per_sample(kind: str, x: Tensor, g: Tensor, stats: tuple[Tensor, ...], lx: AnyLayout, n: int,
                shape: torch.Size, want: tuple[bool, bool], acc: torch.dtype) -> tuple[Tensor | None, Tensor | None]:
    if kind in ("layer", "rms"):
        xc, gc = batch_first(x, lx, n), batch_first(g, lx, n)
        st = tuple(batch_first(s, lx, n) for s in stats)
        return affine_grads(kind, xc, gc, st, shape, want, acc)
    running = kind == "channel" and stats[0].dim() == 1  # (C,): the same for every row
    xs, gs = split_batch(x, lx, n), split_batch(g, lx, n)
    st_parts = [[s] * len(xs) if running else split_batch(s, lx, n) for s in stats]
    dw = db = None
    for i in range(len(xs)):
        w_, b_ = affine_grads(kind, xs[i], gs[i], tuple(p[i] for p in st_parts), shape, want, acc)
        dw = w_ if dw is None else dw + w_
        db = b_ if db is None else db + b_
    return dw, db


def _abs_stats(kind: str, stats: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Statistics giving ``(|x| + |mean|) * rstd`` as ``xhat`` of ``|x|`` (see
    :func:`gradhooks.rules.normalization.affine_magnitudes`)."""
    if kind == "rms":
        return stats
    return (stats[0].abs().neg(), *stats[1:])


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

    def stats_of(xv: Tensor) -> tuple[Tensor, Tensor]:
        var, mean = torch.var_mean(xv.float() if xv.dtype != torch.float64 else xv, dims, correction=0, keepdim=True)
        return mean, torch.rsqrt(var + eps)

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
        out, rstd = torch._fused_rms_norm(x, list(shape), w_op, eps)
        return out, (rstd,)

    def stats_of(xv: Tensor) -> tuple[Tensor]:
        xa = xv.float() if xv.dtype != torch.float64 else xv
        e = torch.finfo(xa.dtype).eps if eps is None else eps
        return (torch.rsqrt(xa.square().mean(dims, keepdim=True) + e),)

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

    def stats_of(xv: Tensor) -> tuple[Tensor, Tensor]:
        xa = (xv.float() if xv.dtype != torch.float64 else xv).reshape(rows, groups, -1)
        var, mean = torch.var_mean(xa, -1, correction=0)
        return mean, torch.rsqrt(var + eps)

    key = ("group_norm", groups, eps, *(id(o) for _, o in ops.values()))
    return _capture(tr, key, ops, run, x, lx, "group", torch.Size([channels]), stats_of)


def _channel_stats(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    xa = (x.float() if x.dtype != torch.float64 else x).reshape(x.shape[0], x.shape[1], -1)
    var, mean = torch.var_mean(xa, -1, correction=0)
    return mean, torch.rsqrt(var + eps)


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
