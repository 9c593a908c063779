"""gradhooks.diagnostics against float64 values computed by hand from the naive
loop's per-sample gradients, in both materialize modes and loss reductions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradhooks import per_sample_grads
from gradhooks.diagnostics import (
    NoiseScale,
    NormStats,
    RunningNoiseScale,
    cosine_to,
    cosine_to_batch,
    mean_gradient,
    noise_scale,
    norm_stats,
)
from tests import reference

TOL = {"rtol": 1e-9, "atol": 1e-12}
QS = (0.1, 0.5, 0.9)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


class SeqNet(nn.Module):
    """Linear on (N, T, in) inputs (the Gram path), then a head on the mean."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(5, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.proj(x)).mean(1))


def flat_input(n: int) -> torch.Tensor:
    return torch.randn(n, 5, dtype=torch.float64)


def seq_input(n: int) -> torch.Tensor:
    return torch.randn(n, 6, 5, dtype=torch.float64)


MODELS = [pytest.param(mlp, flat_input, id="mlp"), pytest.param(SeqNet, seq_input, id="seq")]
MODES = [pytest.param(True, id="materialized"), pytest.param(False, id="lean")]
REDUCTIONS = ["mean", "sum"]


def setup(make_model, make_input, n, reduction, materialize, clip_first=False):
    torch.manual_seed(0)
    model = make_model().double()
    x, y = make_input(n), torch.randint(0, 3, (n,))

    def loss(m, x, y):
        return F.cross_entropy(m(x), y, reduction=reduction)

    ref = reference.naive(model, loss, x, y)
    loss(model, x[:2], y[:2]).backward()  # p.grad holds something before the context
    with per_sample_grads(model, loss_reduction=reduction, materialize=materialize) as g:
        loss(model, x, y).backward()
    if clip_first:
        g.clip_(0.1)  # changes p.grad: the diagnostics must not depend on it
    return model, g, ref


def flat(ref: dict[str, torch.Tensor], names=None) -> torch.Tensor:
    names = list(ref) if names is None else names
    return torch.cat([ref[k].reshape(ref[k].shape[0], -1) for k in names], 1)


def assert_stats(got: NormStats, norms: torch.Tensor) -> None:
    x = norms.numpy()
    assert got.count == len(x)
    want = [x.mean(), x.std(), x.min(), x.max()]
    np.testing.assert_allclose([got.mean, got.std, got.min, got.max], want, rtol=1e-9, atol=1e-12)
    assert list(got.quantiles) == list(QS)
    np.testing.assert_allclose(list(got.quantiles.values()), np.quantile(x, QS), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("materialize", MODES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("n", [1, 9])
@pytest.mark.parametrize("make_model,make_input", MODELS)
def test_norm_stats(make_model, make_input, n, reduction, materialize):
    model, g, ref = setup(make_model, make_input, n, reduction, materialize)
    per_param = norm_stats(g, quantiles=QS)
    assert list(per_param) == list(ref)
    for k in ref:
        assert_stats(per_param[k], ref[k].reshape(n, -1).norm(dim=1))
    layers = norm_stats(g, by="layer", quantiles=QS)
    prefixes = list(dict.fromkeys(k.rpartition(".")[0] for k in ref))
    assert list(layers) == prefixes
    for layer in prefixes:
        assert_stats(layers[layer], flat(ref, [k for k in ref if k.startswith(layer + ".")]).norm(dim=1))
    assert_stats(NormStats.of(g.norms(), QS), flat(ref).norm(dim=1))


@pytest.mark.parametrize("materialize", MODES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("make_model,make_input", MODELS)
@pytest.mark.parametrize("clip_first", [False, True], ids=["", "after-clip"])
def test_noise_scale_mean_gradient_and_cosines(make_model, make_input, reduction, materialize, clip_first):
    n = 9
    model, g, ref = setup(make_model, make_input, n, reduction, materialize, clip_first)
    all_ = flat(ref)
    # By hand: tr(Sigma) = sum of per-coordinate unbiased variances; |G|^2 = |mean|^2 - tr/N.
    trace = all_.var(0, unbiased=True).sum().item()
    grad_sq = all_.mean(0).square().sum().item() - trace / n
    got = noise_scale(g)
    assert got.batch_size == n
    np.testing.assert_allclose([got.trace_cov, got.grad_sq], [trace, grad_sq], rtol=1e-9, atol=1e-12)
    if grad_sq > 0:
        assert got.b_simple == pytest.approx(trace / grad_sq, rel=1e-9)
    else:
        assert got.b_simple is None

    mean = mean_gradient(g)
    for k in ref:
        torch.testing.assert_close(mean[k], ref[k].mean(0), **TOL)
    torch.testing.assert_close(cosine_to_batch(g), F.cosine_similarity(all_, all_.mean(0)[None], dim=1), **TOL)

    first = [k for k in ref if k.endswith("weight")][:1]
    sub = flat(ref, first)
    torch.testing.assert_close(
        cosine_to_batch(g, names=first), F.cosine_similarity(sub, sub.mean(0)[None], dim=1), **TOL
    )
    direction = {k: torch.randn_like(ref[k][0]) for k in ref}
    d = torch.cat([v.reshape(-1) for v in direction.values()])
    torch.testing.assert_close(cosine_to(g, direction), F.cosine_similarity(all_, d[None], dim=1), **TOL)
    sub_trace = sub.var(0, unbiased=True).sum().item()
    assert noise_scale(g, names=first).trace_cov == pytest.approx(sub_trace, rel=1e-9)


def test_noise_scale_estimator_is_unbiased():
    """Over many batches of Gaussian 'gradients' (a Linear with known input and
    output gradient laws) the averaged estimates approach tr(Sigma) and |G|^2."""
    torch.manual_seed(0)
    layer = nn.Linear(1, 2, bias=False).double()
    mu, scale = torch.tensor([1.0, -0.5], dtype=torch.float64), 0.7  # per-sample grad = G_n * x_n, x_n = 1
    traces, sqs = [], []
    for _ in range(200):
        gn = mu + scale * torch.randn(4, 2, dtype=torch.float64)
        with per_sample_grads(layer, loss_reduction="sum", materialize=False) as g:
            (layer(torch.ones(4, 1, dtype=torch.float64)) * gn).sum().backward()
        est = noise_scale(g)
        traces.append(est.trace_cov)
        sqs.append(est.grad_sq)
    assert np.mean(traces) == pytest.approx(2 * scale**2, rel=0.08)
    assert np.mean(sqs) == pytest.approx(mu.square().sum().item(), rel=0.08)


def test_errors_and_edge_cases():
    model, g, ref = setup(mlp, flat_input, 1, "mean", False)
    with pytest.raises(ValueError, match="at least 2 samples"):
        noise_scale(g)
    torch.testing.assert_close(cosine_to_batch(g), torch.ones(1, dtype=torch.float64), **TOL)
    with pytest.raises(KeyError, match="covered parameters"):
        mean_gradient(g, names=["nope"])
    with pytest.raises(ValueError, match="by must be"):
        norm_stats(g, by="module")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="quantiles"):
        NormStats.of(torch.ones(3), quantiles=(1.5,))
    zero = {k: torch.zeros_like(v[0]) for k, v in ref.items()}
    assert torch.equal(cosine_to(g, zero), torch.zeros(1, dtype=torch.float64))
    assert "p50" in str(NormStats.of(torch.arange(4.0)))


def _by_hand(per_sample: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(tr(Sigma), |G|^2) of one batch from its per-sample gradients (unbiased variances)."""
    all_ = flat(per_sample)
    trace = all_.var(0, unbiased=True).sum().item()
    return trace, all_.mean(0).square().sum().item() - trace / all_.shape[0]


@pytest.mark.parametrize("materialize", MODES)
@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9])
def test_running_noise_scale_is_the_normalised_moving_average(materialize, beta):
    """Five batches of different sizes: the tracker's averages against explicit weights
    (1 - beta) beta^(T - t) / (1 - beta^T) on values computed from the naive loop."""
    torch.manual_seed(1)
    model = mlp().double()
    tracker = RunningNoiseScale(beta)
    parts = []
    for n in (3, 7, 5, 9, 4):
        x, y = flat_input(n), torch.randint(0, 3, (n,))

        def loss(m, x, y):
            return F.cross_entropy(m(x), y)

        parts.append(_by_hand(reference.naive(model, loss, x, y)))
        with per_sample_grads(model, materialize=materialize) as g:
            loss(model, x, y).backward()
        model.zero_grad(set_to_none=True)
        step = tracker.update(g)
        np.testing.assert_allclose([step.trace_cov, step.grad_sq], parts[-1], rtol=1e-9, atol=1e-12)
        t = len(parts)
        w = np.array([(1 - beta) * beta ** (t - 1 - k) for k in range(t)]) / (1 - beta**t)
        trace, sq = (w[:, None] * np.array(parts)).sum(0)
        assert tracker.steps == t
        np.testing.assert_allclose([tracker.trace_cov, tracker.grad_sq], [trace, sq], rtol=1e-9, atol=1e-12)
        if sq > 0:
            assert tracker.b_simple == pytest.approx(trace / sq, rel=1e-9) and tracker.reason is None
        else:
            assert tracker.b_simple is None and "<= 0" in (tracker.reason or "")


def test_running_noise_scale_finds_b_where_one_batch_cannot():
    """Gaussian per-sample gradients with known tr(Sigma) and |G|^2 (a Linear with input 1
    and output gradient g_n): one batch of 4 gives no ratio or a wild one; the running
    average over 1500 steps comes within 20% of the true B = tr(Sigma) / |G|^2 (the
    worst of 50 seeds of this estimator was 14% off)."""
    torch.manual_seed(0)
    layer = nn.Linear(1, 2, bias=False).double()
    mu, scale = torch.tensor([0.4, -0.3], dtype=torch.float64), 0.7
    true_b = 2 * scale**2 / mu.square().sum().item()
    tracker, one_batch = RunningNoiseScale(beta=0.999), []
    for _ in range(1500):
        gn = mu + scale * torch.randn(4, 2, dtype=torch.float64)
        with per_sample_grads(layer, loss_reduction="sum", materialize=False) as g:
            (layer(torch.ones(4, 1, dtype=torch.float64)) * gn).sum().backward()
        layer.zero_grad(set_to_none=True)
        one_batch.append(tracker.update(g).b_simple)
    assert sum(b is None for b in one_batch) > 200  # |G|^2's one-batch estimate is often negative
    assert tracker.b_simple == pytest.approx(true_b, rel=0.2)
    assert "b_simple=" in repr(tracker)


def test_running_noise_scale_edge_cases():
    tracker = RunningNoiseScale()
    assert tracker.b_simple is None and tracker.trace_cov is None and "no step yet" in (tracker.reason or "")
    negative = NoiseScale(batch_size=4, trace_cov=1.0, grad_sq=-0.5)
    assert negative.b_simple is None
    assert tracker.update(negative) is negative
    assert tracker.b_simple is None and "-0.5 <= 0" in (tracker.reason or "") and "None (" in repr(tracker)
    tracker.update(NoiseScale(batch_size=4, trace_cov=1.0, grad_sq=2.5))
    assert tracker.grad_sq == pytest.approx((0.99 * 0.01 * -0.5 + 0.01 * 2.5) / (1 - 0.99**2), rel=1e-12)
    assert tracker.b_simple == pytest.approx(1.0 / tracker.grad_sq, rel=1e-12)
    for bad in (1.0, -0.1, True, "0.9"):
        with pytest.raises(ValueError, match="beta must be"):
            RunningNoiseScale(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="names= applies to a PerSampleGrads"):
        tracker.update(negative, names=["w"])
