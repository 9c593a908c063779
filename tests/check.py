"""One comparison of gradhooks against the references, used by the table tests."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gradhooks import per_sample_grads
from tests import reference

TOL = {"rtol": 1e-9, "atol": 1e-12}

#: Both materialize modes; the backward mode comes from ``conftest.py`` (each test
#: runs in both).
MODES = [True, False]


def run(
    model: nn.Module, loss: Callable[..., Tensor], batch: Sequence[Tensor], reduction: str, materialize: bool, **kw: Any
):
    """Forward + backward inside the context; returns ``(g, p.grad added)``."""
    with per_sample_grads(model, loss_reduction=reduction, materialize=materialize, **kw) as g:
        loss(model, *batch).backward()
    added = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
    return g, added


def check_model(
    make_model: Callable[[], nn.Module],
    loss: Callable[..., Tensor],
    batch: Sequence[Tensor],
    reduction: str,
    *,
    max_norm: float = 0.5,
    use_vmap: bool = True,
    tol: dict[str, float] | None = None,
    via_backward: bool = False,
    **kw: Any,
) -> None:
    """Materialized grads, norms, param norms, clip_ and dot in both materialize modes,
    against the naive loop (and torch.func when ``use_vmap``), float64, within
    ``tol`` (default :data:`TOL`). In the one-backward mode with ``materialize=True``,
    ``p.grad`` after exit is the reduction of the per-sample gradients, as in the
    default mode."""
    tolerance = tol or TOL
    torch.manual_seed(1234)
    model = make_model().double()
    ref = reference.naive(model, loss, *batch, via_backward=via_backward)
    if use_vmap:
        ref_v = reference.vmapped(model, loss, *batch)
        for k in ref:
            torch.testing.assert_close(ref_v[k], ref[k], **tolerance)
    n = batch[0].shape[0]
    ref_norms = reference.norms(ref)
    ref_clip, ref_c = reference.clipped(ref, max_norm, reduction)
    others = {k: torch.randn_like(t[0]) for k, t in ref.items()}
    ref_dot = sum(torch.einsum("n...,...->n", ref[k], others[k]) for k in ref)

    for materialize in MODES:
        model.zero_grad(set_to_none=True)
        g, added = run(model, loss, batch, reduction, materialize, **kw)
        assert list(g.keys()) == list(ref.keys())
        assert g.batch_size == n
        if materialize:
            for k in ref:
                assert g[k].shape == (n, *ref[k].shape[1:])
                assert g[k].dtype == torch.float64
                torch.testing.assert_close(g[k], ref[k], **tolerance)
                red = g[k].mean(0) if reduction == "mean" else g[k].sum(0)
                torch.testing.assert_close(red, added.get(k, torch.zeros_like(red)), **tolerance)
        torch.testing.assert_close(g.norms(), ref_norms, **tolerance)
        pn = g.param_norms()
        for k in ref:
            torch.testing.assert_close(pn[k], ref[k].reshape(n, -1).norm(dim=1), **tolerance)
        torch.testing.assert_close(g.dot(others), ref_dot, **tolerance)
        c = g.clip_(max_norm)
        torch.testing.assert_close(c, ref_c, **tolerance)
        for k, p in model.named_parameters():
            if k in ref:
                torch.testing.assert_close(p.grad, ref_clip[k], **tolerance)
