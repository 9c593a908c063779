"""The benchmark's model classes: plain PyTorch modules (no gradhooks inside), so
every method, gradhooks and the incumbents alike, runs the same code.

Transformers (Hugging Face) models are built from a random config, never
downloaded; ``transformers`` is imported only when one is built.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = [
    "Attention",
    "Block",
    "GroupNormCNN",
    "LogitsOf",
    "SequenceModel",
    "Transformer",
    "hf_gpt2",
    "hf_llama",
    "relu_mlp",
    "small_cnn",
]


def relu_mlp(widths: list[int]) -> nn.Sequential:
    """Linear layers ``widths[0] -> ... -> widths[-1]``, ReLU between, He-normal weights
    (keeps activations O(1) through 50 layers)."""
    layers: list[nn.Module] = []
    for k, (i, o) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        lin = nn.Linear(i, o)
        nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
        layers.append(lin)
        if k < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


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


class GroupNormCNN(nn.Sequential):
    """Digits-shaped ``(N, 1, 8, 8)`` images: Conv2d 1->c k3 p1, GroupNorm, ReLU,
    Conv2d c->2c k3 p1, GroupNorm, ReLU, avg-pool, Linear 2c->10 (a DP-SGD model:
    GroupNorm, not BatchNorm, so samples stay independent)."""

    def __init__(self, c: int = 16, groups: int = 4) -> None:
        super().__init__(
            nn.Conv2d(1, c, 3, padding=1),
            nn.GroupNorm(groups, c),
            nn.ReLU(),
            nn.Conv2d(c, 2 * c, 3, padding=1),
            nn.GroupNorm(groups, 2 * c),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(2 * c, 10),
        )


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


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``
    with a 4x-wide MLP (``activation`` between its two Linear layers)."""

    def __init__(self, d: int, heads: int, activation: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = Attention(d, heads)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), activation(), nn.Linear(4 * d, d))

    def forward(self, h: Tensor) -> Tensor:
        h = h + self.attn(self.ln1(h))
        return h + self.mlp(self.ln2(h))


class Transformer(nn.Module):
    """Token + position embeddings, ``blocks`` pre-LN blocks, final LayerNorm, mean over
    positions, Linear head to ``classes``. Input: token ids ``(N, T)``; output ``(N, classes)``."""

    def __init__(self, vocab: int, t: int, d: int, heads: int, classes: int, blocks: int = 1,
                 activation: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(t, d)
        self.blocks = nn.Sequential(*[Block(d, heads, activation) for _ in range(blocks)])
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, ids: Tensor) -> Tensor:
        n, t = ids.shape
        # Position ids as a contiguous (N, T) tensor, so every method sees batch-N
        # inputs (Opacus's ghost embedding norm calls .view() on them: an expanded
        # (1, T) -> (N, T) tensor makes it raise).
        positions = torch.arange(t, device=ids.device).repeat(n, 1)
        h = self.blocks(self.tok(ids) + self.pos(positions))
        return self.head(self.ln_f(h).mean(1))


class LogitsOf(nn.Module):
    """``ids (N, T) -> logits (N, T, vocab)`` of a Hugging Face causal LM (its output
    object holds more than a tensor; every method here needs the tensor)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids: Tensor) -> Tensor:
        return self.lm(input_ids=ids).logits


def hf_gpt2(vocab: int, t: int, d: int, layers: int, heads: int) -> LogitsOf:
    """A randomly initialised ``GPT2LMHeadModel`` (eager attention, dropout probabilities 0: the same in train and eval mode)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=vocab, n_positions=t, n_embd=d, n_layer=layers, n_head=heads,
                     bos_token_id=1, eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    cfg._attn_implementation = "eager"
    return LogitsOf(GPT2LMHeadModel(cfg))


def hf_llama(vocab: int, t: int, d: int, layers: int, heads: int) -> LogitsOf:
    """A randomly initialised ``LlamaForCausalLM`` (RMSNorm, rotary positions, grouped
    KV heads, SwiGLU MLP; eager attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                      max_position_embeddings=t, bos_token_id=1, eos_token_id=2)
    cfg._attn_implementation = "eager"
    return LogitsOf(LlamaForCausalLM(cfg))
