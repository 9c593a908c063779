"""A seeded zoo of random MLPs: depth, widths, bias, activations, losses, both
reductions, N = 1 and N > 1, plain and sequence inputs; every one against the
naive loop and torch.func in float64, in both materialize modes."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.check import check_model

ACTIVATIONS = {
    "tanh": lambda: nn.Tanh(),
    "relu": lambda: nn.ReLU(),
    "relu_": lambda: nn.ReLU(inplace=True),
    "sigmoid": lambda: nn.Sigmoid(),
    "gelu": lambda: nn.GELU(),
    "leaky_": lambda: nn.LeakyReLU(0.1, inplace=True),
}
LOSSES = ["mse", "ce", "bce"]


def make_case(seed: int) -> dict:
    rng = random.Random(seed)
    depth = rng.randint(1, 4)
    widths = [rng.randint(1, 7) for _ in range(depth + 1)]
    loss = rng.choice(LOSSES)
    if loss == "ce":
        widths[-1] = max(2, widths[-1])
    return {
        "id": f"z{seed}",
        "widths": widths,
        "bias": [rng.random() < 0.8 for _ in range(depth)],
        "acts": [rng.choice(sorted(ACTIVATIONS)) for _ in range(depth - 1)],
        "loss": loss,
        "reduction": rng.choice(["mean", "sum"]),
        "n": rng.choice([1, 2, 7]),
        "extra": rng.choice([(), (), (3,), (2, 2)]) if loss != "ce" else (),
    }


CASES = [make_case(s) for s in range(24)]


def build(case: dict) -> nn.Module:
    layers: list[nn.Module] = []
    w = case["widths"]
    for i in range(len(w) - 1):
        layers.append(nn.Linear(w[i], w[i + 1], bias=case["bias"][i]))
        if i < len(w) - 2:
            layers.append(ACTIVATIONS[case["acts"][i]]())
    return nn.Sequential(*layers)


def loss_for(case: dict):
    red = case["reduction"]
    if case["loss"] == "mse":
        return lambda m, x, y: F.mse_loss(m(x), y, reduction=red)
    if case["loss"] == "ce":
        return lambda m, x, y: F.cross_entropy(m(x), y, reduction=red)
    return lambda m, x, y: F.binary_cross_entropy_with_logits(m(x), y, reduction=red)


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_random_mlp(case):
    torch.manual_seed(int(case["id"][1:]))
    n, w, extra = case["n"], case["widths"], case["extra"]
    x = torch.randn(n, *extra, w[0], dtype=torch.float64)
    if case["loss"] == "ce":
        y = torch.randint(0, w[-1], (n,))
    elif case["loss"] == "bce":
        y = torch.rand(n, *extra, w[-1], dtype=torch.float64).round()
    else:
        y = torch.randn(n, *extra, w[-1], dtype=torch.float64)
    check_model(lambda: build(case), loss_for(case), (x, y), case["reduction"])
