"""nn.Embedding: per-sample gradients, norms, clipping and dot products against the
naive loop and torch.func, float64; padding_idx, max_norm, index shapes, position
ids shared by the batch, repeated calls, tied weights, sparse gradients, and the
refusal of scale_grad_by_freq."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradhooks import UnsupportedModuleError, per_sample_grads
from gradhooks.rules import embedding as emb_rule
from tests import reference
from tests.check import TOL, check_model
from tests.hygiene import assert_clean, snapshot

V, D = 6, 3


class Head(nn.Module):
    """Embedding, tanh, flatten, Linear to 3 classes."""

    def __init__(self, emb: nn.Embedding, positions: int) -> None:
        super().__init__()
        self.emb = emb
        self.fc = nn.Linear(positions * emb.embedding_dim, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.emb(x)).flatten(1))


class TokPos(nn.Module):
    """Token plus position embeddings; position ids ``(1, T)`` shared by the batch."""

    def __init__(self, t: int, padding_idx: int | None = None) -> None:
        super().__init__()
        self.tok = nn.Embedding(V, D, padding_idx=padding_idx)
        self.pos = nn.Embedding(t, D)
        self.fc = nn.Linear(t * D, 3)

    def forward(self, x):
        h = self.tok(x) + self.pos(torch.arange(x.shape[1])[None])
        return self.fc(torch.tanh(h).flatten(1))


class Twice(nn.Module):
    """One Embedding called on the indices and on their reversal."""

    def __init__(self, t: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D, padding_idx=1)
        self.fc = nn.Linear(t * D, 3)

    def forward(self, x):
        h = self.emb(x) * self.emb(x.flip(1))
        return self.fc(h.flatten(1))


class Tied(nn.Module):
    """Two Embeddings sharing one weight Parameter."""

    def __init__(self, t: int) -> None:
        super().__init__()
        self.a = nn.Embedding(V, D)
        self.b = nn.Embedding(V, D)
        self.b.weight = self.a.weight
        self.fc = nn.Linear(t * D, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.a(x) + self.b((x + 1) % V)).flatten(1))


class TiedLM(nn.Module):
    """Language-model weight tying: the output Linear reuses the embedding's weight."""

    def __init__(self, t: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.out = nn.Linear(D, V, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x):
        return self.out(torch.tanh(self.emb(x)))


def _frozen_by_freq(t: int) -> nn.Module:
    m = Head(nn.Embedding(V, D, scale_grad_by_freq=True), t)
    m.emb.requires_grad_(False)
    return m


def ce(reduction):
    return lambda m, x, y: F.cross_entropy(m(x), y, reduction=reduction)


def token_ce(reduction):
    return lambda m, x, y: F.cross_entropy(m(x).flatten(0, 1), y.flatten(), reduction=reduction)


# id, model factory of T, index shape after N, loss, use torch.func reference too
CASES = [
    ("indices-1d", lambda t: nn.Sequential(nn.Embedding(V, D), nn.Tanh(), nn.Linear(D, 3)), (), ce, True),
    ("indices-1d-padding", lambda t: nn.Sequential(nn.Embedding(V, D, padding_idx=0), nn.Linear(D, 3)), (), ce, True),
    ("indices-2d", lambda t: Head(nn.Embedding(V, D), t), (4,), ce, True),
    ("indices-3d", lambda t: Head(nn.Embedding(V, D), t), (2, 3), ce, True),
    ("padding", lambda t: Head(nn.Embedding(V, D, padding_idx=2), t), (5,), ce, True),
    ("padding-negative", lambda t: Head(nn.Embedding(V, D, padding_idx=-1), t), (5,), ce, True),
    ("long-grouped-form", lambda t: Head(nn.Embedding(V, D, padding_idx=3), t), (40,), ce, True),
    ("max-norm", lambda t: Head(nn.Embedding(V, D, max_norm=1.0), t), (5,), ce, False),
    ("max-norm-padding", lambda t: Head(nn.Embedding(V, D, max_norm=0.5, norm_type=1.0, padding_idx=0), t), (5,), ce, False),
    ("positions-broadcast", TokPos, (5,), ce, True),
    ("positions-broadcast-long", lambda t: TokPos(t, padding_idx=0), (36,), ce, True),
    ("called-twice", Twice, (4,), ce, True),
    ("called-twice-long", Twice, (20,), ce, True),
    ("tied", Tied, (4,), ce, True),
    ("tied-lm-head", TiedLM, (4,), token_ce, True),
    ("frozen-scale-grad-by-freq", _frozen_by_freq, (4,), ce, True),
]


def _batch(n: int, shape: tuple[int, ...], loss):
    x = torch.randint(0, V, (n, *shape))
    x.view(-1)[:: max(1, x.numel() // 3)] = 0  # a few zeros: padding rows in the padding cases
    y = torch.randint(0, V if loss is token_ce else 3, (n, *shape) if loss is token_ce else (n,))
    return x, y


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_embedding_against_references(case, n, reduction):
    _, make, shape, loss, use_vmap = case
    torch.manual_seed(n)
    x, y = _batch(n, shape, loss)
    t = shape[0] * (shape[1] if len(shape) > 1 else 1) if shape else 1
    check_model(lambda: make(t), loss(reduction), (x, y), reduction, use_vmap=use_vmap)


@pytest.mark.parametrize("t", [6, 40], ids=["gram-form", "grouped-form"])
def test_blocks_of_one_sample(t, monkeypatch):
    """Every blocked loop run with blocks of a single sample."""
    monkeypatch.setattr(emb_rule, "CHUNK_ELEMS", 1)
    torch.manual_seed(0)
    x, y = _batch(3, (t,), ce)
    check_model(lambda: Twice(t), ce("mean"), (x, y), "mean", use_vmap=False)


@pytest.mark.parametrize("padding_idx", [None, 0])
@pytest.mark.parametrize("n,t,vocab,d", [(5, 1, 4, 3), (5, 7, 3, 4), (4, 50, 6, 2), (3, 9, 40, 5)])
@pytest.mark.parametrize("chunk", [1 << 24, 1])
def test_both_norm_forms_agree_with_materialized(n, t, vocab, d, padding_idx, chunk, monkeypatch):
    """Gram and grouped forms equal the squared norm of the index-added (N, V, D)."""
    monkeypatch.setattr(emb_rule, "CHUNK_ELEMS", chunk)
    torch.manual_seed(t)
    idx = torch.randint(0, vocab, (n, t))
    idx[0] = 0  # one sample of padding only (when padding_idx=0)
    g = torch.randn(n, t, d, dtype=torch.float64)
    dense = torch.zeros(n, vocab, d, dtype=torch.float64)
    dense.scatter_add_(1, idx[:, :, None].expand(-1, -1, d), g)
    if padding_idx is not None:
        dense[:, padding_idx] = 0
    want = dense.flatten(1).square().sum(1)
    tol = {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(emb_rule.squared_norms_gram(idx, g, padding_idx), want, **tol)
    torch.testing.assert_close(emb_rule.squared_norms_grouped(idx, g, padding_idx, vocab), want, **tol)


@pytest.mark.parametrize("materialize", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_sparse_gradients_and_clip(materialize, reduction):
    """sparse=True: p.grad stays sparse COO; clip_ writes before + reduce(c g) into it."""
    torch.manual_seed(3)
    t, n = 5, 4
    model = Head(nn.Embedding(V, D, sparse=True, padding_idx=1), t).double()
    dense_twin = copy.deepcopy(model)
    dense_twin.emb.sparse = False
    x, y = _batch(n, (t,), ce)
    loss = ce(reduction)
    ref = reference.naive(dense_twin, loss, x, y)
    ref_clip, ref_c = reference.clipped(ref, 0.3, reduction)

    x0, y0 = _batch(n, (t,), ce)
    loss(model, x0, y0).backward()  # gradient accumulated before the context
    before = {k: (p.grad.to_dense() if p.grad.is_sparse else p.grad).clone() for k, p in model.named_parameters()}
    assert model.emb.weight.grad.is_sparse
    with per_sample_grads(model, loss_reduction=reduction, materialize=materialize) as g:
        loss(model, x, y).backward()
    assert model.emb.weight.grad.is_sparse
    torch.testing.assert_close(g.norms(), reference.norms(ref), **TOL)
    if materialize:
        torch.testing.assert_close(g["emb.weight"], ref["emb.weight"], **TOL)
    others = {k: torch.randn_like(v[0]) for k, v in ref.items()}
    want_dot = sum(torch.einsum("n...,...->n", ref[k], others[k]) for k in ref)
    torch.testing.assert_close(g.dot(others), want_dot, **TOL)
    for _ in range(2):  # idempotent
        torch.testing.assert_close(g.clip_(0.3), ref_c, **TOL)
        grad = model.emb.weight.grad
        assert grad.is_sparse
        torch.testing.assert_close(grad.to_dense(), before["emb.weight"] + ref_clip["emb.weight"], **TOL)
        for k in ("fc.weight", "fc.bias"):
            torch.testing.assert_close(model.get_parameter(k).grad, before[k] + ref_clip[k], **TOL)


def test_float32_exit_check_has_no_false_alarm():
    """float32, long sequences with many repeats: the exit check passes and the norms
    match float64 to float32 rounding."""
    torch.manual_seed(0)
    model = TokPos(300, padding_idx=0)
    x, y = _batch(8, (300,), ce)
    for materialize in (True, False):
        with per_sample_grads(model, materialize=materialize) as g:
            ce("mean")(model, x, y).backward()
        want = reference.norms(reference.naive(copy.deepcopy(model).double(), ce("mean"), x, y))
        torch.testing.assert_close(g.norms().double(), want, rtol=1e-4, atol=1e-7)
        model.zero_grad()


def test_scale_grad_by_freq_is_refused_on_entry():
    model = Head(nn.Embedding(V, D, scale_grad_by_freq=True, padding_idx=0), 4)
    clean = snapshot(model)
    with pytest.raises(UnsupportedModuleError, match=r"'emb' \(Embedding\).*scale_grad_by_freq.*per-sample gradients do not exist"):
        with per_sample_grads(model):
            pass
    assert_clean(model, clean)


@pytest.mark.parametrize("make", [lambda: Twice(40), lambda: Tied(4), lambda: TokPos(5)], ids=["twice", "tied", "positions"])
def test_not_materialized_never_builds_per_sample(make, monkeypatch):
    """materialize=False: norms, clip_ and dot never build the (N, V, D) gradients
    (repeated calls and tied Embeddings are pooled)."""

    def refuse_to_build(*args, **kwargs):
        raise AssertionError("per-sample gradients were built")

    monkeypatch.setattr(emb_rule.EmbeddingRule, "per_sample", refuse_to_build)
    torch.manual_seed(0)
    model = make().double()
    x, y = _batch(4, (40 if isinstance(model, Twice) else 4 if isinstance(model, Tied) else 5,), ce)
    with per_sample_grads(model, materialize=False) as g:
        ce("mean")(model, x, y).backward()
    g.norms()
    g.dot({"fc.bias": torch.ones(3, dtype=torch.float64)})
    g.clip_(0.1)
