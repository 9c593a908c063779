"""nn.Conv1d/2d/3d: per-sample gradients, norms, clipping and dot products against
the naive loop and torch.func, float64, for every geometry option the README names
(stride, padding incl. "same" with even kernels and "valid", dilation, groups incl.
depthwise, bias, every padding_mode), repeated calls and tied weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradhooks import per_sample_grads
from gradhooks.capture import Call
from gradhooks.rules import conv as conv_rule
from gradhooks.uses import conv as conv_use
from tests import reference
from tests.check import check_model

CLASSES = 3

# PyTorch's own forward warns about 'same' with even kernels; the cases use it on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")


class Head(nn.Module):
    """``body`` then tanh, flatten and a Linear to ``CLASSES`` logits."""

    def __init__(self, body: nn.Module, in_shape: tuple[int, ...], inplace_relu: bool = False) -> None:
        super().__init__()
        self.body = body
        self.act = nn.ReLU(inplace=True) if inplace_relu else nn.Tanh()
        with torch.no_grad():
            feat = body(torch.zeros(1, *in_shape)).numel()
        self.fc = nn.Linear(feat, CLASSES)

    def forward(self, x):
        return self.fc(self.act(self.body(x)).flatten(1))


class Twice(nn.Module):
    """One conv called twice in a forward (shape-preserving, so it can repeat)."""

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return self.conv(torch.tanh(self.conv(x)))


class Tied(nn.Module):
    """Two conv modules sharing one weight Parameter, each with its own bias."""

    def __init__(self, a: nn.Module, b: nn.Module) -> None:
        super().__init__()
        self.a, self.b = a, b
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


class TiedBias(nn.Module):
    """A Conv2d and a Conv1d of other geometry sharing one bias Parameter."""

    def __init__(self, a: nn.Module, b: nn.Module) -> None:
        super().__init__()
        self.a, self.b = a, b
        self.b.bias = self.a.bias

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return h + self.b(h.flatten(2)).mean(2)[..., None, None]


def _frozen_weight(conv: nn.Module) -> nn.Module:
    conv.weight.requires_grad_(False)
    return conv


def c1(*a, **kw):
    return nn.Conv1d(*a, **kw)


def c2(*a, **kw):
    return nn.Conv2d(*a, **kw)


def c3(*a, **kw):
    return nn.Conv3d(*a, **kw)


# id, body factory, input shape after N
CASES = [
    ("1d", lambda: c1(2, 3, 3), (2, 9)),
    ("1d-stride2-pad1", lambda: c1(2, 3, 3, stride=2, padding=1), (2, 9)),
    ("1d-same-even-dil2", lambda: c1(2, 3, 4, padding="same", dilation=2), (2, 9)),
    ("1d-reflect", lambda: c1(2, 3, 3, padding=2, padding_mode="reflect"), (2, 7)),
    ("1d-circular-same-even", lambda: c1(2, 3, 4, padding="same", padding_mode="circular"), (2, 7)),
    ("2d", lambda: c2(3, 4, 3), (3, 5, 5)),
    ("2d-stride-pad-tuples", lambda: c2(2, 3, (3, 2), stride=(2, 1), padding=(1, 2)), (2, 6, 5)),
    ("2d-same-even", lambda: c2(2, 3, (2, 4), padding="same"), (2, 5, 6)),
    ("2d-valid-dil", lambda: c2(2, 3, 3, padding="valid", dilation=(2, 1)), (2, 7, 5)),
    ("2d-groups2", lambda: c2(4, 6, 3, padding=1, groups=2), (4, 4, 4)),
    ("2d-depthwise", lambda: c2(3, 6, 3, padding=1, groups=3), (3, 4, 4)),
    ("2d-nobias", lambda: c2(2, 3, 3, bias=False), (2, 5, 5)),
    ("2d-reflect", lambda: c2(2, 3, 3, padding=1, padding_mode="reflect"), (2, 4, 5)),
    ("2d-replicate-stride", lambda: c2(2, 3, 3, stride=2, padding=(2, 1), padding_mode="replicate"), (2, 5, 5)),
    ("2d-circular-same-even", lambda: c2(2, 3, (2, 3), padding="same", padding_mode="circular"), (2, 4, 5)),
    ("3d", lambda: c3(2, 3, 2), (2, 3, 4, 3)),
    ("3d-stride-replicate", lambda: c3(2, 3, 3, stride=2, padding=1, padding_mode="replicate"), (2, 4, 3, 3)),
    ("3d-groups-same-even", lambda: c3(2, 4, 2, padding="same", groups=2, bias=False), (2, 3, 3, 3)),
    ("stack-2d", lambda: nn.Sequential(c2(2, 4, 3, padding=1), nn.Tanh(), c2(4, 3, 3, stride=2)), (2, 6, 6)),
    ("called-twice", lambda: Twice(c2(2, 2, 3, padding=1)), (2, 4, 4)),
    ("called-twice-reflect-1d", lambda: Twice(c1(2, 2, 3, padding=1, padding_mode="reflect")), (2, 6)),
    ("tied", lambda: Tied(c2(2, 2, 3, padding=1), c2(2, 2, 3, padding=1)), (2, 4, 4)),
    ("tied-depthwise", lambda: Tied(c2(2, 2, 3, padding=1, groups=2), c2(2, 2, 3, padding="same", groups=2)), (2, 4, 4)),
    ("tied-unpoolable", lambda: Tied(c2(2, 2, 3, padding=1), c2(2, 2, 3, stride=2)), (2, 5, 5)),
    ("tied-bias-only", lambda: TiedBias(c2(2, 2, 3, padding=1), c1(2, 2, 2, stride=2)), (2, 4, 4)),
    ("frozen-weight", lambda: _frozen_weight(c2(2, 3, 3, padding=1)), (2, 4, 4)),
]


def _model(body, shape, inplace_relu=False):
    return lambda: Head(body(), shape, inplace_relu)


def ce(reduction):
    return lambda m, x, y: F.cross_entropy(m(x), y, reduction=reduction)


def _batch(n, shape):
    return torch.randn(n, *shape, dtype=torch.float64), torch.randint(0, CLASSES, (n,))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_conv_against_references(case, n, reduction):
    _, body, shape = case
    torch.manual_seed(n)
    check_model(_model(body, shape), ce(reduction), _batch(n, shape), reduction, use_vmap=n > 1)


@pytest.mark.parametrize("body,shape", [(lambda: c2(2, 3, 3, padding=1), (2, 4, 4)), (lambda: c1(2, 3, 3), (2, 6))], ids=["2d", "1d"])
def test_inplace_relu_after_conv(body, shape):
    torch.manual_seed(0)
    check_model(lambda: Head(body(), shape, inplace_relu=True), ce("mean"), _batch(4, shape), "mean", use_vmap=False)


FORCED = ["called-twice", "tied", "tied-depthwise", "2d-circular-same-even", "3d-stride-replicate", "stack-2d"]


@pytest.mark.parametrize("gram_cost", [0.0, 1e12], ids=["gram", "materialize"])
@pytest.mark.parametrize("case", [c for c in CASES if c[0] in FORCED], ids=FORCED)
def test_each_norm_branch_end_to_end(case, gram_cost, monkeypatch):
    """GRAM_COST 0 always takes the Gram form, a huge one never; both are exact.
    One-sample blocks exercise the blocking."""
    monkeypatch.setattr(conv_rule, "GRAM_COST", gram_cost)
    monkeypatch.setattr(conv_rule, "CHUNK_ELEMS", 1)
    _, body, shape = case
    torch.manual_seed(2)
    check_model(_model(body, shape), ce("sum"), _batch(3, shape), "sum", use_vmap=False)


NORM_CASES = [
    ("1d-stride-dil", lambda: c1(3, 4, 3, stride=2, dilation=2, padding=2), (3, 11)),
    ("2d-groups", lambda: c2(4, 6, (3, 2), padding=(1, 0), groups=2), (4, 5, 4)),
    ("2d-depthwise-reflect", lambda: c2(3, 3, 3, padding=1, groups=3, padding_mode="reflect"), (3, 4, 4)),
    ("3d-same-even", lambda: c3(2, 2, 2, padding="same"), (2, 3, 3, 3)),
]


def _recorded(conv, xs, loss_of_outputs):
    """The ``Call`` records of ``conv`` on each of ``xs`` with their output gradients."""
    outs = [conv(x) for x in xs]
    grads = torch.autograd.grad(loss_of_outputs(*outs), outs)
    calls = []
    for x, out, grad in zip(xs, outs, grads, strict=False):
        call = Call((x,), {}, [out])
        call.add_grad(0, grad)
        calls.append(call)
    return calls


@pytest.mark.parametrize("case", NORM_CASES, ids=[c[0] for c in NORM_CASES])
def test_both_norm_forms_agree_with_reference(case):
    """The internal Gram and materialized forms, called directly, give the exact norm
    of the summed per-sample gradient over two calls."""
    _, make, shape = case
    torch.manual_seed(0)
    conv = make().double()
    x1, x2 = torch.randn(5, *shape, dtype=torch.float64), torch.randn(5, *shape, dtype=torch.float64)

    def loss(m, a, b):
        return (m(a) * m(b)).sum()

    want = reference.naive(conv, loss, x1, x2)["weight"].flatten(1).square().sum(1)
    calls = _recorded(conv, [x1, x2], lambda a, b: (a * b).sum())
    for gram in (True, False):
        got = conv_rule._weight_squared_norms(conv, calls, torch.float64, gram=gram)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=0)


def test_cost_model_picks_gram_only_for_few_positions():
    conv = nn.Conv2d(64, 64, 3)
    assert conv_rule.use_gram(conv, [4 * 4])
    assert not conv_rule.use_gram(conv, [32 * 32])


# CASES plus the product's other orientation (fewer inputs than outputs per group).
FORM_CASES = CASES + [
    ("1d-one-input", lambda: c1(1, 4, 2, padding=1), (1, 7)),
    ("2d-groups-few-inputs", lambda: c2(2, 8, (1, 2), stride=(1, 2), groups=2), (2, 3, 5)),
]


@pytest.mark.parametrize("unfold", [True, False], ids=["patches", "grouped-conv"])
@pytest.mark.parametrize("case", FORM_CASES, ids=[c[0] for c in FORM_CASES])
def test_each_per_sample_form_end_to_end(case, unfold, monkeypatch):
    """Patches + batched matmul and the folded grouped conv both give the exact
    per-sample weight gradient, materialized and inside the materialized norm form.
    One-sample patch blocks exercise the blocking."""
    monkeypatch.setattr(conv_rule, "use_unfold", lambda module, positions: unfold)
    monkeypatch.setattr(conv_rule, "PATCH_ELEMS", 1)
    monkeypatch.setattr(conv_rule, "GRAM_COST", 1e12)
    _, body, shape = case
    torch.manual_seed(3)
    check_model(_model(body, shape), ce("sum"), _batch(3, shape), "sum", use_vmap=False)


def test_per_sample_form_rule():
    """Patches for few inputs per group or few positions, the grouped conv otherwise
    and for one output per group (depthwise)."""
    assert conv_rule.use_unfold(nn.Conv2d(3, 32, 3), 30 * 30)  # benchmark cnn, first layer
    assert not conv_rule.use_unfold(nn.Conv2d(32, 64, 3, stride=2), 14 * 14)  # its second
    assert conv_rule.use_unfold(nn.Conv2d(64, 128, 3), 7 * 7)
    assert not conv_rule.use_unfold(nn.Conv2d(32, 32, 3, groups=32), 4)
    assert not conv_rule.use_unfold(nn.Conv1d(1, 1, 3), 4)


def test_patches_are_contiguous():
    """One input channel in 1d unfolds to a view; the patches must still be a copy
    (CPU matmuls on the overlapping view are many times slower)."""
    conv = nn.Conv1d(1, 4, 5)
    x = torch.randn(3, 1, 12)
    u = conv_rule._patches(conv, x)
    assert u.is_contiguous() and u.shape == (3, 1, 5, 8)
    torch.testing.assert_close(u[:, 0], F.unfold(x[..., None], (5, 1)))


@pytest.mark.parametrize("materialize", [True, False])
def test_unbatched_input_is_a_clear_error(materialize):
    conv = nn.Conv2d(3, 3, 3).double()
    x = torch.randn(3, 5, 5, dtype=torch.float64)  # (C, H, W): dim 0 would pass as a batch of 3
    with pytest.raises(ValueError, match="batched input"):
        with per_sample_grads(conv, materialize=materialize):
            conv(x).sum().backward()


def test_can_pool_needs_identical_geometry():
    rule = conv_rule.ConvRule()
    w2, w1 = torch.randn(2, 2, 3, 3), torch.randn(2, 2, 5)

    def geo(w, stride=1, padding=0, dilation=1, groups=1):
        return conv_use.ConvGeometry(w, None, stride, padding, dilation, groups)

    a = geo(w2, padding=1)
    assert rule.can_pool(a, geo(w2, padding="same"), "weight")
    assert not rule.can_pool(a, geo(w2, padding=1, stride=2), "weight")
    assert not rule.can_pool(a, geo(w2, padding=1, dilation=2), "weight")
    assert not rule.can_pool(a, nn.Linear(2, 2), "weight")
    assert rule.can_pool(a, geo(w1, stride=3), "bias")


@pytest.mark.parametrize("materialize", [True, False])
def test_autocast_bf16_grads_cast_to_float32(materialize):
    torch.manual_seed(0)
    model = Head(c2(3, 8, 3, padding=1), (3, 6, 6))
    x, y = torch.randn(6, 3, 6, 6), torch.randint(0, CLASSES, (6,))
    loss = lambda m, a, b: F.cross_entropy(m(a).float(), b)  # noqa: E731
    ref = reference.naive(model, loss, x, y)
    with per_sample_grads(model, materialize=materialize) as g:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = loss(model, x, y)
        out.backward()
    if materialize:
        assert g["body.weight"].dtype == torch.float32
        scale = float(ref["body.weight"].abs().max())
        torch.testing.assert_close(g["body.weight"], ref["body.weight"], rtol=5e-2, atol=5e-2 * scale)
    norms = g.param_norms()["body.weight"]
    assert norms.dtype == torch.float32
    torch.testing.assert_close(norms, ref["body.weight"].flatten(1).norm(dim=1), rtol=5e-2, atol=1e-3)


@pytest.mark.parametrize("materialize", [True, False])
@pytest.mark.parametrize("make", [lambda: c2(4, 8, 3, padding=1, padding_mode="reflect"), lambda: c1(4, 4, 3, groups=4)], ids=["2d-reflect", "1d-depthwise"])
def test_cancelling_gradient_is_no_false_alarm(make, materialize):
    """Samples whose gradients cancel: p.grad is rounding noise, and the exit check
    must measure that against the terms' magnitude, not the result's."""
    torch.manual_seed(0)
    conv = make()
    x = torch.randn(3, conv.in_channels, *[9] * len(conv.kernel_size)) * 100
    with per_sample_grads(conv, loss_reduction="sum", materialize=materialize) as g:
        y = conv(torch.cat([x, x]))
        w = torch.randn_like(y[:3])
        (y * torch.cat([w, -w])).sum().backward()
    torch.testing.assert_close(g.norms()[:3], g.norms()[3:])
