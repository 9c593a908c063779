"""Real model families, built from configurations with random weights (nothing is
downloaded), with default options: every trainable parameter covered, per-sample
gradients, norms, dot products and the clipped ``p.grad`` against a naive
per-sample loop in float64 (both materialize modes, both backward modes).

Models whose code computes in float32 even for float64 inputs (Llama's, Gemma's
and T5's RMS norms upcast to float32) differ from a loop over single samples
by float32 rounding of their own forward (their batched and single-sample
kernels round differently), so they are compared within 1e-5; their
per-sample gradients' mean equals the batch gradient exactly.

Needs the ``zoo`` extra (``transformers``, ``peft``); the vision families
(``timm``, ``torchvision``) run where those import (see ``.ci/run``).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from tests.check import TOL, check_model

N, T, V = 3, 6, 50
FLOAT32_INSIDE = {"rtol": 1e-5, "atol": 1e-7}

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
HAS_PEFT = importlib.util.find_spec("peft") is not None
if HAS_TRANSFORMERS:
    import transformers as C
NO_ZOO = "the zoo extra (pip install -e '.[zoo]': transformers, peft) is not installed"


def _vision_available() -> bool:
    try:
        import timm  # noqa: F401
        import torchvision  # noqa: F401
    except Exception:  # torchvision's CPU import fails beside some torch builds
        return False
    return True


SMALL = dict(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32)


def _ids(n: int) -> torch.Tensor:
    return torch.randint(2, V, (n, T), generator=torch.Generator().manual_seed(n))


def _logits_loss(out: object) -> torch.Tensor:
    z = out.logits if hasattr(out, "logits") else out.last_hidden_state  # type: ignore[attr-defined]
    return z.square().mean(dim=tuple(range(1, z.dim()))).mean()


def _text(make: Callable[[], nn.Module]) -> tuple[Callable[[], nn.Module], Callable[..., torch.Tensor], tuple[torch.Tensor, ...]]:
    return make, lambda m, ids: _logits_loss(m(input_ids=ids)), (_ids(N),)


def _seq2seq(make: Callable[[], nn.Module]):
    dec = torch.randint(2, V, (N, T - 2), generator=torch.Generator().manual_seed(5))
    return make, lambda m, ids, d: _logits_loss(m(input_ids=ids, decoder_input_ids=d)), (_ids(N), dec)


def _whisper() -> nn.Module:
    cfg = C.WhisperConfig(
        vocab_size=V, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=8, max_source_positions=8, max_target_positions=16,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    )
    m = C.WhisperForConditionalGeneration(cfg)
    m.model.decoder.embed_positions.weight.requires_grad_(True)  # trainable decoder positions
    return m


def _whisper_case():
    feats = torch.randn(N, 8, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    dec = torch.randint(3, V, (N, 5), generator=torch.Generator().manual_seed(4))
    return _whisper, lambda m, f, d: _logits_loss(m(input_features=f, decoder_input_ids=d)), (feats, dec)


def _image_case(make: Callable[[], nn.Module], size: int = 16):
    x = torch.randn(N, 3, size, size, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    return make, lambda m, px: _logits_loss(m(pixel_values=px)), (x,)


def _lora(make: Callable[[], nn.Module], targets: list[str]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import peft

        return peft.get_peft_model(make(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets, lora_dropout=0.0))

    return build


def _gpt2() -> nn.Module:
    return C.GPT2LMHeadModel(C.GPT2Config(vocab_size=V, n_embd=16, n_layer=2, n_head=4, n_positions=32, bos_token_id=1, eos_token_id=2))


def _llama() -> nn.Module:
    return C.LlamaForCausalLM(C.LlamaConfig(num_key_value_heads=2, max_position_embeddings=32, **SMALL))


def _gpt2_classifier() -> nn.Module:
    cfg = C.GPT2Config(vocab_size=V, n_embd=16, n_layer=1, n_head=4, n_positions=32, pad_token_id=0, num_labels=3)
    return C.GPT2ForSequenceClassification(cfg)


def _bert_checkpointed() -> nn.Module:
    """HF gradient checkpointing (it needs training mode; no dropout, so the naive loop
    replays the same computation)."""
    cfg = C.BertConfig(max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **SMALL)
    m = C.BertForMaskedLM(cfg)
    getattr(m, "activation_checkpointing_enable", m.gradient_checkpointing_enable)()
    return m.train()


HF = [
    ("gpt2", _text(_gpt2), TOL),
    ("llama", _text(_llama), FLOAT32_INSIDE),
    ("qwen2", _text(lambda: C.Qwen2ForCausalLM(C.Qwen2Config(num_key_value_heads=2, max_position_embeddings=32, **SMALL))), FLOAT32_INSIDE),
    ("mistral", _text(lambda: C.MistralForCausalLM(C.MistralConfig(num_key_value_heads=2, max_position_embeddings=32, **SMALL))), FLOAT32_INSIDE),
    ("gemma", _text(lambda: C.GemmaForCausalLM(C.GemmaConfig(num_key_value_heads=2, head_dim=4, max_position_embeddings=32, **SMALL))), FLOAT32_INSIDE),
    ("gpt-neox", _text(lambda: C.GPTNeoXForCausalLM(C.GPTNeoXConfig(max_position_embeddings=32, **SMALL))), TOL),
    ("bert", _text(lambda: C.BertForMaskedLM(C.BertConfig(max_position_embeddings=32, **SMALL))), TOL),
    ("bert-gradient-checkpointing", _text(_bert_checkpointed), TOL),
    ("roberta", _text(lambda: C.RobertaForMaskedLM(C.RobertaConfig(max_position_embeddings=40, **SMALL))), TOL),
    ("t5", _seq2seq(lambda: C.T5ForConditionalGeneration(C.T5Config(vocab_size=V, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4, relative_attention_num_buckets=8, decoder_start_token_id=0))), FLOAT32_INSIDE),
    ("bart", _seq2seq(lambda: C.BartForConditionalGeneration(C.BartConfig(vocab_size=V, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32))), TOL),
    ("vit", _image_case(lambda: C.ViTForImageClassification(C.ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32, image_size=16, patch_size=8, num_labels=3))), TOL),
    ("whisper-trainable-positions", _whisper_case(), TOL),
    ("clip-text", _text(lambda: C.CLIPTextModel(C.CLIPTextConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16))), TOL),
    ("clip-vision", _image_case(lambda: C.CLIPVisionModel(C.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=8))), TOL),
    ("gpt2-sequence-classification", (_gpt2_classifier, lambda m, ids: m(input_ids=ids).logits.square().sum(-1).mean(),
                                      (torch.tensor([[5, 6, 7, 0, 0], [8, 9, 0, 0, 0], [4, 5, 6, 7, 8]]),)), TOL),
]
if HAS_PEFT:
    HF += [
        ("lora-gpt2", _text(_lora(_gpt2, ["c_attn"])), TOL),
        ("lora-llama", _text(_lora(_llama, ["q_proj", "v_proj"])), FLOAT32_INSIDE),
    ]


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason=NO_ZOO)
@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:fan_in_fan_out:UserWarning")
@pytest.mark.parametrize("name, make, loss, batch, tol", [(c[0], *c[1], c[2]) for c in HF], ids=[c[0] for c in HF])
def test_transformers_family_exact_with_default_options(name, make, loss, batch, tol):
    def build() -> nn.Module:
        m = make()
        return m if "checkpointing" in name else m.eval()  # eval: no dropout to replay

    check_model(build, loss, batch, "mean", use_vmap=False, tol=tol)


# -- torch.nn families -------------------------------------------------------------


class Encoder(nn.Module):
    """``nn.TransformerEncoder`` with a cls token and a position table owned by the root."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        d = 8
        t = 5  # the sequences' length
        self.pos = nn.Parameter(0.1 * torch.randn(1, t, d) if batch_first else 0.1 * torch.randn(t, 1, d))
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        layer = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0, batch_first=batch_first)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.inp, self.head, self.batch_first = nn.Linear(4, d), nn.Linear(d, 3), batch_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        if not self.batch_first:
            return self.head(self.enc(h.transpose(0, 1) + self.pos).mean(0))
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h + self.pos], 1)
        return self.head(self.enc(h)[:, 0])


class Recurrent(nn.Module):
    """A recurrent classifier on padded or packed sequences."""

    def __init__(self, kind: str, packed: bool, **kw: object) -> None:
        super().__init__()
        self.rnn = getattr(nn, kind)(4, 6, **kw)
        self.packed, self.batch_first = packed, bool(kw.get("batch_first"))
        dirs = 2 if kw.get("bidirectional") else 1
        self.head = nn.Linear(dirs * int(kw.get("proj_size") or 6), 3)  # type: ignore[call-overload]

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        seq = x if self.batch_first else x.transpose(0, 1)
        if self.packed:
            seq = nn.utils.rnn.pack_padded_sequence(seq, lengths, batch_first=self.batch_first, enforce_sorted=False)
        out, state = self.rnn(seq)
        if self.packed:
            out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=self.batch_first)
        h = state[0] if isinstance(state, tuple) else state
        return self.head(out.sum(1 if self.batch_first else 0)) + h[-1].sum(-1, keepdim=True)


class Cells(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.cell, self.head = getattr(nn, kind)(4, 5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = None
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
        return self.head(state[0] if isinstance(state, tuple) else state)


class Checkpointed(nn.Module):
    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.a, self.c = nn.Linear(4, 8), nn.Linear(8, 3)
        self.b = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.LayerNorm(8))
        self.reentrant = reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(checkpoint(self.b, self.a(x), use_reentrant=self.reentrant)).mean(1)


class WeightNormed(nn.Module):
    """Weight norm, both ways, and another parametrization (orthogonal)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.utils.parametrizations.weight_norm(nn.Linear(4, 8))
        self.b = nn.utils.weight_norm(nn.Linear(8, 3))  # the legacy hook
        self.c = nn.utils.parametrizations.orthogonal(nn.Linear(4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(self.c(x)))).mean(1)


def _seq(n: int = N) -> torch.Tensor:
    return torch.randn(n, 5, 4, generator=torch.Generator().manual_seed(9), dtype=torch.float64)


LENGTHS = torch.tensor([3, 5, 2])
RECURRENT = [
    ("lstm", "LSTM", {}), ("gru", "GRU", {}), ("rnn-relu-bidirectional", "RNN", {"nonlinearity": "relu", "bidirectional": True}),
    ("lstm-2-layers-bidirectional", "LSTM", {"num_layers": 2, "bidirectional": True}),
    ("gru-batch-first-2-layers", "GRU", {"batch_first": True, "num_layers": 2}),
    ("lstm-proj", "LSTM", {"proj_size": 3, "batch_first": True}), ("lstm-no-bias", "LSTM", {"bias": False}),
]


def _out_loss(m: nn.Module, *xs: torch.Tensor) -> torch.Tensor:
    return m(*xs).square().sum(-1).mean()


TORCH = [
    ("transformer-encoder-batch-first", lambda: Encoder(True), (_seq(),)),
    ("transformer-encoder-sequence-first", lambda: Encoder(False), (_seq(),)),
    ("checkpoint-reentrant", lambda: Checkpointed(True), (_seq(),)),
    ("checkpoint-non-reentrant", lambda: Checkpointed(False), (_seq(),)),
    ("weight-norm", WeightNormed, (_seq(),)),
    *[(f"cell-{k}", (lambda k=k: Cells(k)), (_seq(),)) for k in ("LSTMCell", "GRUCell", "RNNCell")],
    *[(f"{name}{'-packed' if packed else ''}", (lambda k=k, kw=kw, packed=packed: Recurrent(k, packed, **kw)), (_seq(), LENGTHS))
      for name, k, kw in RECURRENT for packed in (False, True)],
]


@pytest.mark.parametrize("name, make, batch", TORCH, ids=[c[0] for c in TORCH])
def test_torch_family_exact_with_default_options(name, make, batch):
    # A reentrant checkpoint refuses torch.autograd.grad: its reference uses backward().
    check_model(make, _out_loss, batch, "mean", use_vmap=False, via_backward=name == "checkpoint-reentrant")


# -- vision: timm and torchvision (where torchvision imports) ------------------------

VISION = [
    ("timm-vit", "vit_tiny_patch16_224", dict(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2), 16),
    ("timm-deit-distilled", "deit_tiny_distilled_patch16_224", dict(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2), 16),
    ("timm-convnext", "convnext_atto", dict(dims=(8, 16, 16, 16), depths=(1, 1, 1, 1)), 32),
    ("torchvision-resnet18-groupnorm", None, {}, 32),
]


def _vision(name: str, arch: str | None, kw: dict[str, object]) -> nn.Module:
    if arch is None:
        import torchvision

        return torchvision.models.resnet18(num_classes=3, norm_layer=lambda c: nn.GroupNorm(2, c))
    import timm

    return timm.create_model(arch, pretrained=False, num_classes=3, **kw)


def _vision_loss(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = m(x)
    out = out[0] if isinstance(out, tuple) else out
    return out.square().sum(-1).mean()


@pytest.mark.skipif(not _vision_available(), reason="timm/torchvision do not import beside this torch (torchvision's CPU build is pinned to another torch); .ci/run runs these in a second environment")
@pytest.mark.parametrize("name, arch, kw, size", VISION, ids=[c[0] for c in VISION])
def test_vision_family_exact_with_default_options(name, arch, kw, size):
    x = torch.randn(N, 3, size, size, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    check_model(lambda: _vision(name, arch, kw).eval(), _vision_loss, (x,), "mean", use_vmap=False)
