"""Clipping styles (per-group with per-group thresholds, automatic, adaptive): their
factors on a per_sample_grads result against the naive loop (both backward modes,
materialized or not), and whole DPSGD runs (micro-batches, empty batches, noise)
against the replayed reference, including adaptive clipping's private quantile."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gradhooks import per_sample_grads
from gradhooks.privacy import AdaptiveClipping, AutomaticClipping, FlatClipping, PerGroupClipping
from tests import reference
from tests.dp_reference import dataset, factors, loss_of, make, net, replay, run_and_capture

TOL = {"rtol": 1e-9, "atol": 1e-12}
EXPLICIT = {"first": ["0.weight", "2.bias"], "rest": ["0.bias", "2.weight"]}

STYLES = [
    pytest.param(lambda: FlatClipping(0.5), {"kind": "flat", "C": 0.5}, id="flat"),
    pytest.param(lambda: PerGroupClipping(0.3, groups="parameter"),
                 {"kind": "group", "C": 0.3, "groups": "parameter"}, id="per-parameter"),
    pytest.param(lambda: PerGroupClipping({"0": 0.2, "2": 0.7}, groups="module"),
                 {"kind": "group", "C": {"0": 0.2, "2": 0.7}, "groups": "module"}, id="per-module-thresholds"),
    pytest.param(lambda: PerGroupClipping({"first": 0.4, "rest": 0.1}, groups=EXPLICIT),
                 {"kind": "group", "C": {"first": 0.4, "rest": 0.1}, "groups": EXPLICIT}, id="explicit-groups"),
    pytest.param(lambda: AutomaticClipping(), {"kind": "automatic", "C": 1.0, "gamma": 0.01}, id="automatic"),
    pytest.param(lambda: AutomaticClipping(gamma=0.1, max_norm=0.5), {"kind": "automatic", "C": 0.5, "gamma": 0.1}, id="automatic-C"),
    pytest.param(lambda: AdaptiveClipping(0.5, target_quantile=0.3, learning_rate=0.5, count_noise_std=2.0),
                 {"kind": "adaptive", "C": 0.5, "q": 0.3, "lr": 0.5, "count_std": 2.0}, id="adaptive"),
]


@pytest.mark.parametrize("materialize", [False, True], ids=["lean", "materialized"])
@pytest.mark.parametrize("make_style,spec", STYLES)
def test_factors_match_the_naive_loop(make_style, spec, materialize):
    model = net()
    x, y = dataset(9)
    style = make_style()
    style.bind([k for k, _ in model.named_parameters()], 6.0)
    with per_sample_grads(model, loss_reduction="sum", materialize=materialize) as g:
        loss_of("sum")(model, x, y).backward()
    got = style.factors(g, g.norms())
    want = factors(reference.naive(model, loss_of("sum"), x, y), spec)
    assert [names for names, _ in got] == [names for names, _ in want]
    for (_, a), (_, b) in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.backward_mode("one")  # DPSGD chooses one_backward=True itself
@pytest.mark.parametrize("L,micro", [(6.0, 2), (0.8, None)], ids=["micro2", "mostly-empty"])
@pytest.mark.parametrize("make_style,spec", STYLES)
def test_dpsgd_runs_match_the_reference(make_style, spec, L, micro):
    model = net()
    x, y = dataset()
    style = make_style()
    dp, opt = make(model, max_norm=None, clipping=style, expected_batch_size=L, max_physical_batch_size=micro)
    got, _ = run_and_capture(dp, opt, model, x, y)
    want, ref = replay(net(), x, y, L=L, sigma=0.9, style=dict(spec))
    assert len(got) == len(want)
    for g_step, (w_step, _) in zip(got, want, strict=True):
        for k in w_step:
            torch.testing.assert_close(g_step[k], w_step[k], **TOL)
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_automatic_clipping_bounds_every_contribution():
    """||c_n g_n|| = C ||g_n|| / (||g_n|| + gamma) < C, the sensitivity the noise uses."""
    model = net()
    x, y = dataset(9)
    with per_sample_grads(model, loss_reduction="sum", materialize=False) as g:
        (1e4 * loss_of("sum")(model, x, y)).backward()
    style = AutomaticClipping(gamma=0.01, max_norm=0.5)
    [(_, c)] = style.factors(g, g.norms())
    contribution = c * g.norms()
    assert bool((contribution < 0.5).all()) and style.sensitivity() == 0.5
    assert float(contribution.max()) > 0.49  # large gradients are normalized, not clipped away


@pytest.mark.backward_mode("one")
def test_adaptive_threshold_follows_the_quantile_on_empty_batches_too():
    """The noised count is divided by the expected batch size: an empty batch is
    fine (Opacus divides by the realised size). Without noise on the count the
    threshold converges toward the target quantile of the norms."""
    model = net()
    x, y = dataset()
    with per_sample_grads(model, loss_reduction="sum", materialize=False) as g:
        loss_of("sum")(model, x, y).backward()
    median = float(g.norms().median())
    style = AdaptiveClipping(median * 20, target_quantile=0.5, learning_rate=0.3, count_noise_std=1e-9)
    dp, _ = make(model, lr=0.0, max_norm=None, clipping=style, expected_batch_size=20.0, noise_multiplier=0.0)
    for idx in dp.batches(epochs=40):
        with dp.step():
            loss_of("sum")(model, x[idx], y[idx]).backward()
    assert abs(math.log(style.max_norm / median)) < 0.4, (style.max_norm, median)
    sparse, _ = make(net(), max_norm=None, clipping=AdaptiveClipping(1.0, count_noise_std=1.0), expected_batch_size=1.0)
    taken = 0
    for idx in sparse.batches(epochs=2):  # 80 steps, about a third of them empty
        taken += 1
        with sparse.step():
            loss_of("sum")(sparse.model, x[idx], y[idx]).backward()
    assert math.isfinite(sparse.clipping.max_norm) and sparse.steps == 80 and taken < 70


def test_adaptive_noise_split_and_its_limit():
    style = AdaptiveClipping(1.0, count_noise_std=2.0)
    assert style.gradient_noise_multiplier(1.0) == pytest.approx((1.0 - 1 / 16) ** -0.5)
    with pytest.raises(ValueError, match="count_noise_std"):
        style.gradient_noise_multiplier(4.0)
    with pytest.raises(ValueError, match="count_noise_std"):
        make(net(), max_norm=None, clipping=AdaptiveClipping(1.0, count_noise_std=0.1), noise_multiplier=1.0)
    default = AdaptiveClipping(1.0)
    default.bind(["w"], 256.0)
    assert default.statistic_noise_std == 256.0 / 20


@pytest.mark.parametrize("groups,max_norm,match", [
    ({"a": ["0.weight"]}, 1.0, r"in no group \(they would not be clipped\): \['0.bias', '2.weight', '2.bias'\]"),
    ({"a": ["0.weight", "0.bias", "2.weight", "2.bias", "3.weight"]}, 1.0, r"not trainable parameters: \['3.weight'\]"),
    ({"a": ["0.weight", "0.bias"], "b": ["0.bias", "2.weight", "2.bias"]}, 1.0, "'0.bias' is in groups 'a' and 'b'"),
    ("module", {"0": 1.0}, r"max_norm names groups \['0'\] but the groups are \['0', '2'\]"),
    ("layer", 1.0, "groups must be 'parameter', 'module' or a mapping"),
])
def test_per_group_refuses_groupings_that_leave_parameters_unclipped(groups, max_norm, match):
    with pytest.raises(ValueError, match=match):
        make(net(), max_norm=None, clipping=PerGroupClipping(max_norm, groups=groups))


@pytest.mark.backward_mode("one")
def test_a_frozen_parameter_needs_no_group():
    model = net()
    model[0].weight.requires_grad_(False)
    x, y = dataset()
    style = PerGroupClipping(0.5, groups={"g": ["0.bias", "2.weight", "2.bias"]})
    dp, _ = make(model, max_norm=None, clipping=style)
    for idx in dp.batches(epochs=1):
        with dp.step():
            F.cross_entropy(model(x[idx]), y[idx], reduction="sum").backward()
    assert model[0].weight.grad is None
