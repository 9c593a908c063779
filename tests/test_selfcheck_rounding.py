"""The exit self-check on float32 models with long reductions: PyTorch's CPU backward
sums conv / norm biases and GEMMs over N * positions terms with error far above a
few eps of the result. No false alarm there, and a real unseen gradient still raises."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradhooks import per_sample_grads
from gradhooks.errors import UnseenGradientError
from tests import reference


def _loss(model, x, y):
    out = model(x)
    return F.cross_entropy(out.mean(1) if out.dim() == 3 else out, y)


def _models():
    return {
        "conv2d": (lambda: nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)), (32, 3, 48, 48)),
        "conv1d-long": (lambda: nn.Sequential(nn.Conv1d(8, 16, 5), nn.ReLU(), nn.Conv1d(16, 16, 3),
                                              nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(16, 10)), (32, 8, 4096)),
        "groupnorm": (lambda: nn.Sequential(nn.Conv2d(3, 16, 3), nn.GroupNorm(4, 16), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                            nn.Flatten(), nn.Linear(16, 10)), (32, 3, 48, 48)),
        "groupnorm-per-channel": (lambda: nn.Sequential(nn.Conv2d(3, 16, 3), nn.GroupNorm(16, 16), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                                        nn.Flatten(), nn.Linear(16, 10)), (32, 3, 48, 48)),
        "layernorm-seq": (lambda: nn.Sequential(nn.Linear(32, 64), nn.LayerNorm(64), nn.ReLU(), nn.Linear(64, 10)),
                          (32, 512, 32)),
    }  # fmt: skip


@pytest.mark.parametrize("materialize", [True, False])
@pytest.mark.parametrize("name", list(_models()))
def test_no_false_alarm_in_float32(name, materialize):
    make, shape = _models()[name]
    for seed in range(3):
        torch.manual_seed(seed)
        model = make()
        for p in model.parameters():
            p.data.normal_(0, 0.3)
        x, y = torch.randn(shape), torch.randint(0, 10, (shape[0],))
        with per_sample_grads(model, materialize=materialize) as g:
            _loss(model, x, y).backward()
        if seed == 0:  # and the results are right: against the naive loop
            torch.testing.assert_close(g.norms(), reference.norms(reference.naive(model, _loss, x, y)), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", list(_models()))
def test_unseen_penalty_still_raises(name):
    make, shape = _models()[name]
    torch.manual_seed(0)
    model = make()
    x, y = torch.randn(shape), torch.randint(0, 10, (shape[0],))
    bias = model[0].bias
    with pytest.raises(UnseenGradientError, match="0.bias"):
        with per_sample_grads(model):
            out = model(x)
            loss = F.cross_entropy(out.mean(1) if out.dim() == 3 else out, y)
            (loss + 1e-2 * bias.square().sum()).backward()
