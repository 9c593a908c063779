"""gradhooks.privacy's low-level steps: noise (formula, scale, reproducibility, one draw
per logical batch), the hazards they refuse (frozen parameters, strict=False results,
noise on an accumulated gradient), argument checks, the Poisson sampler, and the
accountant wiring to Opacus (including its state dict)."""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradhooks import GradhooksError, per_sample_grads
from gradhooks.privacy import (
    Accountant,
    DPUsageError,
    PoissonBatchSampler,
    UncoveredParameterError,
    add_noise_,
    epsilon,
    noise_multiplier_for,
    privatize_,
)
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
def test_formula(reduction, expected, div, materialize):
    """p.grad = (sum_n c_n g_n + sigma C z) / D, z the generator's draws in key order."""
    model = net()
    x, y = data()
    g = run(model, reduction, materialize)
    ref = reference.naive(model, loss_fn(reduction), x, y)
    summed, want_c = reference.clipped(ref, 0.4, "sum")
    c = privatize_(g, max_norm=0.4, noise_multiplier=1.3, expected_batch_size=expected,
                   generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(c, want_c, **TOL)
    z = draws(model, 7, 1.3 * 0.4)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, (summed[k] + z[k]) / div, **TOL)
    # A second call redraws the noise; it never stacks.
    privatize_(g, max_norm=0.4, noise_multiplier=1.3, expected_batch_size=expected,
               generator=torch.Generator().manual_seed(8))
    z = draws(model, 8, 1.3 * 0.4)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, (summed[k] + z[k]) / div, **TOL)


@pytest.mark.parametrize("reduction,expected,div", CASES)
def test_micro_batches_clip_then_one_noise_draw(reduction, expected, div):
    """Clipping alone composes with accumulation; add_noise_ once gives the one-draw step."""
    model = net()
    x, y = data()
    parts = [(x[:3], y[:3]), (x[3:], y[3:])]
    want = None
    for xs, ys in parts:
        with per_sample_grads(model, loss_reduction=reduction, materialize=False) as g:
            loss_fn(reduction)(model, xs, ys).backward()
        privatize_(g, max_norm=0.4, noise_multiplier=0.0, expected_batch_size=expected)
        part, _ = reference.clipped(reference.naive(model, loss_fn(reduction), xs, ys), 0.4, "sum")
        d = div if expected is not None else (len(xs) if reduction == "mean" else 1.0)
        want = {k: v / d for k, v in part.items()} if want is None else {k: want[k] + v / d for k, v in part.items()}
    add_noise_(model.parameters(), std=1.3 * 0.4 / div, generator=torch.Generator().manual_seed(7))
    z = draws(model, 7, 1.3 * 0.4)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[k] + z[k] / div, **TOL)


def test_noise_on_an_accumulated_gradient_is_refused():
    """Full sigma on every micro-batch (twice the noise the accountant counts) raises;
    p.grad is left as it was."""
    model = net()
    x, y = data()
    loss_fn("sum")(model, x[:3], y[:3]).backward()  # an earlier micro-batch, or a step not cleared
    g = run(model, "sum")
    left = grads(model)
    with pytest.raises(DPUsageError, match="noise_multiplier=0 and call add_noise_ once") as info:
        privatize_(g, max_norm=0.4, noise_multiplier=1.3, expected_batch_size=4.0)
    assert isinstance(info.value, GradhooksError)
    assert all(torch.equal(p.grad, left[k]) for k, p in model.named_parameters())
    privatize_(g, max_norm=0.4, noise_multiplier=0.0, expected_batch_size=4.0)  # clipping alone: fine


def test_add_noise_leaves_frozen_parameters_alone():
    """An empty step with SGD(model.parameters()) must not move frozen weights (nor reveal
    the empty step by moving them); trainable ones get exactly the generator's draws."""
    model = net()
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    opt.zero_grad(set_to_none=True)
    add_noise_(model.parameters(), std=0.25, generator=torch.Generator().manual_seed(9))
    assert model[0].weight.grad is None
    gen = torch.Generator().manual_seed(9)
    for p in model.parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, 0.25 * torch.randn(p.shape, generator=gen, dtype=p.dtype), **TOL)
    opt.step()
    assert torch.equal(model[0].weight, frozen)


def test_add_noise_for_an_empty_batch_draws_once_per_parameter():
    model = net()
    params = list(model.parameters())
    add_noise_(params + params[:1], std=0.25, generator=torch.Generator().manual_seed(9))
    z = draws(model, 9, 0.25)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, z[k], **TOL)


class Unruled(nn.Module):
    """A parameter used through an op with no per-sample rule (a transposed conv)."""

    def __init__(self) -> None:
        super().__init__()
        self.centers = nn.Parameter(torch.randn(1, 1, 1, dtype=torch.float64))

    def forward(self, x):
        return F.conv_transpose1d(x.unsqueeze(1), self.centers).squeeze(1)


@pytest.mark.backward_mode("default")  # one_backward=True refuses strict=False skips itself
def test_privatize_refuses_a_result_that_left_parameters_out():
    """strict=False leaves '1.centers' with its raw gradient: privatizing would release it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), Unruled(), nn.Linear(6, 3)).double()
    x, y = data()
    with pytest.warns(UserWarning, match="strict=False"):
        with per_sample_grads(model, loss_reduction="sum", materialize=False, strict=False) as g:
            loss_fn("sum")(model, x, y).backward()
    raw = grads(model)
    with pytest.raises(UncoveredParameterError, match=r"\['1.centers'\].*requires_grad_\(False\)") as info:
        privatize_(g, max_norm=1.0, noise_multiplier=1.0, expected_batch_size=4.0)
    assert isinstance(info.value, GradhooksError)
    for k, p in model.named_parameters():
        assert torch.equal(p.grad, raw[k])
    g.clip_(1.0)  # plain clipping of a partial result stays allowed (not a privacy claim)
    # Frozen, the same model privatizes.
    model[1].centers.requires_grad_(False)
    model.zero_grad(set_to_none=True)
    with per_sample_grads(model, loss_reduction="sum", materialize=False) as g:
        loss_fn("sum")(model, x, y).backward()
    privatize_(g, max_norm=1.0, noise_multiplier=1.0, expected_batch_size=4.0)
    assert model[1].centers.grad is None


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


def test_accountant_and_sampler_state_round_trip(tmp_path):
    """Saved and loaded with torch.load(weights_only=True): the same epsilon, the same batches next."""
    pytest.importorskip("opacus.accountants")
    acc = Accountant("rdp")
    acc.step(noise_multiplier=1.1, sample_rate=0.01, steps=40)
    acc.step(noise_multiplier=2.0, sample_rate=0.01, steps=5)
    sampler = PoissonBatchSampler(100, 0.1, generator=torch.Generator().manual_seed(3))
    next(iter(sampler))
    torch.save({"acc": acc.state_dict(), "sampler": sampler.state_dict()}, tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    again = Accountant("rdp")
    again.load_state_dict(state["acc"])
    assert again.steps == 45 and again.epsilon(1e-5) == acc.epsilon(1e-5)
    resumed = PoissonBatchSampler(100, 0.1, generator=torch.Generator())
    resumed.load_state_dict(state["sampler"])
    assert resumed.draw().tolist() == sampler.draw().tolist()
    with pytest.raises(ValueError, match="mechanism"):
        Accountant("prv").load_state_dict(state["acc"])
    with pytest.raises(ValueError, match="dataset_size"):
        PoissonBatchSampler(99, 0.1).load_state_dict(state["sampler"])
