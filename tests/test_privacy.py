"""gradhooks.privacy: DP-SGD noise (formula, scale, reproducibility, accumulation),
argument checks, the Poisson sampler, and the accountant wiring to Opacus."""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradhooks import per_sample_grads
from gradhooks.privacy import Accountant, PoissonBatchSampler, add_noise_, epsilon, noise_multiplier_for, privatize_
from tests import reference

TOL = {"rtol": 1e-9, "atol": 1e-12}
N = 8


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 3)).double()


def data(n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen)


def loss_fn(reduction: str):
    return lambda m, x, y: F.cross_entropy(m(x), y, reduction=reduction)


def run(model, reduction, materialize=False, n=N, scaler=None):
    x, y = data(n)
    with per_sample_grads(model, loss_reduction=reduction, materialize=materialize, grad_scaler=scaler) as g:
        loss = loss_fn(reduction)(model, x, y)
        (loss if scaler is None else scaler.scale(loss)).backward()
    return g


def grads(model) -> dict[str, torch.Tensor | None]:
    return {k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()}


def draws(model, seed, sigma_c):
    gen = torch.Generator().manual_seed(seed)
    return {k: sigma_c * torch.randn(p.shape, generator=gen, dtype=p.dtype) for k, p in model.named_parameters()}


# divisor of the clipped sum and the noise: N for "mean", 1 for "sum", L when given.
CASES = [
    pytest.param("mean", None, N, id="mean"),
    pytest.param("sum", None, 1.0, id="sum"),
    pytest.param("sum", 5.5, 5.5, id="sum-expected_batch_size"),
    pytest.param("mean", 5.5, 5.5, id="mean-expected_batch_size"),
]


@pytest.mark.parametrize("materialize", [True, False], ids=["materialized", "lean"])
@pytest.mark.parametrize("reduction,expected,div", CASES)
def test_formula_with_accumulation(reduction, expected, div, materialize):
    """p.grad = before + (sum_n c_n g_n + sigma C z) / D, z the generator's draws in key order."""
    model = net()
    x, y = data()
    loss_fn(reduction)(model, x[:3], y[:3]).backward()  # an earlier micro-batch
    prior = grads(model)
    g = run(model, reduction, materialize)
    ref = reference.naive(model, loss_fn(reduction), x, y)
    summed, want_c = reference.clipped(ref, 0.4, "sum")
    c = privatize_(g, max_norm=0.4, noise_multiplier=1.3, expected_batch_size=expected,
                   generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(c, want_c, **TOL)
    z = draws(model, 7, 1.3 * 0.4)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, prior[k] + (summed[k] + z[k]) / div, **TOL)
    # A second call redraws the noise; it never stacks.
    privatize_(g, max_norm=0.4, noise_multiplier=1.3, expected_batch_size=expected,
               generator=torch.Generator().manual_seed(8))
    z = draws(model, 8, 1.3 * 0.4)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, prior[k] + (summed[k] + z[k]) / div, **TOL)


@pytest.mark.parametrize("reduction,expected,div", CASES)
def test_noise_std_matches_formula(reduction, expected, div):
    """Empirical std of p.grad - clipped over seeded draws is sigma C / D (within 3%:
    a scale off by N = 8 or sqrt(N) fails)."""
    model = net()
    g = run(model, reduction)
    privatize_(g, max_norm=0.5, noise_multiplier=0.0, expected_batch_size=expected)
    clean = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    gen = torch.Generator().manual_seed(123)
    noise = []
    for _ in range(40):  # 40 draws x 323 coordinates
        privatize_(g, max_norm=0.5, noise_multiplier=2.0, expected_batch_size=expected, generator=gen)
        noise.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]) - clean)
    noise = torch.stack(noise)
    want = 2.0 * 0.5 / div
    assert abs(noise.std().item() / want - 1) < 0.03
    assert abs(noise.mean().item()) < 0.03 * want


def test_same_seed_same_step_and_global_rng_when_none():
    model = net()
    g = run(model, "mean")
    steps = []
    for seed in (3, 3, 4):
        privatize_(g, max_norm=1.0, noise_multiplier=1.0, generator=torch.Generator().manual_seed(seed))
        steps.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    assert torch.equal(steps[0], steps[1])
    assert not torch.allclose(steps[0], steps[2])
    torch.manual_seed(5)
    privatize_(g, max_norm=1.0, noise_multiplier=1.0)
    a = grads(model)
    torch.manual_seed(5)
    privatize_(g, max_norm=1.0, noise_multiplier=1.0)
    for k, p in model.named_parameters():
        assert torch.equal(p.grad, a[k])


def test_grad_scaler_units():
    """Under a GradScaler, clip_ writes scaled p.grad; the noise is scaled with it."""
    model = net()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**6)
    g = run(model, "sum", scaler=scaler)
    x, y = data()
    summed, _ = reference.clipped(reference.naive(model, loss_fn("sum"), x, y), 0.4, "sum")
    privatize_(g, max_norm=0.4, noise_multiplier=1.5, expected_batch_size=4.0,
               generator=torch.Generator().manual_seed(2))
    z = draws(model, 2, 1.5 * 0.4)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 2.0**6 * (summed[k] + z[k]) / 4.0, **TOL)


def test_add_noise_for_an_empty_batch():
    model = net()
    add_noise_(model.parameters(), std=0.25, generator=torch.Generator().manual_seed(9))
    z = draws(model, 9, 0.25)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, z[k], **TOL)


BAD = [
    pytest.param({"max_norm": 0.0}, "max_norm must be a finite positive", id="max_norm-zero"),
    pytest.param({"max_norm": float("nan")}, "max_norm", id="max_norm-nan"),
    pytest.param({"max_norm": True}, "max_norm", id="max_norm-bool"),
    pytest.param({"noise_multiplier": -1.0}, "noise_multiplier must be a finite number >= 0", id="sigma-negative"),
    pytest.param({"noise_multiplier": float("inf")}, "noise_multiplier", id="sigma-inf"),
    pytest.param({"expected_batch_size": 0}, "sample_rate \\* dataset_size", id="expected-zero"),
]


@pytest.mark.parametrize("change,match", BAD)
def test_bad_arguments_leave_p_grad_alone(change, match):
    model = net()
    g = run(model, "mean")
    before = grads(model)
    kw = {"max_norm": 1.0, "noise_multiplier": 1.0, **change}
    with pytest.raises(ValueError, match=match):
        privatize_(g, **kw)
    for k, p in model.named_parameters():
        assert (p.grad is None and before[k] is None) or torch.equal(p.grad, before[k])


def test_generator_checks():
    model = net()
    g = run(model, "mean")
    with pytest.raises(TypeError, match="torch.Generator"):
        privatize_(g, max_norm=1.0, noise_multiplier=1.0, generator=7)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="PerSampleGrads"):
        privatize_(model, max_norm=1.0, noise_multiplier=1.0)  # type: ignore[arg-type]
    meta = nn.Parameter(torch.empty(3, device="meta"))
    with pytest.raises(ValueError, match=r"generator is on cpu but a parameter is on meta.*device='meta'"):
        add_noise_([meta], std=1.0, generator=torch.Generator())


def test_poisson_sampler():
    s = PoissonBatchSampler(1000, 0.05, generator=torch.Generator().manual_seed(0))
    batches = list(s)
    assert len(s) == len(batches) == 20 and s.expected_batch_size == pytest.approx(50.0)
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.float64)
    assert len(set(sizes.tolist())) > 3  # sizes vary
    assert abs(sizes.mean().item() - 50) < 3 * math.sqrt(50 * 0.95 / 20)
    assert all(b == sorted(set(b)) and all(0 <= i < 1000 for i in b) for b in batches)
    again = list(PoissonBatchSampler(1000, 0.05, generator=torch.Generator().manual_seed(0)))
    assert again == batches
    tiny = list(PoissonBatchSampler(10, 0.01, steps=50, generator=torch.Generator().manual_seed(0)))
    assert [] in tiny and len(tiny) == 50
    for kw in ({"dataset_size": 0, "sample_rate": 0.1}, {"dataset_size": 10, "sample_rate": 0.0},
               {"dataset_size": 10, "sample_rate": 1.5}, {"dataset_size": 10, "sample_rate": 0.1, "steps": 0}):
        with pytest.raises(ValueError):
            PoissonBatchSampler(**kw)


ACCOUNTED = [
    pytest.param("rdp", 1.1, 0.01, 1000, 1e-5, id="rdp"),
    pytest.param("rdp", 0.8, 0.05, 300, 1e-6, id="rdp-noisier"),
    pytest.param("prv", 1.1, 0.01, 1000, 1e-5, id="prv"),
]


@pytest.mark.parametrize("mechanism,sigma,q,steps,delta", ACCOUNTED)
def test_epsilon_is_opacus(mechanism, sigma, q, steps, delta):
    accountants = pytest.importorskip("opacus.accountants")
    theirs = accountants.create_accountant(mechanism)
    for _ in range(steps):
        theirs.step(noise_multiplier=sigma, sample_rate=q)
    want = theirs.get_epsilon(delta=delta)
    assert epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta, mechanism=mechanism) == want
    ours = Accountant(mechanism)
    assert ours.epsilon(delta) == 0.0
    ours.step(noise_multiplier=sigma, sample_rate=q, steps=steps // 2)
    for _ in range(steps - steps // 2):
        ours.step(noise_multiplier=sigma, sample_rate=q)
    assert ours.steps == steps and ours.epsilon(delta) == want
    assert 0.1 < want < 50


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")  # opacus' own search, low sigmas
def test_mixed_steps_and_noise_multiplier_for():
    accountants = pytest.importorskip("opacus.accountants")
    theirs = accountants.RDPAccountant()
    ours = Accountant("rdp")
    for sigma, q, k in ((1.0, 0.02, 30), (2.0, 0.02, 10), (1.0, 0.04, 5)):
        ours.step(noise_multiplier=sigma, sample_rate=q, steps=k)
        for _ in range(k):
            theirs.step(noise_multiplier=sigma, sample_rate=q)
    assert ours.epsilon(1e-5) == theirs.get_epsilon(delta=1e-5)
    from opacus.accountants.utils import get_noise_multiplier

    want = get_noise_multiplier(target_epsilon=3.0, target_delta=1e-5, sample_rate=0.02, steps=500)
    assert noise_multiplier_for(target_epsilon=3.0, delta=1e-5, sample_rate=0.02, steps=500) == want


def test_accountant_errors(monkeypatch):
    pytest.importorskip("opacus.accountants")
    with pytest.raises(ValueError, match="'rdp' or 'prv'"):
        Accountant("gdp")  # type: ignore[arg-type]
    acc = Accountant()
    with pytest.raises(ValueError, match="sample_rate"):
        acc.step(noise_multiplier=1.0, sample_rate=0.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        acc.step(noise_multiplier=0.0, sample_rate=0.1)
    with pytest.raises(ValueError, match="delta"):
        acc.epsilon(0.0)
    monkeypatch.setitem(sys.modules, "opacus.accountants", None)
    with pytest.raises(ImportError, match=r"gradhooks\[privacy\]"):
        Accountant()
