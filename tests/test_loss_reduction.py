"""A loss reduced over the batch the other way than ``loss_reduction`` says makes
every per-sample result N times off; where the loss handed to backward() is that
reduction itself, the context warns at exit (and says what to pass)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradhooks import LossReductionWarning, per_sample_grads

N = 5


def _run(loss_of, reduction: str, n: int = N) -> list[warnings.WarningMessage]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(n, 3), torch.randint(0, 2, (n,))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with per_sample_grads(model, loss_reduction=reduction) as g:
            loss_of(model(x), y).backward()
    assert g.batch_size == n
    return [w for w in record if issubclass(w.category, LossReductionWarning)]


MISMATCHED = {
    "ce-sum": (lambda out, y: F.cross_entropy(out, y, reduction="sum"), "mean"),
    "tensor-sum": (lambda out, y: out.pow(2).sum(), "mean"),
    "per-sample-then-sum": (lambda out, y: F.cross_entropy(out, y, reduction="none").sum(), "mean"),
    "ce-mean": (lambda out, y: F.cross_entropy(out, y), "sum"),
    "mse-mean": (lambda out, y: F.mse_loss(out, torch.zeros_like(out)), "sum"),
    "tensor-mean": (lambda out, y: out.pow(2).mean(), "sum"),
}
MATCHED = {
    "ce-mean": (lambda out, y: F.cross_entropy(out, y), "mean"),
    "ce-sum": (lambda out, y: F.cross_entropy(out, y, reduction="sum"), "sum"),
    "sum-over-features-then-mean": (lambda out, y: out.pow(2).sum(1).mean(), "mean"),
    # anything between the reduction and backward(): no judgement, no warning
    "sum-divided": (lambda out, y: out.pow(2).sum() / N, "mean"),
    "mean-times-n": (lambda out, y: out.pow(2).mean() * N, "sum"),
    "sum-plus-mean": (lambda out, y: out.sum() + out.mean(), "mean"),
}


@pytest.mark.parametrize("name", list(MISMATCHED))
def test_mismatch_warns_naming_the_remedy(name):
    loss_of, reduction = MISMATCHED[name]
    got = _run(loss_of, reduction)
    assert len(got) == 1
    other = "sum" if reduction == "mean" else "mean"
    msg = str(got[0].message)
    assert f"loss_reduction={other!r}" in msg and f"{N} times" in msg


@pytest.mark.parametrize("name", list(MATCHED))
def test_no_warning_when_consistent_or_unknown(name):
    loss_of, reduction = MATCHED[name]
    assert _run(loss_of, reduction) == []


def test_one_sample_needs_no_warning():
    loss_of, reduction = MISMATCHED["ce-sum"]
    assert _run(loss_of, reduction, n=1) == []
