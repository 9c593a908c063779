"""PerSampleGrads: the mapping, norms, clip_, dtypes, non-finite values, memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from gradhooks import per_sample_grads
from tests import reference

TOL = {"rtol": 1e-9, "atol": 1e-12}


def net(dtype=torch.float64) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)


def data(n=6, dtype=torch.float64):
    torch.manual_seed(1)
    return torch.randn(n, 4, dtype=dtype), torch.randint(0, 3, (n,))


def loss_fn(m, x, y, reduction="mean"):
    return F.cross_entropy(m(x), y, reduction=reduction)


def run(model, x, y, reduction="mean", materialize=True):
    with per_sample_grads(model, loss_reduction=reduction, materialize=materialize) as g:
        loss_fn(model, x, y, reduction).backward()
    return g


def test_mapping_is_read_only_and_ordered():
    model = net()
    x, y = data()
    g = run(model, x, y)
    assert list(g) == [k for k, _ in model.named_parameters()]
    assert len(g) == 4 and "0.weight" in g and "nope" not in g
    with pytest.raises(KeyError):
        g["nope"]
    with pytest.raises(TypeError):
        g["0.weight"] = torch.zeros(1)  # type: ignore[index]
    for k, p in model.named_parameters():
        assert g[k].shape == (6, *p.shape) and g[k].dtype == p.dtype and g[k].device == p.device
    assert isinstance(g.batch_size, int) and g.batch_size == 6
    assert "batch_size=6" in repr(g)


def test_not_materialized_item_access_says_so():
    model = net()
    x, y = data()
    g = run(model, x, y, materialize=False)
    assert list(g) == [k for k, _ in model.named_parameters()]
    with pytest.raises(RuntimeError, match="not materialized"):
        g["0.weight"]


@pytest.mark.parametrize("materialize", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_clip_formula_accumulation_and_idempotence(reduction, materialize):
    model = net()
    x, y = data()
    loss_fn(model, x[:2], y[:2], reduction).backward()  # an earlier micro-batch
    prior = {k: p.grad.clone() for k, p in model.named_parameters()}
    g = run(model, x, y, reduction, materialize)
    ref = reference.naive(model, lambda m, x, y: loss_fn(m, x, y, reduction), x, y)
    norms = g.norms()
    torch.testing.assert_close(norms, reference.norms(ref), **TOL)
    want, want_c = reference.clipped(ref, 0.3, reduction)
    c = g.clip_(0.3)
    torch.testing.assert_close(c, torch.clamp(0.3 / (norms + 1e-6), max=1.0), **TOL)
    torch.testing.assert_close(c, want_c, **TOL)
    first = {k: p.grad.clone() for k, p in model.named_parameters()}
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, prior[k] + want[k], **TOL)
    g.clip_(0.3)  # idempotent
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, first[k], rtol=0, atol=0)
    # clip_ changes only p.grad
    torch.testing.assert_close(g.norms(), norms, rtol=0, atol=0)
    if materialize:
        torch.testing.assert_close(g["0.weight"], ref["0.weight"], **TOL)
    # a large max_norm clips nothing: p.grad is what backward gave
    g.clip_(1e9)
    for k, p in model.named_parameters():
        red = ref[k].mean(0) if reduction == "mean" else ref[k].sum(0)
        torch.testing.assert_close(p.grad, prior[k] + red, **TOL)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), "1", True])
def test_clip_rejects_bad_max_norm(bad):
    model = net()
    g = run(model, *data())
    with pytest.raises(ValueError, match="max_norm"):
        g.clip_(bad)


@pytest.mark.parametrize("materialize", [True, False])
def test_non_finite_norm_raises_and_leaves_grads(materialize):
    model = net()
    x, y = data()
    x[2, 0] = float("inf")
    x[4, 1] = float("nan")
    g = run(model, x, y, materialize=materialize)  # exit succeeds
    norms = g.norms()
    assert not torch.isfinite(norms[2]) and not torch.isfinite(norms[4])
    assert torch.isfinite(norms[[0, 1, 3, 5]]).all()
    before = {k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()}
    with pytest.raises(FloatingPointError) as info:
        g.clip_(1.0)
    assert "[2, 4]" in str(info.value)
    for k, p in model.named_parameters():
        if before[k] is None:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, before[k], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize(
    "dtype,norm_dtype",
    [(torch.float64, torch.float64), (torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float32)],
)
@pytest.mark.parametrize("materialize", [True, False])
def test_norm_and_factor_dtypes(dtype, norm_dtype, materialize):
    model = net(dtype)
    x, y = data(dtype=dtype)
    g = run(model, x, y, materialize=materialize)
    assert g.norms().dtype == norm_dtype
    assert all(t.dtype == norm_dtype for t in g.param_norms().values())
    c = g.clip_(0.1)
    assert c.dtype == norm_dtype
    assert all(p.grad.dtype == dtype for p in model.parameters())


@pytest.mark.parametrize("materialize", [True, False])
def test_bf16_parameters_close_to_float64_reference(materialize):
    """bf16 parameters: per-sample grads in bf16 within bf16 tolerance, norms in float32."""
    model = net(torch.bfloat16)
    x, y = data(n=8, dtype=torch.bfloat16)
    g = run(model, x, y, materialize=materialize)
    ref_model = net(torch.float64)
    ref_model.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    ref = reference.naive(ref_model, loss_fn, x.double(), y)
    if materialize:
        for k in ref:
            assert g[k].dtype == torch.bfloat16
            torch.testing.assert_close(g[k].double(), ref[k], rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(g.norms().double(), reference.norms(ref), rtol=3e-2, atol=1e-3)


class LargestAllocation(TorchDispatchMode):
    """Records the largest tensor any op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("shape", [(64,), (3, 64)], ids=["2d", "seq"])
def test_not_materialized_builds_no_per_sample_weight(shape):
    """materialize=False: no (N, out, in) tensor is built at exit, by norms or by clip_."""
    torch.manual_seed(0)
    n, width = 32, 64
    model = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
    x = torch.randn(n, *shape)
    with LargestAllocation() as mode:
        with per_sample_grads(model, materialize=False) as g:
            model(x).square().mean().backward()
        g.norms()
        g.clip_(1.0)
    assert mode.largest < n * width * width // 4, mode.largest
    # sanity: the materialized path does build them, so this test can fail
    with LargestAllocation() as mode:
        with per_sample_grads(model, materialize=True):
            model(x).square().mean().backward()
    assert mode.largest >= n * width * width


def test_dot_validates_names_and_shapes():
    model = net()
    g = run(model, *data())
    with pytest.raises(KeyError):
        g.dot({"nope": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        g.dot({"0.weight": torch.zeros(3)})


@pytest.mark.parametrize("shape", [(4,), (3, 4)], ids=["2d", "seq"])
def test_reuse_writes_into_the_earlier_result(shape):
    model = net()
    torch.manual_seed(5)
    batches = [(torch.randn(6, *shape, dtype=torch.float64), torch.randint(0, 3, (6,))) for _ in range(3)]

    def loss(m, x, y):
        out = m(x)
        return F.cross_entropy(out if out.dim() == 2 else out.mean(1), y)

    prev, old_ptr = None, None
    for x, y in batches:
        with per_sample_grads(model, reuse=prev) as g:
            loss(model, x, y).backward()
        model.zero_grad()
        ref = reference.naive(model, loss, x, y)
        for k in ref:
            torch.testing.assert_close(g[k], ref[k], **TOL)
        if prev is not None:
            assert g["0.weight"].data_ptr() == old_ptr, "storage was reused"
            with pytest.raises(RuntimeError, match="reused"):
                prev["0.weight"]
        old_ptr = g["0.weight"].data_ptr()
        prev = g
    # a smaller last batch cannot reuse: fresh tensors, still exact
    x, y = batches[0][0][:2], batches[0][1][:2]
    with per_sample_grads(model, reuse=prev) as g:
        loss(model, x, y).backward()
    torch.testing.assert_close(g["0.weight"], reference.naive(model, loss, x, y)["0.weight"], **TOL)


def test_reuse_must_be_a_result():
    with pytest.raises(TypeError, match="reuse"):
        per_sample_grads(net(), reuse={})  # type: ignore[arg-type]


@pytest.mark.parametrize("materialize", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_weighted_sum_matches_naive(reduction, materialize):
    model = net()
    x, y = data()
    ref = reference.naive(model, lambda m, a, b: loss_fn(m, a, b, reduction), x, y)
    g = run(model, x, y, reduction, materialize)
    w = torch.linspace(-1.0, 2.0, x.shape[0], dtype=torch.float64)
    got = g.weighted_sum(w)
    assert list(got) == list(g.params)
    for k, t in got.items():
        torch.testing.assert_close(t, torch.tensordot(w, ref[k], dims=1), **TOL)
    only = g.weighted_sum(w, names=["2.bias"])
    assert list(only) == ["2.bias"]
    with pytest.raises(KeyError, match="not covered"):
        g.weighted_sum(w, names=["nope"])
    with pytest.raises(ValueError, match=r"shape \(6,\)"):
        g.weighted_sum(w[:3])


@pytest.mark.parametrize("materialize", [True, False])
@pytest.mark.parametrize(
    "make, batch",
    [
        (lambda: nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), lambda: torch.randn(0, 4)),
        (lambda: nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2)), lambda: torch.randn(0, 5, 4)),
        (lambda: nn.Sequential(nn.Conv1d(4, 3, 3), nn.GroupNorm(1, 3), nn.Flatten(), nn.Linear(18, 2)), lambda: torch.randn(0, 4, 8)),
        (lambda: nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2)), lambda: torch.zeros(0, 5, dtype=torch.long)),
    ],
    ids=["mlp", "sequence", "conv", "embedding"],
)
def test_empty_batch(make, batch, materialize):
    """N = 0 (an empty Poisson batch): empty results, clip_ leaves p.grad as it was."""
    torch.manual_seed(0)
    model = make()
    model(batch()[:0]).sum()  # shapes are valid
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with per_sample_grads(model, loss_reduction="sum", materialize=materialize) as g:
        model(batch()).sum().backward()
    assert g.batch_size == 0
    assert g.norms().shape == (0,) and g.clip_(1.0).shape == (0,)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, torch.ones_like(p))
        if materialize:
            assert g[name].shape == (0, *p.shape)
