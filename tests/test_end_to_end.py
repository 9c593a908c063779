"""Whole models against the naive loop, float64: a small CNN on scikit-learn's 8x8
digits, a transformer encoder block built from Linear/Embedding/LayerNorm, and
nn.MultiheadAttention through the torch.func fallback."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradhooks import FallbackWarning
from tests.check import check_model


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 8, 3, padding="same", padding_mode="reflect"),
            nn.GroupNorm(2, 8),
            nn.ReLU(inplace=True),
            nn.AvgPool2d(2),
        )
        self.head = nn.Linear(8 * 2 * 2, 10)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def _digits(n: int):
    datasets = pytest.importorskip("sklearn.datasets")
    data = datasets.load_digits()
    x = torch.tensor(data.images[:n], dtype=torch.float64).unsqueeze(1) / 16.0
    y = torch.tensor(data.target[:n])
    return x, y


class Attention(nn.Module):
    """Causal multi-head self-attention built from nn.Linear."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(d // self.heads)
        mask = torch.ones(t, t, dtype=torch.bool).tril()
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        return self.proj((att @ v).transpose(1, 2).reshape(n, t, d))


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 11, d: int = 8, t: int = 5) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d, padding_idx=0)
        self.pos = nn.Embedding(t, d)
        self.ln1 = nn.LayerNorm(d)
        self.attn = Attention(d, 2)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        positions = torch.arange(ids.shape[1]).unsqueeze(0)  # (1, T): shared by the batch
        h = self.tok(ids) + self.pos(positions)
        h = h + self.attn(self.ln1(h))
        h = h + self.mlp(self.ln2(h))
        return self.head(h)


class MHABlock(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.inp = nn.Linear(4, d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.inp(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head(self.norm(h + a).mean(1))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cnn_on_digits(reduction):
    x, y = _digits(6)
    check_model(DigitsCNN, lambda m, x, y: F.cross_entropy(m(x), y, reduction=reduction), (x, y), reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("n", [1, 4])
def test_transformer_block_on_token_ids(n, reduction):
    torch.manual_seed(n)
    ids = torch.randint(0, 11, (n, 5))
    ids[:, -1] = 0  # padding tokens
    targets = torch.randint(0, 11, (n, 5))

    def loss(m, ids, targets):
        logits = m(ids)
        return F.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1), reduction=reduction) / (
            5 if reduction == "sum" else 1
        )

    check_model(TinyTransformer, loss, (ids, targets), reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_multihead_attention_through_the_fallback(reduction):
    torch.manual_seed(0)
    x = torch.randn(4, 5, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (4,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)
        check_model(MHABlock, lambda m, x, y: F.cross_entropy(m(x), y, reduction=reduction), (x, y), reduction, fallback=True)
