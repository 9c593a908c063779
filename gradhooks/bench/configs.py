"""The benchmark's models and data: float32, random data, ReLU between layers.

Every configuration builds, from a seed, a model, a batch ``(x, y)`` and a loss
``loss(out, y, reduction)`` whose ``"none"`` reduction is ``(N,)`` (one loss
term per sample; ``"mean"`` averages them). ``scale="small"`` gives the same
architecture at tiny sizes (N=4, narrow layers) for the correctness column.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Case", "Config", "CONFIGS", "GROUPS", "select_configs"]

LossFn = Callable[[Tensor, Tensor, str], Tensor]


def bce(out: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
    """Binary cross-entropy with logits; ``out`` ``(N, 1)``, ``y`` ``(N,)`` in {0, 1}."""
    return F.binary_cross_entropy_with_logits(out.squeeze(-1), y, reduction=reduction)


def cross_entropy(out: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy; ``out`` ``(N, classes)``, ``y`` ``(N,)`` class indices."""
    return F.cross_entropy(out, y, reduction=reduction)


def mse(out: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
    """Squared error; ``out`` ``(N, 1)``, ``y`` ``(N,)``."""
    return F.mse_loss(out.squeeze(-1), y, reduction=reduction)


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
    """A named benchmark setting; ``build(scale, dtype, device)`` makes a :class:`Case`."""

    name: str
    description: str
    factory: Callable[[str], Case]

    def build(self, scale: str = "full", dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0) -> Case:
        torch.manual_seed(seed)
        case = self.factory(scale)
        case.model.to(device=device, dtype=dtype)
        x = case.x.to(device=device, dtype=dtype) if case.x.is_floating_point() else case.x.to(device)
        y = case.y.to(device=device, dtype=dtype) if case.y.is_floating_point() else case.y.to(device)
        return Case(case.model, x, y, case.loss)


def relu_mlp(widths: list[int]) -> nn.Sequential:
    """Linear layers ``widths[0] -> ... -> widths[-1]``, ReLU between, He-normal weights
    (keeps activations O(1) through 50 layers)."""
    layers: list[nn.Module] = []
    for k, (i, o) in enumerate(zip(widths[:-1], widths[1:])):
        lin = nn.Linear(i, o)
        nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
        layers.append(lin)
        if k < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def seed_mlp(n: int, width: int, hidden: int) -> Case:
    """The per-example-gradient write-up's MLP: ``hidden`` Linear(width, width) + ReLU,
    a Linear(width, 1) head, BCE with logits; input ``(n, width)``."""
    model = relu_mlp([width] * (hidden + 1) + [1])
    return Case(model, torch.randn(n, width), torch.randint(0, 2, (n,)).float(), bce)


def seed_headline(scale: str) -> Case:
    return seed_mlp(100, 300, 50) if scale == "full" else seed_mlp(4, 6, 50)


def seed_row(n: int, d: int, layers: int) -> Callable[[str], Case]:
    def factory(scale: str) -> Case:
        return seed_mlp(n, d, layers) if scale == "full" else seed_mlp(4, 5, layers)

    return factory


def mnist_mlp(scale: str) -> Case:
    n, widths = (256, [784, 1024, 1024, 10]) if scale == "full" else (4, [12, 9, 8, 10])
    return Case(relu_mlp(widths), torch.randn(n, widths[0]), torch.randint(0, 10, (n,)), cross_entropy)


class SequenceModel(nn.Module):
    """``(N, T, d)``: two Linear(d, d) on the last dim with ReLU, mean over T, Linear(d, 1)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, d)
        self.fc2 = nn.Linear(d, d)
        self.head = nn.Linear(d, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.fc2(torch.relu(self.fc1(x))))
        return self.head(h.mean(1))


def sequence(scale: str) -> Case:
    n, t, d = (32, 128, 256) if scale == "full" else (4, 5, 6)
    return Case(SequenceModel(d), torch.randn(n, t, d), torch.randn(n), mse)


def small_cnn() -> nn.Sequential:
    """CIFAR-like: Conv2d 3->32 k3, ReLU, Conv2d 32->64 k3 stride 2, ReLU, avg-pool, Linear 64->10."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def cnn(scale: str) -> Case:
    n, side = (128, 32) if scale == "full" else (4, 8)
    return Case(small_cnn(), torch.randn(n, 3, side, side), torch.randint(0, 10, (n,)), cross_entropy)


class Attention(nn.Module):
    """Multi-head self-attention built from nn.Linear (q, k, v, out)."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        h = self.heads

        def split(z: Tensor) -> Tensor:
            return z.reshape(n, t, h, d // h).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // h), dim=-1)
        return self.out((weights @ v).transpose(1, 2).reshape(n, t, d))


class TransformerBlock(nn.Module):
    """Token + position embeddings, one pre-norm block (attention, ReLU MLP),
    final LayerNorm, mean over positions, Linear head. Input: token ids ``(N, T)``."""

    def __init__(self, vocab: int, t: int, d: int, heads: int, classes: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(t, d)
        self.ln1 = nn.LayerNorm(d)
        self.attn = Attention(d, heads)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.ReLU(), nn.Linear(4 * d, d))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, ids: Tensor) -> Tensor:
        n, t = ids.shape
        # Position ids as a contiguous (N, T) tensor, so every method sees batch-N
        # inputs (Opacus's ghost embedding norm calls .view() on them: an expanded
        # (1, T) -> (N, T) tensor makes it raise).
        positions = torch.arange(t, device=ids.device).repeat(n, 1)
        h = self.tok(ids) + self.pos(positions)
        h = h + self.attn(self.ln1(h))
        h = h + self.mlp(self.ln2(h))
        return self.head(self.ln_f(h).mean(1))


def transformer(scale: str) -> Case:
    n, t, vocab, d, heads = (32, 64, 1000, 128, 4) if scale == "full" else (4, 5, 11, 8, 2)
    model = TransformerBlock(vocab, t, d, heads, classes=10)
    return Case(model, torch.randint(0, vocab, (n, t)), torch.randint(0, 10, (n,)), cross_entropy)


CONFIGS: dict[str, Config] = {
    c.name: c
    for c in [
        Config("seed-headline", "MLP N=100, 50 hidden layers of width 300, BCE with logits", seed_headline),
        Config("seed-rows-1000x100x10", "MLP N=1000, D=100, L=10, BCE with logits", seed_row(1000, 100, 10)),
        Config("seed-rows-16x1000x1", "MLP N=16, D=1000, L=1, BCE with logits", seed_row(16, 1000, 1)),
        Config("seed-rows-16x5000x1", "MLP N=16, D=5000, L=1, BCE with logits", seed_row(16, 5000, 1)),
        Config("mnist-mlp", "MLP 784-1024-1024-10, N=256, cross-entropy", mnist_mlp),
        Config("sequence", "x (32, 128, 256): 2x Linear 256->256 + ReLU, mean over T, Linear 256->1, MSE", sequence),
        Config("cnn", "CIFAR-like CNN, N=128, 3x32x32: conv 3->32 k3, conv 32->64 k3 s2, avg-pool, Linear, CE", cnn),
        Config("transformer", "N=32, T=64, d=128, vocab 1000: embeddings, LayerNorm, attention, MLP, CE", transformer),
    ]
}

#: Names that ``--configs`` expands to several configurations.
GROUPS: dict[str, list[str]] = {"seed-rows": [n for n in CONFIGS if n.startswith("seed-rows-")]}


def select_configs(spec: str | None) -> list[str]:
    """Comma-separated names or groups (``seed-rows``); ``None`` or ``all``: every config."""
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
