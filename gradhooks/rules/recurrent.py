"""Recurrent layers: ``nn.RNN``, ``nn.LSTM``, ``nn.GRU`` (layers, bidirectional,
``batch_first`` both ways, ``proj_size``, packed sequences).

Every weight of a recurrent layer is used linearly at each time step: at step
``t`` of layer ``l`` and direction ``d`` the gates' pre-activations are
``Zi_t = x_t W_ih^T + b_ih`` and ``Zh_t = h_{t-1} W_hh^T + b_hh`` (and LSTM's
projection ``h_t = m_t W_hr^T``). So sample n's gradient of ``W_ih`` is
``sum_t dZi_nt^T x_nt``: a linear rule over the time steps, with the inputs
``x``, ``h_{t-1}`` or ``m`` and the gradients ``dZi``, ``dZh``, ``dh``. Those
gradients are obtained by recomputing the recurrence from the captured input
and initial state, batched over the samples (a loop over time steps, never over
samples), and backpropagating the captured output gradients through it once;
the linear rule then gives per-sample tensors, Gram norms and clipped sums
exactly as for ``nn.Linear``. Packed sequences run with a mask: a sample's
state does not change after its last step (or, in reverse, before its first).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from ..capture import Call
from ..registry import register_rule
from ..rule import Rule
from .linear import LinearRule

__all__ = ["RecurrentRule", "RecurrentGeometry", "param_kinds"]

_LINEAR = LinearRule()


@dataclass
class RecurrentGeometry:
    """What one ``_VF.lstm/gru/rnn_*`` call computes: ``mode`` ``"LSTM"``, ``"GRU"``,
    ``"RNN_TANH"`` or ``"RNN_RELU"``; ``weights``: the flat weight list as used."""

    mode: str
    weights: list[Tensor]
    has_biases: bool
    num_layers: int
    bidirectional: bool

    @property
    def dirs(self) -> int:
        return 2 if self.bidirectional else 1

    def kinds(self) -> list[tuple[int, int, str]]:
        """``(layer, direction, kind)`` of every weight, in the flat order."""
        return param_kinds(len(self.weights), self.num_layers, self.dirs, self.has_biases)

    def get_parameter(self, name: str) -> Tensor:
        return self.weights[int(name[1:])]


def param_kinds(count: int, layers: int, dirs: int, has_biases: bool) -> list[tuple[int, int, str]]:
    per = count // (layers * dirs)
    kinds = ["w_ih", "w_hh"] + (["b_ih", "b_hh"] if has_biases else [])
    if per > len(kinds):
        kinds.append("w_hr")
    return [(l_, d, k) for l_ in range(layers) for d in range(dirs) for k in kinds]


def _cell(mode: str, zi: Tensor, zh: Tensor, h: Tensor, c: Tensor | None, c_total: bool = False) -> tuple[Tensor, Tensor | None]:
    """One step: ``(h_new or m, c_new)`` from the pre-activations (PyTorch's gate order).
    ``c_total``: the gradient given for ``c_new`` already includes its path through
    ``h_new`` (``lstm_cell`` is composite: its ``cy`` feeds its ``hy``), so that path
    is not added again."""
    if mode == "LSTM":
        assert c is not None  # an LSTM always carries its cell state
        i, f, g, o = (zi + zh).chunk(4, 1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c_new.detach() if c_total else c_new), c_new
    if mode == "GRU":
        ir, iz, in_ = zi.chunk(3, 1)
        hr, hz, hn = zh.chunk(3, 1)
        r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        n = torch.tanh(in_ + r * hn)
        return (1 - z) * n + z * h, None
    act = torch.tanh if mode == "RNN_TANH" else torch.relu
    return act(zi + zh), None


def _present(ts: Sequence[Tensor | None]) -> list[Tensor]:
    """``ts`` where every entry exists (an LSTM's cell states, a projected layer's steps)."""
    out = [t for t in ts if t is not None]
    assert len(out) == len(ts)
    return out


@dataclass
class _Direction:
    """One layer and direction of the recomputed recurrence: its tensors per step."""

    zi: Tensor  # (N, T, gates): input pre-activations (a leaf in the first layer)
    zh: list[Tensor]  # per step (N, gates): recurrent pre-activations
    h_prev: list[Tensor]  # per step (N, H): the state before the step
    m: list[Tensor | None]  # per step: LSTM's output before the projection
    h: list[Tensor | None]  # per step: the projected output
    out: Tensor  # (N, T, H)
    h_n: Tensor
    c_n: Tensor | None


def _direction(geo: RecurrentGeometry, weight: Any, layer_in: Tensor, h: Tensor, c: Tensor | None, lengths: Tensor | None, reverse: bool, c_total: bool = False) -> _Direction:
    """Run one direction of one layer step by step (batched over the samples)."""
    w_ih, w_hh, b_ih, b_hh, w_hr = (weight(k) for k in ("w_ih", "w_hh", "b_ih", "b_hh", "w_hr"))
    zi = torch.nn.functional.linear(layer_in, w_ih, b_ih)
    if not zi.requires_grad:  # the first layer: nothing upstream to reach
        zi = zi.detach().requires_grad_()
    steps = layer_in.shape[1]
    # Slots the loop fills, every one of them (in reverse order for reverse=True).
    zh = cast("list[Tensor]", [None] * steps)
    h_prev = cast("list[Tensor]", [None] * steps)
    ms: list[Tensor | None] = [None] * steps
    hs: list[Tensor | None] = [None] * steps
    seq = cast("list[Tensor]", [None] * steps)
    for t in range(steps - 1, -1, -1) if reverse else range(steps):
        h_prev[t] = h
        zh[t] = torch.nn.functional.linear(h, w_hh, b_hh)
        m, c_new = _cell(geo.mode, zi[:, t], zh[t], h, c, c_total)
        h_new = m
        if w_hr is not None:
            ms[t], h_new = m, m @ w_hr.T
            hs[t] = h_new
        if lengths is not None:  # a packed sequence: the state stays put outside its steps
            live = (t < lengths)[:, None]
            h = torch.where(live, h_new, h)
            c = torch.where(live, c_new, c) if c is not None and c_new is not None else None  # LSTM: both
            seq[t] = torch.where(live, h_new, torch.zeros_like(h_new))
        else:
            h, c = h_new, c_new
            seq[t] = h_new
    return _Direction(zi, zh, h_prev, ms, hs, torch.stack(seq, 1), h, c)


def _expand(geo: RecurrentGeometry, call: Call) -> dict[int, tuple[Tensor | None, Tensor]]:
    """Recompute the recurrence of ``call`` and backpropagate its output gradients:
    ``{weight index: (X (N, T, in), or None for a bias; G (N, T, out))}``."""
    got = call.memo.get("~expanded")
    if got is not None:
        return got
    x = call.input  # (N, T, in)
    h0, c0, lengths = call.memo["h0"], call.memo.get("c0"), call.memo.get("lengths")
    index = {(l_, d, k): i for i, (l_, d, k) in enumerate(geo.kinds())}
    w = [t.detach() for t in geo.weights]
    runs: dict[tuple[int, int], _Direction] = {}
    layer_inputs = []
    with torch.enable_grad():
        layer_in = x.detach()
        for l_ in range(geo.num_layers):
            layer_inputs.append(layer_in.detach())
            for d in range(geo.dirs):
                def weight(k: str, l_: int = l_, d: int = d) -> Tensor | None:
                    i = index.get((l_, d, k))
                    return None if i is None else w[i]

                s = l_ * geo.dirs + d  # initial states require grad, so every step's pre-activation does
                h = h0[:, s].detach().requires_grad_()
                c = c0[:, s].detach().requires_grad_() if c0 is not None else None
                runs[(l_, d)] = _direction(geo, weight, layer_in, h, c, lengths, reverse=d == 1, c_total=bool(call.memo.get("cell")))
            outs = [runs[(l_, d)].out for d in range(geo.dirs)]
            layer_in = torch.cat(outs, -1) if len(outs) > 1 else outs[0]
        order = sorted(runs)
        outputs = [layer_in, torch.stack([runs[k].h_n for k in order], 1)]
        grads_out = [call.grad_of(0), call.grad_of(1)]
        if geo.mode == "LSTM":
            outputs.append(torch.stack(_present([runs[k].c_n for k in order]), 1))
            grads_out.append(call.grad_of(2))
        inputs = [runs[k].zi for k in order] + [t for k in order for t in runs[k].zh]
        inputs += [t for k in order for t in runs[k].h if t is not None]
        found = torch.autograd.grad(outputs, inputs, [g.to(o.dtype) for g, o in zip(grads_out, outputs, strict=False)], allow_unused=True)
    grad = {id(t): (torch.zeros_like(t) if g is None else g) for t, g in zip(inputs, found, strict=False)}
    out: dict[int, tuple[Tensor | None, Tensor]] = {}
    for (l_, d, k), i in index.items():
        run = runs[(l_, d)]
        if k in ("w_ih", "b_ih"):
            out[i] = (layer_inputs[l_] if k == "w_ih" else None, grad[id(run.zi)])
        elif k in ("w_hh", "b_hh"):
            dz = torch.stack([grad[id(t)] for t in run.zh], 1)
            out[i] = (torch.stack([t.detach() for t in run.h_prev], 1) if k == "w_hh" else None, dz)
        else:  # w_hr: h_t = m_t W_hr^T
            dh = torch.stack([grad[id(t)] for t in run.h], 1)
            out[i] = (torch.stack([t.detach() for t in _present(run.m)], 1), dh)
    call.memo["~expanded"] = out
    return out


class RecurrentRule(Rule):
    """``nn.RNN``/``nn.LSTM``/``nn.GRU`` (registered for the module types; applied to
    each ``_VF.lstm/gru/rnn_*`` call). Local names ``"p{i}"``: weight ``i`` of the
    flat list."""

    by_ops = True
    subclass_forward_ok = True

    def _linear(self, module: RecurrentGeometry, calls: Sequence[Call], name: str) -> tuple[Any, list[Call], str]:
        i = int(name[1:])
        kind = module.kinds()[i][2]
        pairs = [_expand(module, c)[i] for c in calls]
        local = "bias" if kind.startswith("b_") else "weight"
        w = module.weights[i]
        geometry = _Geo(w, local)
        return geometry, [Call.of(x if x is not None else g, [g], {}) for x, g in pairs], local

    def per_sample(self, module: Any, calls: Sequence[Call], names: Sequence[str]) -> dict[str, Tensor]:
        out = {}
        for name in names:
            geo, lcalls, local = self._linear(module, calls, name)
            out[name] = _LINEAR.per_sample(geo, lcalls, [local])[local]
        return out

    def squared_norms(self, module: Any, calls: Sequence[Call], names: Sequence[str]) -> dict[str, Tensor]:
        out = {}
        for name in names:
            geo, lcalls, local = self._linear(module, calls, name)
            out[name] = _LINEAR.squared_norms(geo, lcalls, [local])[local]
        return out

    def weighted_sum_into(self, module: Any, calls: Sequence[Call], names: Sequence[str], weights: Tensor, out: dict[str, Tensor]) -> None:
        for name in names:
            geo, lcalls, local = self._linear(module, calls, name)
            _LINEAR.weighted_sum_into(geo, lcalls, [local], weights, {local: out[name]})

    def dots(self, module: Any, calls: Sequence[Call], names: Sequence[str], others: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for name in names:
            geo, lcalls, local = self._linear(module, calls, name)
            out[name] = _LINEAR.dots(geo, lcalls, [local], {local: others[name]})[local]
        return out

    def can_pool(self, module: Any, other: Any, name: str) -> bool:
        return isinstance(other, RecurrentGeometry) and other.mode == module.mode and other.kinds() == module.kinds()


class _Geo:
    def __init__(self, w: Tensor, local: str) -> None:
        setattr(self, local, w.detach())
        self.local = local

    def get_parameter(self, name: str) -> Tensor:
        return getattr(self, name)


register_rule(nn.RNN, nn.LSTM, nn.GRU, rule=RecurrentRule())
