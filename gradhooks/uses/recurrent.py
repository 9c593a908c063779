"""Recurrent ops: ``_VF.lstm``, ``_VF.gru``, ``_VF.rnn_tanh``, ``_VF.rnn_relu`` (what
``nn.LSTM``/``nn.GRU``/``nn.RNN`` call), padded or packed, and the layouts of
``pack_padded_sequence`` / ``pad_packed_sequence``.

The call records its input, initial state and (at exit) the gradients of its
three outputs; :mod:`gradhooks.rules.recurrent` recomputes the recurrence from
them. A packed sequence's rows are time-major: row ``r`` belongs to the sample
its layout's ``rows`` names, which puts each sample's steps in order when they
are gathered batch first.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..capture import Attach, Call
from ..rules.recurrent import RecurrentGeometry, RecurrentRule
from ..trace import layout as L
from ..trace.derive import Origin
from ..trace.layout import AnyLayout, Layout, Opaque, Whole
from ..trace.optable import register_family
from ..trace.tracer import Tracer, register_handler
from .common import new_site

RECURRENT = RecurrentRule()
_MODES = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN_TANH", "rnn_relu": "RNN_RELU"}


def _packed(args: tuple[Any, ...]) -> bool:
    b = args[1]
    return isinstance(b, Tensor) and b.dim() == 1 and b.dtype == torch.long and not b.is_floating_point()


def _unpack_args(args: tuple[Any, ...]) -> dict[str, Any]:
    if _packed(args):
        data, batch_sizes, hx, params, has_biases, layers, dropout, train, bidir = args[:9]
        return dict(x=data, batch_sizes=batch_sizes, hx=hx, params=params, has_biases=has_biases, layers=layers,
                    dropout=dropout, train=train, bidir=bidir, batch_first=None)
    x, hx, params, has_biases, layers, dropout, train, bidir, batch_first = args[:9]
    return dict(x=x, batch_sizes=None, hx=hx, params=params, has_biases=has_biases, layers=layers, dropout=dropout,
                train=train, bidir=bidir, batch_first=batch_first)


def _state_layout(a: dict[str, Any], x_lay: AnyLayout, n: int) -> AnyLayout:
    """Where the batch is in ``h_n`` (and ``c_n``): dim 1, in the input's sample order."""
    if isinstance(x_lay, (Whole, Opaque)):
        return x_lay
    if a["batch_sizes"] is None:
        return x_lay.moved(1) if x_lay.rows is None else L.with_rows(1, x_lay.rows, n)
    rows = x_lay.rows
    assert rows is not None
    return L.with_rows(1, rows[: int(a["batch_sizes"][0])], n)  # the first step holds every sequence


def _layouts(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any, batched: dict[int, AnyLayout], n: int) -> Any:
    a = _unpack_args(args)
    lay = batched.get(id(a["x"]))
    if lay is None:
        return [None] * len(out)
    if isinstance(lay, Layout) and a["batch_sizes"] is None and lay.dim != (0 if a["batch_first"] else 1):
        return [Opaque("a recurrent layer's input with the batch in its time dimension")] * len(out)
    state = _state_layout(a, lay, n)
    return [lay] + [state] * (len(out) - 1)


def _pack_layout(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any, batched: dict[int, AnyLayout], n: int) -> Any:
    """``_pack_padded_sequence(input, lengths, batch_first) -> (data, batch_sizes)``."""
    lay = batched.get(id(args[0]))
    if not isinstance(lay, Layout):
        return [lay, None]
    if lay.dim != (0 if args[2] else 1) or not (lay.plain or lay.rows is not None):
        return [Opaque("packing a sequence whose batch is not in its batch dimension"), None]
    samples = lay.rows if lay.rows is not None else torch.arange(n)
    sizes = out[1].tolist()
    rows = torch.cat([samples[:s] for s in sizes]) if sizes else samples[:0]
    return [Layout(0, rows=rows.to(torch.long)), None]


def _pad_layout(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any, batched: dict[int, AnyLayout], n: int) -> Any:
    """``_pad_packed_sequence(data, batch_sizes, batch_first, ...) -> (padded, lengths)``."""
    lay = batched.get(id(args[0]))
    if not isinstance(lay, Layout) or lay.rows is None:
        return [lay, None]
    first = int(args[1][0])
    return [L.with_rows(0 if args[2] else 1, lay.rows[:first], n), None]


register_family(list(_MODES), _layouts)
register_family(["_pack_padded_sequence"], _pack_layout)
register_family(["_pad_packed_sequence"], _pad_layout)


def _canonical(call: Call, n: int) -> list[Call]:
    """Batch first: input ``(N, T, in)`` (packed: zero-padded, in sample order, with
    ``lengths``), initial states and output gradients ``(N, L*D, H)``."""
    m = call.memo
    x_lay, state_lay = m["in_layout"], m["state_layout"]
    x = L.batch_first(call.input, x_lay, n)
    grads = [call.grad_of(i) for i in range(len(call.grads))]
    out = [L.batch_first(grads[0], x_lay, n)]
    out += [_state(g, state_lay, n) for g in grads[1:]]
    memo: dict[str, Any] = {}
    if m["packed"]:
        rows = x_lay.rows
        memo["lengths"] = torch.bincount(rows, minlength=n).to(x.device)
    hx = m["hx"]
    shape = (n, m["states"], m["hidden"][0])
    memo["h0"] = _state(hx[0], m["hx_layouts"][0] or state_lay, n) if hx[0] is not None else x.new_zeros(shape)
    if m["mode"] == "LSTM":
        cshape = (n, m["states"], m["hidden"][1])
        memo["c0"] = _state(hx[1], m["hx_layouts"][1] or state_lay, n) if hx[1] is not None else x.new_zeros(cshape)
    new = Call.of(x, out, memo)
    new.versions = call.versions
    return [new]


def _state(t: Tensor, lay: AnyLayout, n: int) -> Tensor:
    """A ``(L*D, N, H)`` state batch first: ``(N, L*D, H)``."""
    if isinstance(lay, Layout) and lay.rows is not None:
        return L.batch_first(t, lay, n)[:, 0]
    if isinstance(lay, Whole):
        return t.movedim(1, 0)
    return L.batch_first(t, lay, n)


@register_handler(torch._VF.lstm, torch._VF.gru, torch._VF.rnn_tanh, torch._VF.rnn_relu)
def recurrent(tr: Tracer, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], batched: dict[int, AnyLayout], origins: dict[int, Origin]) -> Any:
    rec, n = tr.rec, tr.n or 0
    a = _unpack_args(args)
    name = func.__name__
    x_lay = _as_layout(batched.get(id(a["x"])), a)
    if x_lay is None or isinstance(x_lay, Opaque) or any(isinstance(t, Tensor) and id(t) in origins for t in _hx_list(a["hx"])):
        rec.unsupported(tr, name, origins, "a recurrent layer whose input does not carry the batch, or a learned initial state")
        return rec.plain(tr, func, args, kwargs, batched, origins)
    if a["dropout"] and a["train"] and a["layers"] > 1:
        rec.unsupported(tr, name, origins, "dropout between recurrent layers in training mode draws masks the per-sample pass cannot redraw; use dropout=0 or eval()")
        return rec.plain(tr, func, args, kwargs, batched, origins)
    params = list(a["params"])
    geo = RecurrentGeometry(_MODES[name], [p.detach() for p in params], bool(a["has_biases"]), int(a["layers"]), bool(a["bidir"]))
    operands = {f"p{i}": (p, origins[id(p)]) for i, p in enumerate(params) if id(p) in origins}
    site = new_site(tr, ("recurrent", name, *(id(o) for _, o in operands.values())), RECURRENT, lambda: geo, operands)
    new_params = [rec.operand(p, origins[id(p)], site, f"p{i}") if id(p) in origins else p for i, p in enumerate(params)]
    call_args = list(args)
    call_args[3 if a["batch_sizes"] is not None else 2] = new_params
    outs = func(*call_args, **kwargs)
    lays = _layouts(func, args, kwargs, outs, {id(a["x"]): x_lay}, n)
    hx = _hx_list(a["hx"])
    call = Call((a["x"],), {}, list(outs))
    call.memo.update(
        canon=_canonical, in_layout=x_lay, state_layout=lays[1], packed=a["batch_sizes"] is not None, mode=geo.mode,
        hx=[None if t is None else t.detach() for t in hx] + [None] * (2 - len(hx)),
        hx_layouts=[tr.layout_of(t) if t is not None else None for t in hx] + [None] * (2 - len(hx)),
        states=geo.num_layers * geo.dirs, hidden=[o.shape[-1] for o in outs[1:]],
    )
    call.keep_version(a["x"])
    for p in params:  # the rule recomputes the gates from the weights at query time
        call.keep_version(p)
    site.calls.append(call)
    result = []
    for i, (o, lay) in enumerate(zip(outs, lays, strict=False)):
        tr.set_layout(o, lay)
        w = rec.watch(o, call, i, [a["x"], *hx])
        if w is not o:
            tr.set_layout(w, lay)
        result.append(w)
    return tuple(result)


def _as_layout(lay: AnyLayout | None, a: dict[str, Any]) -> AnyLayout | None:
    """N = 1 (:data:`WHOLE`) as the explicit layout this op's arguments imply."""
    if not isinstance(lay, Whole):
        return lay
    if a["batch_sizes"] is not None:
        return Layout(0, rows=torch.zeros(a["x"].shape[0], dtype=torch.long))
    return Layout(0 if a["batch_first"] else 1)


def _hx_list(hx: Any) -> list[Tensor | None]:
    if hx is None:
        return []
    if isinstance(hx, Tensor):
        return [hx]
    return list(hx)


_CELLS = {"lstm_cell": "LSTM", "gru_cell": "GRU", "rnn_tanh_cell": "RNN_TANH", "rnn_relu_cell": "RNN_RELU"}


def _cell_layouts(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any, batched: dict[int, AnyLayout], n: int) -> Any:
    lays = [batched.get(id(t)) for t in [args[0], *_hx_list(args[1])] if isinstance(t, Tensor)]
    lay = next((x for x in lays if x is not None), None)
    if isinstance(lay, Layout) and lay.dim != 0:
        lay = Opaque("a recurrent cell's input with the batch outside dimension 0")
    return [lay] * len(out) if isinstance(out, (tuple, list)) else lay


register_family(list(_CELLS), _cell_layouts)


def _cell_canonical(call: Call, n: int) -> list[Call]:
    """A cell is one step of a one-layer recurrence: ``(N, 1, in)``; its output's
    gradient is the sequence output's, its cell state's the final cell state's."""
    m = call.memo
    lay = m["in_layout"]
    x = L.batch_first(call.input, lay, n).unsqueeze(1)
    hx = m["hx"]
    hidden = m["hidden"]
    h0 = L.batch_first(hx[0], lay, n).unsqueeze(1) if hx[0] is not None else x.new_zeros((n, 1, hidden))
    g = [L.batch_first(call.grad_of(i), lay, n).unsqueeze(1) for i in range(len(call.grads))]
    grads = [g[0], torch.zeros_like(g[0])] + g[1:]
    memo: dict[str, Any] = {"h0": h0, "cell": True}
    if m["mode"] == "LSTM":
        memo["c0"] = L.batch_first(hx[1], lay, n).unsqueeze(1) if hx[1] is not None else x.new_zeros((n, 1, hidden))
    new = Call.of(x, grads, memo)
    new.versions = call.versions
    return [new]


@register_handler(torch._VF.lstm_cell, torch._VF.gru_cell, torch._VF.rnn_tanh_cell, torch._VF.rnn_relu_cell)
def cell(tr: Tracer, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], batched: dict[int, AnyLayout], origins: dict[int, Origin]) -> Any:
    rec = tr.rec
    x, hx = args[0], args[1]
    weights = [w for w in args[2:6] if isinstance(w, Tensor)]
    lay = batched.get(id(x))
    lay = Layout(0) if isinstance(lay, Whole) else lay
    if lay is None or isinstance(lay, Opaque) or x.dim() != 2 or any(isinstance(t, Tensor) and id(t) in origins for t in _hx_list(hx)):
        rec.unsupported(tr, func.__name__, origins, "a recurrent cell on an unbatched input, or a learned initial state")
        return rec.plain(tr, func, args, kwargs, batched, origins)
    mode = _CELLS[func.__name__]
    geo = RecurrentGeometry(mode, [w.detach() for w in weights], len(weights) == 4, 1, False)
    operands = {f"p{i}": (w, origins[id(w)]) for i, w in enumerate(weights) if id(w) in origins}
    site = new_site(tr, ("cell", mode, *(id(o) for _, o in operands.values())), RECURRENT, lambda: geo, operands)
    new_args = list(args)
    for i, w in enumerate(weights):
        if id(w) in origins:
            new_args[2 + i] = rec.operand(w, origins[id(w)], site, f"p{i}")
    if rec.anchor is not None and not any(isinstance(t, Tensor) and t.requires_grad for t in [x, *_hx_list(hx)]):
        # lstm_cell is composite (its cy feeds its hy): its outputs must come out of one
        # graph, so the first step's input is attached, not each output separately.
        new_args[0] = Attach.apply(x, rec.anchor)
    out = func(*new_args, **kwargs)
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    hxs = _hx_list(hx)
    call = Call((x,), {}, outs)
    call.memo.update(canon=_cell_canonical, in_layout=lay, mode=mode, hidden=outs[0].shape[-1],
                     hx=[None if t is None else t.detach() for t in hxs] + [None] * (2 - len(hxs)))
    call.keep_version(x)
    site.calls.append(call)
    result = []
    for i, o in enumerate(outs):
        tr.set_layout(o, lay)
        w = rec.watch(o, call, i, [x, *hxs])
        if w is not o:
            tr.set_layout(w, lay)
        result.append(w)
    return tuple(result) if isinstance(out, (tuple, list)) else result[0]
