"""nn.Linear: per-sample gradients, norms, clipping and dot products against the
naive loop and torch.func, float64, for the layouts and uses the README names."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradhooks.rules import linear as linear_rule
from tests.check import check_model


class Twice(nn.Module):
    """One Linear called twice in a forward (weight sharing / recurrence)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(torch.tanh(self.fc(x)))))


class Tied(nn.Module):
    """Two Linear modules sharing one weight Parameter, each with its own bias."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.b(torch.relu(self.a(x))))


class TwoHeads(nn.Module):
    """The second head runs but the loss never uses it: its gradient is zero."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(5, 6)
        self.used = nn.Linear(6, 3)
        self.unused = nn.Linear(6, 2)

    def forward(self, x):
        h = torch.relu(self.body(x))
        self.unused(h)
        return self.used(h)


class SubLinear(nn.Linear):
    """A subclass adds nothing to the math: the Linear rule applies."""


class ViewedWeight(nn.Module):
    """A weight used through views: ``how`` picks the injective (a transpose, two
    disjoint chunks) or repeating (``repeat``, overlapping slices) maps back to it."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.w = nn.Parameter(torch.randn(6, 5) * 0.5)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "transpose":
            h = x @ self.w.t()
        elif self.how == "chunks":
            a, b = self.w.chunk(2, 0)
            h = torch.cat([F.linear(x, a), F.linear(x, b)], -1)
        elif self.how == "repeat":
            h = F.linear(x, self.w[:3].repeat(2, 1))
        else:  # overlapping slices: rows 2-3 reach both uses
            h = torch.cat([F.linear(x, self.w[:4]), F.linear(x, self.w[2:4])], -1)
        return self.head(torch.tanh(h))


def mlp(*layers: nn.Module) -> nn.Module:
    return nn.Sequential(*layers)


def ce(reduction):
    return lambda m, x, y: F.cross_entropy(m(x), y, reduction=reduction)


def mse(reduction):
    return lambda m, x, y: F.mse_loss(m(x), y, reduction=reduction)


def _frozen_first():
    m = mlp(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    m[0].requires_grad_(False)
    return m


def _frozen_weight():
    m = mlp(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    m[2].weight.requires_grad_(False)
    return m


# id, model factory, x shape after N, target kind, loss
CASES = [
    ("2d", lambda: mlp(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)), (5,), "class3", ce),
    ("2d-nobias", lambda: mlp(nn.Linear(5, 6, bias=False), nn.Sigmoid(), nn.Linear(6, 3, bias=False)), (5,), "class3", ce),
    ("seq-3d", lambda: mlp(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)), (4, 5), "real", mse),
    ("seq-4d", lambda: mlp(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)), (2, 3, 5), "real", mse),
    ("inplace-relu-2d", lambda: mlp(nn.Linear(5, 6), nn.ReLU(inplace=True), nn.Linear(6, 3)), (5,), "class3", ce),
    ("inplace-relu-seq", lambda: mlp(nn.Linear(5, 6), nn.ReLU(inplace=True), nn.Linear(6, 3)), (4, 5), "real", mse),
    ("gram-branch", lambda: mlp(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)), (2, 8), "real", mse),
    ("materialize-branch", lambda: mlp(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 3)), (20, 2), "real", mse),
    ("called-twice", Twice, (4,), "class3", ce),
    ("called-twice-seq", Twice, (3, 4), "real", mse),
    ("tied", Tied, (4,), "class3", ce),
    ("tied-seq", Tied, (3, 4), "real", mse),
    ("frozen-layer", _frozen_first, (5,), "class3", ce),
    ("frozen-weight", _frozen_weight, (5,), "class3", ce),
    ("unused-head", TwoHeads, (5,), "class3", ce),
    ("subclass", lambda: mlp(SubLinear(5, 6), nn.Tanh(), SubLinear(6, 3)), (5,), "class3", ce),
 *[(f"viewed-{how}{seq}", lambda how=how: ViewedWeight(how), shape, target, loss)
   for how in ("transpose", "chunks", "repeat", "overlap") for seq, shape, target, loss in (("", (5,), "class3", ce), ("-seq", (3, 5), "real", mse))],
]


def _batch(n, shape, target, out_features):
    x = torch.randn(n, *shape, dtype=torch.float64)
    if target.startswith("class"):
        y = torch.randint(0, int(target[-1]), (n,))
    else:
        y = torch.randn(n, *shape[:-1], out_features, dtype=torch.float64)
    return x, y


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_linear_against_references(case, n, reduction):
    _, make, shape, target, loss = case
    torch.manual_seed(n)
    x, y = _batch(n, shape, target, 3)
    check_model(make, loss(reduction), (x, y), reduction)


@pytest.mark.parametrize("t,i,o", [(1, 7, 5), (3, 7, 5), (40, 3, 2), (6, 50, 1)])
def test_both_norm_forms_agree_with_materialized(t, i, o):
    """The Gram form and the materialized form give the same exact norm."""
    torch.manual_seed(0)
    x = torch.randn(9, t, i, dtype=torch.float64)
    g = torch.randn(9, t, o, dtype=torch.float64)
    want = torch.einsum("nto,nti->noi", g, x).flatten(1).square().sum(1)
    torch.testing.assert_close(linear_rule._weight_squared_norms(x, g), want, rtol=1e-12, atol=0)
    old = linear_rule.CHUNK_ELEMS
    try:
        linear_rule.CHUNK_ELEMS = 1  # one sample per block
        torch.testing.assert_close(linear_rule._weight_squared_norms(x, g), want, rtol=1e-12, atol=0)
    finally:
        linear_rule.CHUNK_ELEMS = old
