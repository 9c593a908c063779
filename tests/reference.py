"""Independent references for per-sample gradients: the naive loop and torch.func.

Both take ``loss(model_fn, *batch) -> scalar``: the loss of a batch computed
through ``model_fn`` (the model, or a functional call of it), with the same
reduction the test passes to ``per_sample_grads``. The references evaluate it
on one sample at a time, so sample n's gradient is that of its own loss term
(for a "mean" loss over a batch of one that is the sample's own loss).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

Loss = Callable[..., Tensor]


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {k: p for k, p in model.named_parameters() if p.requires_grad}


def naive(model: nn.Module, loss: Loss, *batch: Tensor, shared: Sequence[Any] = (), via_backward: bool = False) -> dict[str, Tensor]:
    """One ``torch.autograd.grad`` per sample: ``{name: (N, *p.shape)}``.

    ``batch`` tensors are sliced per sample; ``shared`` arguments are passed whole.
    ``via_backward``: one ``backward()`` per sample instead (what a reentrant
    checkpoint needs); ``p.grad`` is restored afterwards.
    """
    params = trainable(model)
    n = batch[0].shape[0]
    out: dict[str, list[Tensor]] = {k: [] for k in params}
    saved = {k: p.grad for k, p in params.items()}
    for i in range(n):
        sample = [b[i : i + 1] for b in batch]
        value = loss(model, *sample, *shared)
        if via_backward:
            for p in params.values():
                p.grad = None
            value.backward()
            grads = [p.grad for p in params.values()]
        else:
            grads = torch.autograd.grad(value, list(params.values()), allow_unused=True)
        for (k, p), g_ in zip(params.items(), grads, strict=False):
            out[k].append(torch.zeros_like(p) if g_ is None else g_)
    for k, p in params.items():
        p.grad = saved[k]
    return {k: torch.stack(v) for k, v in out.items()}


def vmapped(model: nn.Module, loss: Loss, *batch: Tensor, shared: Sequence[Any] = ()) -> dict[str, Tensor]:
    """``vmap(grad(...))`` with ``functional_call``: ``{name: (N, *p.shape)}``."""
    params = {k: p.detach() for k, p in trainable(model).items()}
    buffers = {k: b for k, b in model.named_buffers()}

    def one(p: dict[str, Tensor], *sample: Tensor) -> Tensor:
        def fn(*a: Any, **kw: Any) -> Any:
            return functional_call(model, (p, buffers), a, kw)

        return loss(fn, *[s.unsqueeze(0) for s in sample], *shared)

    return vmap(grad(one), in_dims=(None, *([0] * len(batch))))(params, *batch)


def clipped(per_sample: dict[str, Tensor], max_norm: float, reduction: str) -> tuple[dict[str, Tensor], Tensor]:
    """Reference clipping: ``(reduce_n(c_n g_n) per name, c)``."""
    flat = torch.cat([t.reshape(t.shape[0], -1) for t in per_sample.values()], 1)
    norms = flat.norm(dim=1)
    c = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    out = {}
    for k, t in per_sample.items():
        s = torch.einsum("n,n...->...", c.to(t.dtype), t)
        out[k] = s / t.shape[0] if reduction == "mean" else s
    return out, c


def norms(per_sample: dict[str, Tensor]) -> Tensor:
    return torch.cat([t.reshape(t.shape[0], -1) for t in per_sample.values()], 1).norm(dim=1)
