"""Mixed precision: autocast (bf16 on CPU) against float32 references, and
GradScaler (norms and clipping of the unscaled gradients)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradhooks import per_sample_grads
from tests import reference


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(inplace=True), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 5))


def data(n=12, extra=()):
    gen = torch.Generator().manual_seed(3)
    return torch.randn(n, *extra, 16, generator=gen), torch.randint(0, 5, (n,), generator=gen)


def loss_fn(m, x, y):
    out = m(x)
    if out.dim() == 3:
        out = out.mean(1)
    return F.cross_entropy(out.float(), y)


@pytest.mark.parametrize("extra", [(), (3,)], ids=["2d", "seq"])
@pytest.mark.parametrize("materialize", [True, False])
def test_autocast_bf16_matches_float32_reference(materialize, extra):
    model = net()
    x, y = data(extra=extra)
    ref = reference.naive(model, loss_fn, x, y)  # float32, no autocast
    with per_sample_grads(model, materialize=materialize) as g:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(model, x, y)
        loss.backward()
    scale = {k: v.abs().max() for k, v in ref.items()}
    if materialize:
        for k in ref:
            assert g[k].dtype == torch.float32
            torch.testing.assert_close(g[k], ref[k], rtol=5e-2, atol=float(5e-2 * scale[k]))
    norms = g.norms()
    assert norms.dtype == torch.float32
    torch.testing.assert_close(norms, reference.norms(ref), rtol=5e-2, atol=1e-3)
    want, _ = reference.clipped(ref, 0.5, "mean")
    g.clip_(0.5)
    for k, p in model.named_parameters():
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, want[k], rtol=5e-2, atol=float(5e-2 * want[k].abs().max()))


def test_autocast_bf16_parameters_stay_bf16():
    model = net().to(torch.bfloat16)
    x, y = data()
    with per_sample_grads(model) as g:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss_fn(model, x.bfloat16(), y).backward()
    assert all(t.dtype == torch.bfloat16 for t in g.values())
    assert g.norms().dtype == torch.float32
    g.clip_(1.0)
    assert all(p.grad.dtype == torch.bfloat16 for p in model.parameters())


def _scaled_step(materialize, poison=False):
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    x, y = data()
    if poison:
        x[3, 0] = float("inf")
    with per_sample_grads(model, materialize=materialize, grad_scaler=scaler) as g:
        scaler.scale(loss_fn(model, x, y)).backward()
    return model, opt, scaler, g


@pytest.mark.parametrize("materialize", [True, False])
def test_grad_scaler_results_are_unscaled(materialize):
    plain = net()
    x, y = data()
    with per_sample_grads(plain, materialize=materialize) as ref:
        loss_fn(plain, x, y).backward()
    model, opt, scaler, g = _scaled_step(materialize)
    # scaling by a power of two is exact: the results agree to float rounding
    torch.testing.assert_close(g.norms(), ref.norms(), rtol=1e-5, atol=0)
    if materialize:
        for k in ref:
            torch.testing.assert_close(g[k], ref[k], rtol=1e-5, atol=1e-7)
    c = g.clip_(0.5)
    torch.testing.assert_close(c, ref.clip_(0.5), rtol=1e-5, atol=0)
    for p, q in zip(model.parameters(), plain.parameters(), strict=False):
        # p.grad is in the scaler's units, so scaler.step unscales it as usual
        torch.testing.assert_close(p.grad / scaler.get_scale(), q.grad, rtol=1e-5, atol=1e-8)
    scaler.step(opt)
    scaler.update()
    torch.optim.SGD(plain.parameters(), lr=0.1).step()
    for p, q in zip(model.parameters(), plain.parameters(), strict=False):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("materialize", [True, False])
def test_grad_scaler_overflow_skips_the_step(materialize):
    model, opt, scaler, g = _scaled_step(materialize, poison=True)
    start = [p.detach().clone() for p in model.parameters()]
    assert not torch.isfinite(g.norms()[3])
    g.clip_(0.5)  # no FloatingPointError: the scaler handles overflow
    scaler.step(opt)
    scaler.update()
    for p, s in zip(model.parameters(), start, strict=False):
        torch.testing.assert_close(p.detach(), s, rtol=0, atol=0)
    assert scaler.get_scale() < 2.0**12


def test_grad_scaler_must_have_get_scale():
    with pytest.raises(TypeError, match="GradScaler"):
        per_sample_grads(net(), grad_scaler=2.0)  # type: ignore[arg-type]
