"""The benchmark's configurations: a model, a batch and a loss each, float32, random data.

Every configuration builds, from a seed, a model (:mod:`gradhooks.bench.models`),
a batch ``(x, y)`` and a loss ``loss(out, y, reduction)`` whose ``"none"``
reduction is ``(N,)`` (one loss term per sample; ``"mean"`` averages them).
``scale="small"`` gives the same architecture at tiny sizes (N=4, narrow
layers) for the correctness column. ``label`` is the name plots and tables
show a newcomer; ``name`` is what ``--configs`` takes.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import models

__all__ = ["Case", "Config", "CONFIGS", "GROUPS", "LossFn", "QUICK", "select_configs"]


class LossFn(Protocol):
    def __call__(self, out: Tensor, y: Tensor, reduction: str = "mean") -> Tensor: ...


def bce(out: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
    """Binary cross-entropy with logits; ``out`` ``(N, 1)``, ``y`` ``(N,)`` in {0, 1}."""
    return F.binary_cross_entropy_with_logits(out.squeeze(-1), y, reduction=reduction)


def cross_entropy(out: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy; ``out`` ``(N, classes)``, ``y`` ``(N,)`` class indices."""
    return F.cross_entropy(out, y, reduction=reduction)


def mse(out: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
    """Squared error; ``out`` ``(N, 1)``, ``y`` ``(N,)``."""
    return F.mse_loss(out.squeeze(-1), y, reduction=reduction)


def next_token(out: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
    """Language-model loss: ``out`` ``(N, T, vocab)`` logits, ``y`` ``(N, T)`` targets;
    each sample's term is its mean cross-entropy over the T positions."""
    n, t, v = out.shape
    per_sample = F.cross_entropy(out.reshape(n * t, v), y.reshape(n * t), reduction="none").reshape(n, t).mean(1)
    return per_sample if reduction == "none" else per_sample.sum() if reduction == "sum" else per_sample.mean()


@dataclass
class Case:
    """One instance of a configuration: model, batch and loss."""

    model: nn.Module
    x: Tensor
    y: Tensor
    loss: LossFn

    @property
    def n(self) -> int:
        return int(self.x.shape[0])

    def result_bytes(self) -> int:
        """Size of the per-sample gradients of all trainable parameters, ``N * |theta|``."""
        return sum(self.n * p.numel() * p.element_size() for p in self.model.parameters() if p.requires_grad)


@dataclass
class Config:
    """A named benchmark setting; ``build(scale, dtype, device)`` makes a :class:`Case`.
    ``needs``: modules that must import (else the configuration is skipped, saying so)."""

    name: str
    label: str
    description: str
    factory: Callable[[str], Case]
    needs: tuple[str, ...] = ()

    def missing(self) -> str | None:
        """``None`` when buildable, else why not (``"needs transformers (pip install transformers)"``)."""
        for mod in self.needs:
            try:
                importlib.import_module(mod)
            except Exception as err:  # ImportError, or a broken install
                return f"needs {mod} (pip install {mod}; import failed: {type(err).__name__})"
        return None

    def build(self, scale: str = "full", dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0) -> Case:
        torch.manual_seed(seed)
        case = self.factory(scale)
        case.model.to(device=device, dtype=dtype)
        x = case.x.to(device=device, dtype=dtype) if case.x.is_floating_point() else case.x.to(device)
        y = case.y.to(device=device, dtype=dtype) if case.y.is_floating_point() else case.y.to(device)
        return Case(case.model, x, y, case.loss)


def seed_mlp(n: int, width: int, hidden: int) -> Case:
    """The per-example-gradient write-up's MLP: ``hidden`` Linear(width, width) + ReLU,
    a Linear(width, 1) head, BCE with logits; input ``(n, width)``."""
    model = models.relu_mlp([width] * (hidden + 1) + [1])
    return Case(model, torch.randn(n, width), torch.randint(0, 2, (n,)).float(), bce)


def seed_headline(scale: str) -> Case:
    return seed_mlp(100, 300, 50) if scale == "full" else seed_mlp(4, 6, 50)


def seed_row(n: int, d: int, layers: int) -> Callable[[str], Case]:
    def factory(scale: str) -> Case:
        return seed_mlp(n, d, layers) if scale == "full" else seed_mlp(4, 5, layers)

    return factory


def mnist_mlp(scale: str) -> Case:
    n, widths = (256, [784, 1024, 1024, 10]) if scale == "full" else (4, [12, 9, 8, 10])
    return Case(models.relu_mlp(widths), torch.randn(n, widths[0]), torch.randint(0, 10, (n,)), cross_entropy)


def sequence(scale: str) -> Case:
    n, t, d = (32, 128, 256) if scale == "full" else (4, 5, 6)
    return Case(models.SequenceModel(d), torch.randn(n, t, d), torch.randn(n), mse)


def cnn(scale: str) -> Case:
    n, side = (128, 32) if scale == "full" else (4, 8)
    return Case(models.small_cnn(), torch.randn(n, 3, side, side), torch.randint(0, 10, (n,)), cross_entropy)


def gn_cnn(scale: str) -> Case:
    n, c = (256, 16) if scale == "full" else (4, 4)
    model = models.GroupNormCNN(c, groups=4 if scale == "full" else 2)
    return Case(model, torch.randn(n, 1, 8, 8), torch.randint(0, 10, (n,)), cross_entropy)


def transformer(scale: str) -> Case:
    n, t, vocab, d, heads = (32, 64, 1000, 128, 4) if scale == "full" else (4, 5, 11, 8, 2)
    model = models.Transformer(vocab, t, d, heads, classes=10)
    return Case(model, torch.randint(0, vocab, (n, t)), torch.randint(0, 10, (n,)), cross_entropy)


def transformer_4x256(scale: str) -> Case:
    n, t, vocab, d, heads, blocks = (32, 128, 1000, 256, 4, 4) if scale == "full" else (4, 5, 11, 8, 2, 2)
    model = models.Transformer(vocab, t, d, heads, classes=10, blocks=blocks, activation=nn.GELU)
    return Case(model, torch.randint(0, vocab, (n, t)), torch.randint(0, 10, (n,)), cross_entropy)


def hf_lm(build: Callable[[int, int, int, int, int], nn.Module]) -> Callable[[str], Case]:
    def factory(scale: str) -> Case:
        n, t, vocab, d, layers, heads = (16, 64, 1000, 128, 2, 4) if scale == "full" else (4, 6, 13, 8, 2, 2)
        return Case(build(vocab, t, d, layers, heads), torch.randint(0, vocab, (n, t)), torch.randint(0, vocab, (n, t)), next_token)

    return factory


CONFIGS: dict[str, Config] = {
    c.name: c
    for c in [
        Config("seed-headline", "MLP 50 layers x 300, N=100",
               "MLP N=100, 50 hidden layers of width 300, BCE with logits", seed_headline),
        Config("seed-rows-1000x100x10", "MLP 10 layers x 100, N=1000",
               "MLP N=1000, D=100, L=10, BCE with logits", seed_row(1000, 100, 10)),
        Config("seed-rows-16x1000x1", "MLP 1 layer x 1000, N=16",
               "MLP N=16, D=1000, L=1, BCE with logits", seed_row(16, 1000, 1)),
        Config("seed-rows-16x5000x1", "MLP 1 layer x 5000, N=16",
               "MLP N=16, D=5000, L=1, BCE with logits", seed_row(16, 5000, 1)),
        Config("mnist-mlp", "MLP 784-1024-1024-10, N=256",
               "MLP 784-1024-1024-10, N=256, cross-entropy", mnist_mlp),
        Config("sequence", "Linear on sequences, N=32 T=128",
               "x (32, 128, 256): 2x Linear 256->256 + ReLU, mean over T, Linear 256->1, MSE", sequence),
        Config("cnn", "CNN 3x32x32, N=128",
               "CIFAR-like CNN, N=128, 3x32x32: conv 3->32 k3, conv 32->64 k3 s2, avg-pool, Linear, CE", cnn),
        Config("gn-cnn", "GroupNorm CNN 1x8x8, N=256",
               "digits-shaped 1x8x8, N=256: conv 1->16 k3, GroupNorm(4), conv 16->32 k3, GroupNorm(4), avg-pool, Linear, CE", gn_cnn),
        Config("transformer", "Transformer 1 block d=128, N=32 T=64",
               "N=32, T=64, d=128, vocab 1000: embeddings, LayerNorm, attention, MLP, CE", transformer),
        Config("transformer-4x256", "Transformer 4 blocks d=256, N=32 T=128",
               "N=32, T=128, vocab 1000: embeddings, 4 pre-LN blocks of width 256 (4 heads, GELU MLP 1024), "
               "mean-pooled Linear head, CE", transformer_4x256),
        Config("hf-gpt2", "GPT-2 (Hugging Face) 2 layers d=128, N=16 T=64",
               "transformers GPT2LMHeadModel, random weights: 2 layers, d=128, 4 heads, vocab 1000; N=16, T=64, "
               "next-token CE per sample", hf_lm(models.hf_gpt2), ("transformers",)),
        Config("hf-llama", "Llama (Hugging Face) 2 layers d=128, N=16 T=64",
               "transformers LlamaForCausalLM, random weights: 2 layers, d=128, 4 heads (2 KV), vocab 1000; "
               "N=16, T=64, next-token CE per sample", hf_lm(models.hf_llama), ("transformers",)),
    ]
}

#: ``--quick``'s configurations: small steps (2-40 ms plain), each family once.
QUICK = ["seed-rows-16x1000x1", "sequence", "gn-cnn", "transformer"]

#: Names that ``--configs`` expands to several configurations.
GROUPS: dict[str, list[str]] = {
    "seed-rows": [n for n in CONFIGS if n.startswith("seed-rows-")],
    "hf": [n for n in CONFIGS if n.startswith("hf-")],
    "quick": QUICK,
}


def select_configs(spec: str | None) -> list[str]:
    """Comma-separated names or groups (``seed-rows``, ``hf``, ``quick``); ``None`` or
    ``all``: every config."""
    if not spec or spec == "all":
        return list(CONFIGS)
    out: list[str] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        names = GROUPS.get(part, [part])
        for name in names:
            if name not in CONFIGS:
                known = ", ".join([*CONFIGS, *GROUPS])
                raise ValueError(f"unknown config {name!r}; known: {known}")
            if name not in out:
                out.append(name)
    return out
