"""Normalization layers (LayerNorm, RMSNorm, GroupNorm, InstanceNorm*d, BatchNorm*d
in eval mode, SyncBatchNorm in eval mode): per-sample gradients, norms, clipping and
dot products against the naive loop and torch.func, float64; and the refusal of
BatchNorm with batch statistics."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradhooks import UnsupportedModuleError, per_sample_grads
from gradhooks.rules import normalization as normalization_rule
from tests import reference
from tests.check import check_model
from tests.hygiene import assert_clean, snapshot


def with_stats(norm: nn.Module) -> nn.Module:
    """Random running statistics and affine parameters (eval mode uses them)."""
    if getattr(norm, "running_mean", None) is not None:
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2.0)
    if getattr(norm, "weight", None) is not None:
        with torch.no_grad():
            norm.weight.normal_()
            if getattr(norm, "bias", None) is not None:
                norm.bias.normal_()
    return norm


def hidden(norm: nn.Module, d_in: int = 5, d: int = 6) -> nn.Module:
    """Linear -> norm -> tanh -> Linear, on ``(N, *, d_in)`` inputs."""
    return nn.Sequential(nn.Linear(d_in, d), with_stats(norm), nn.Tanh(), nn.Linear(d, 3))


def first(norm: nn.Module, flat: int) -> nn.Module:
    """norm on the raw ``(N, C, *)`` input -> tanh -> Flatten -> Linear."""
    return nn.Sequential(with_stats(norm), nn.Tanh(), nn.Flatten(), nn.Linear(flat, 3))


def evaluated(make):
    return lambda: make().eval()


def frozen(make, name: str):
    def build() -> nn.Module:
        m = make()
        m.get_parameter(name).requires_grad_(False)
        return m

    return build


class Twice(nn.Module):
    """One LayerNorm applied at two places (different sequence lengths)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 6)
        self.norm = with_stats(nn.LayerNorm(6))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.norm(torch.tanh(self.fc(x)))
        return self.head(self.norm(h[:, :2] * 2.0).sum(1) + h.sum(1))


class TiedNorms(nn.Module):
    """Two GroupNorms sharing their weight Parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.a = with_stats(nn.GroupNorm(2, 4))
        self.b = with_stats(nn.GroupNorm(4, 4))
        self.b.weight = self.a.weight
        self.head = nn.Linear(20, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))).flatten(1))


# id, model factory, input shape after N, use torch.func reference too
CASES = [
    ("layernorm", lambda: hidden(nn.LayerNorm(6)), (5,), True),
    ("layernorm-seq", lambda: hidden(nn.LayerNorm(6)), (4, 5), True),
    ("layernorm-2-dims", lambda: first(nn.LayerNorm((4, 5)), 20), (4, 5), True),
    ("layernorm-3-dims-of-4", lambda: first(nn.LayerNorm((3, 2, 2), eps=1e-2), 24), (2, 3, 2, 2), True),
    ("layernorm-no-bias", lambda: hidden(nn.LayerNorm(6, bias=False)), (4, 5), True),
    ("layernorm-not-affine", lambda: hidden(nn.LayerNorm(6, elementwise_affine=False)), (5,), True),
    ("layernorm-frozen-weight", frozen(lambda: hidden(nn.LayerNorm(6)), "1.weight"), (4, 5), True),
    ("layernorm-twice", Twice, (4, 5), True),
    ("rmsnorm-eps-none", lambda: hidden(nn.RMSNorm(6)), (4, 5), True),
    ("rmsnorm-eps", lambda: hidden(nn.RMSNorm(6, eps=0.5)), (5,), True),
    ("rmsnorm-2-dims", lambda: first(nn.RMSNorm((4, 5), eps=1e-3), 20), (4, 5), True),
    ("rmsnorm-not-affine", lambda: hidden(nn.RMSNorm(6, elementwise_affine=False)), (5,), True),
    ("groupnorm", lambda: first(nn.GroupNorm(2, 4), 20), (4, 5), True),
    ("groupnorm-1-group", lambda: first(nn.GroupNorm(1, 4, eps=0.1), 20), (4, 5), True),
    ("groupnorm-per-channel-2d", lambda: first(nn.GroupNorm(3, 3), 24), (3, 2, 4), True),
    ("groupnorm-tied", TiedNorms, (4, 5), True),
    ("groupnorm-frozen-bias", frozen(lambda: first(nn.GroupNorm(2, 4), 20), "0.bias"), (4, 5), True),
    ("groupnorm-frozen-weight", frozen(lambda: first(nn.GroupNorm(2, 4), 20), "0.weight"), (4, 5), True),
    ("rmsnorm-seq-of-seq", lambda: hidden(nn.RMSNorm(6)), (3, 4, 5), True),
    ("layernorm-seq-of-seq", lambda: hidden(nn.LayerNorm(6)), (3, 4, 5), True),
    ("instancenorm1d", lambda: first(nn.InstanceNorm1d(4, affine=True), 20), (4, 5), True),
    ("instancenorm1d-tracking-train", lambda: first(nn.InstanceNorm1d(4, affine=True, track_running_stats=True), 20), (4, 5), False),
    ("instancenorm1d-tracking-eval", evaluated(lambda: first(nn.InstanceNorm1d(4, affine=True, track_running_stats=True), 20)), (4, 5), True),
    ("instancenorm1d-eval-no-tracking", evaluated(lambda: first(nn.InstanceNorm1d(4, affine=True), 20)), (4, 5), True),
    ("instancenorm2d", lambda: first(nn.InstanceNorm2d(3, affine=True, eps=0.1), 24), (3, 2, 4), True),
    ("instancenorm2d-tracking-eval", evaluated(lambda: first(nn.InstanceNorm2d(3, affine=True, track_running_stats=True), 24)), (3, 2, 4), True),
    ("instancenorm3d", lambda: first(nn.InstanceNorm3d(2, affine=True), 24), (2, 3, 2, 2), True),
    ("batchnorm1d-eval", evaluated(lambda: hidden(nn.BatchNorm1d(6))), (5,), True),
    ("batchnorm1d-eval-seq", evaluated(lambda: first(nn.BatchNorm1d(4, eps=0.1), 20)), (4, 5), True),
    ("batchnorm1d-eval-frozen", evaluated(frozen(lambda: hidden(nn.BatchNorm1d(6)), "1.bias")), (5,), True),
    ("batchnorm2d-eval", evaluated(lambda: first(nn.BatchNorm2d(3), 24)), (3, 2, 4), True),
    ("batchnorm3d-eval", evaluated(lambda: first(nn.BatchNorm3d(2), 24)), (2, 3, 2, 2), True),
    ("syncbatchnorm-eval", evaluated(lambda: first(nn.SyncBatchNorm(4), 20)), (4, 5), True),
]


def _batch(n: int, shape: tuple[int, ...]):
    x = torch.randn(n, *shape, dtype=torch.float64) * 2 + 0.5
    return x, torch.randint(0, 3, (n,))


def ce(reduction):
    """Cross-entropy of the logits, summed over positions first for ``(N, T, 3)``."""

    def loss(m, x, y):
        out = m(x)
        return F.cross_entropy(out.flatten(1, -2).sum(1) if out.dim() > 2 else out, y, reduction=reduction)

    return loss


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_norm_layers_against_references(case, n, reduction):
    _, make, shape, use_vmap = case
    torch.manual_seed(n)
    check_model(make, ce(reduction), _batch(n, shape), reduction, use_vmap=use_vmap)


@pytest.mark.parametrize("case", ["layernorm-seq", "layernorm-frozen-weight", "rmsnorm-eps-none", "groupnorm-tied", "groupnorm-frozen-bias", "instancenorm2d", "batchnorm1d-eval-seq"])
def test_blocks_of_one_sample(case, monkeypatch):
    """Every blocked loop run with blocks of a single sample."""
    monkeypatch.setattr(normalization_rule, "CHUNK_ELEMS", 1)
    _, make, shape, _ = next(c for c in CASES if c[0] == case)
    torch.manual_seed(0)
    check_model(make, ce("sum"), _batch(3, shape), "sum", use_vmap=False)


FLOAT32 = [
    ("layernorm", lambda: nn.LayerNorm(64), (50, 64)),
    ("rmsnorm", lambda: nn.RMSNorm(64), (50, 64)),
    ("groupnorm", lambda: nn.GroupNorm(4, 16), (16, 200)),
    ("instancenorm", lambda: nn.InstanceNorm1d(16, affine=True), (16, 200)),
    ("batchnorm-eval", lambda: nn.BatchNorm1d(16).eval(), (16, 200)),
]


@pytest.mark.parametrize("case", FLOAT32, ids=[c[0] for c in FLOAT32])
def test_float32_exit_check_has_no_false_alarm(case):
    """float32, large inputs with an offset: the exit check passes and the norms match
    float64 to float32 rounding."""
    _, make, shape = case
    torch.manual_seed(0)
    model = nn.Sequential(with_stats(make()), nn.Flatten(), nn.Linear(shape[0] * shape[1], 3))
    x, y = torch.randn(8, *shape) * 3 + 10, torch.randint(0, 3, (8,))
    want = reference.norms(reference.naive(copy.deepcopy(model).double(), ce("mean"), x.double(), y))
    for materialize in (True, False):
        model.zero_grad()
        with per_sample_grads(model, materialize=materialize) as g:
            ce("mean")(model, x, y).backward()
        torch.testing.assert_close(g.norms().double(), want, rtol=1e-4, atol=1e-6)


def _frozen_bn() -> nn.Module:
    m = hidden(nn.BatchNorm1d(6))
    m[1].requires_grad_(False)
    return m


# id, model factory, words the message must contain
REFUSED = [
    ("batchnorm1d-train", lambda: hidden(nn.BatchNorm1d(6)), r"'1' \(BatchNorm1d\): BatchNorm in training mode"),
    ("batchnorm1d-train-frozen", _frozen_bn, r"'1' \(BatchNorm1d\): BatchNorm in training mode"),
    ("batchnorm1d-train-not-affine", lambda: hidden(nn.BatchNorm1d(6, affine=False)), r"'1' \(BatchNorm1d\): BatchNorm in training"),
    ("batchnorm2d-train", lambda: first(nn.BatchNorm2d(3), 24), r"'0' \(BatchNorm2d\): BatchNorm in training mode"),
    ("syncbatchnorm-train", lambda: first(nn.SyncBatchNorm(4), 20), r"'0' \(SyncBatchNorm\): BatchNorm in training mode"),
    ("batchnorm1d-eval-no-stats", lambda: hidden(nn.BatchNorm1d(6, track_running_stats=False)).eval(), r"'1' \(BatchNorm1d\): BatchNorm with track_running_stats=False"),
    ("batchnorm-frozen-eval-no-stats", lambda: first(nn.BatchNorm1d(4, affine=False, track_running_stats=False), 20).eval(), r"'0' \(BatchNorm1d\).*track_running_stats=False"),
]


@pytest.mark.parametrize("case", REFUSED, ids=[c[0] for c in REFUSED])
def test_batch_statistics_are_refused_on_entry(case):
    _, make, words = case
    model = make()
    clean = snapshot(model)
    with pytest.raises(UnsupportedModuleError, match=words + r".*couple the samples.*per-sample gradients do not exist"):
        with per_sample_grads(model):
            pass
    assert_clean(model, clean)


def test_batchnorm_switched_to_training_inside_the_context_is_refused_at_forward():
    model = hidden(nn.BatchNorm1d(6)).eval()
    clean = snapshot(model)
    with pytest.raises(UnsupportedModuleError, match=r"'1' \(BatchNorm1d\): BatchNorm in training mode"):
        with per_sample_grads(model):
            model.train()
            model(torch.randn(4, 5)).sum().backward()
    assert_clean(model, clean)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_rmsnorm_default_eps_is_float32_machine_epsilon(dtype):
    """eps=None means float32's machine epsilon for float32 and lower-precision inputs
    (PyTorch's opmath type): tiny inputs, where eps dominates the mean square."""
    torch.manual_seed(0)
    model = nn.Sequential(with_stats(nn.RMSNorm(6)), nn.Flatten(), nn.Linear(24, 3))
    twin = copy.deepcopy(model).double()
    twin[0].eps = torch.finfo(torch.float32).eps
    x, y = torch.randn(4, 4, 6) * 1e-4, torch.randint(0, 3, (4,))
    want = reference.naive(twin, ce("sum"), x.double(), y)["0.weight"]
    model = model.to(dtype)
    with per_sample_grads(model, loss_reduction="sum") as g:
        ce("sum")(model, x.to(dtype), y).backward()
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(g["0.weight"].double(), want, rtol=tol, atol=tol * want.abs().max().item())


def test_frozen_batchnorm_switched_to_training_inside_is_refused():
    """A frozen BatchNorm has no hook of its own rule; put in training mode inside the
    context it would couple the samples of every layer before it."""
    from gradhooks import UnsupportedModuleError, per_sample_grads

    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)).double().eval()
    model[1].requires_grad_(False)
    x = torch.randn(5, 4, dtype=torch.float64)
    with pytest.raises(UnsupportedModuleError, match="'1' \\(BatchNorm1d\\)"):
        with per_sample_grads(model):
            model.train()
            model(x).sum().backward()


def test_instance_norm_mode_is_taken_at_forward_time():
    """InstanceNorm with running stats: the mode of the forward call counts, not the mode at exit."""
    from gradhooks import per_sample_grads
    from tests import reference

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Unflatten(1, (2, 3)), nn.InstanceNorm1d(2, affine=True, track_running_stats=True)).double()
    model.eval()
    x = torch.randn(5, 4, dtype=torch.float64)

    def loss(m, x):
        return m(x).square().sum()

    ref = reference.naive(model, loss, x)
    with per_sample_grads(model, loss_reduction="sum") as g:
        loss(model, x).backward()
        model.train()  # switched after the forward: must not matter
    for k in ref:
        torch.testing.assert_close(g[k], ref[k], rtol=1e-9, atol=1e-12)


AUTOCAST = [
    ("layernorm-seq", lambda: hidden(nn.LayerNorm(6)), (4, 5)),
    ("rmsnorm-seq", lambda: hidden(nn.RMSNorm(6)), (4, 5)),
    ("groupnorm", lambda: nn.Sequential(nn.Conv1d(4, 4, 1), with_stats(nn.GroupNorm(2, 4)), nn.Tanh(), nn.Flatten(), nn.Linear(20, 3)), (4, 5)),
    # no conv bias: instance norm cancels it, its true gradient is 0 and both sides' is rounding noise
    ("instancenorm", lambda: nn.Sequential(nn.Conv1d(4, 4, 1, bias=False), with_stats(nn.InstanceNorm1d(4, affine=True)), nn.Tanh(),
                                           nn.Flatten(), nn.Linear(20, 3)), (4, 5)),
]


@pytest.mark.parametrize("materialize", [True, False])
@pytest.mark.parametrize("case", AUTOCAST, ids=[c[0] for c in AUTOCAST])
def test_under_autocast_against_the_naive_loop_under_autocast(case, materialize):
    """bf16 autocast on CPU: the op runs as called (no native statistics), the
    statistics are recomputed in float32 from the captured input. PyTorch's own
    weight and bias gradients for a bf16 input are bf16-accurate (5e-3 relative
    measured): the exit check's tolerance follows the least precise input."""
    _, make, shape = case
    torch.manual_seed(0)
    model = make()
    x, y = torch.randn(6, *shape), torch.randint(0, 3, (6,))

    def loss(m, x, y):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x)
        return ce("mean")(lambda _: out.float(), x, y)

    ref = reference.naive(model, loss, x, y)
    with per_sample_grads(model, materialize=materialize) as g:
        loss(model, x, y).backward()
    if materialize:
        for k in ref:
            torch.testing.assert_close(g[k], ref[k], rtol=2e-2, atol=float(2e-2 * ref[k].abs().max()))
    torch.testing.assert_close(g.norms(), reference.norms(ref), rtol=2e-2, atol=1e-4)
