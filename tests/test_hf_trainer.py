"""gradhooks.integrations.transformers on a tiny random-weight GPT-2 (no download):
DPTrainer's every optimizer step against the naive per-sample loop plus replayed
Poisson batches and noise (full model and LoRA), its epsilon against Opacus, its
refusals; PerSampleStatsTrainer's norms against the naive loop."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from gradhooks.integrations.transformers import DPArguments, DPTrainer, PerSampleStatsTrainer, per_sample_loss  # noqa: E402
from gradhooks.privacy import PoissonBatchSampler  # noqa: E402
from tests import dp_reference, reference  # noqa: E402

pytestmark = pytest.mark.backward_mode("one")  # the trainers choose their mode themselves

TOL = {"rtol": 1e-8, "atol": 1e-11}
SIZE, T, L = 24, 8, 4


def tiny_gpt2(lora: bool = False):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=32, n_positions=T, n_embd=16, n_layer=1, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config).double()
    if lora:
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.0))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(generator=torch.Generator().manual_seed(1))
    return model


def data():
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 32, (SIZE, T), generator=gen)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def args(tmp_path, **kw):
    base = {"output_dir": str(tmp_path), "per_device_train_batch_size": L, "num_train_epochs": 1, "max_grad_norm": 0.0,
            "learning_rate": 0.05, "optim": "sgd", "lr_scheduler_type": "constant", "weight_decay": 0.0,
            "report_to": [], "logging_steps": 1, "save_strategy": "no", "use_cpu": True, "seed": 0,
            "dataloader_num_workers": 0, "disable_tqdm": True}
    return transformers.TrainingArguments(**{**base, **kw})


class Capture(transformers.TrainerCallback):
    def __init__(self):
        self.grads = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        self.grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad})


def sample_loss(m, x, y):
    return per_sample_loss(m, {"input_ids": x, "labels": y}).sum()


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_dp_trainer_steps_match_the_naive_loop(tmp_path, lora):
    model = tiny_gpt2(lora)
    ref = copy.deepcopy(model)
    ds = data()
    capture = Capture()
    trainer = DPTrainer(model, args(tmp_path), train_dataset=ds, callbacks=[capture],
                        dp_args=DPArguments(delta=1e-5, max_norm=0.5, noise_multiplier=0.8, max_physical_batch_size=3, seed=3))
    trainer.train()
    x = torch.stack([d["input_ids"] for d in ds])
    sampler = PoissonBatchSampler(SIZE, L / SIZE, generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(4)
    steps = round(SIZE / L)
    assert len(capture.grads) == steps == trainer.dp.steps
    for got in capture.grads:
        idx = sampler.draw()
        want, _ = dp_reference.step(ref, sample_loss, x[idx], x[idx], style={"kind": "flat", "C": 0.5}, L=L, sigma=0.8, gen=gen)
        assert set(got) == set(want)
        for k in want:
            torch.testing.assert_close(got[k], want[k], **TOL)
        with torch.no_grad():
            for k, p in reference.trainable(ref).items():
                p -= 0.05 * want[k]
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, **TOL)
    accountants = pytest.importorskip("opacus.accountants")
    theirs = accountants.RDPAccountant()
    for _ in range(steps):
        theirs.step(noise_multiplier=0.8, sample_rate=L / SIZE)
    assert trainer.dp.epsilon() == theirs.get_epsilon(delta=1e-5)
    logged = [h["epsilon"] for h in trainer.state.log_history if "epsilon" in h]
    assert logged and logged[-1] == trainer.dp.epsilon()


@pytest.mark.parametrize("change,match", [
    ({"gradient_accumulation_steps": 2}, "max_physical_batch_size"),
    ({"max_grad_norm": 1.0}, "max_grad_norm=0"),
])
def test_dp_trainer_refuses(tmp_path, change, match):
    with pytest.raises(ValueError, match=match):
        DPTrainer(tiny_gpt2(), args(tmp_path, **change), train_dataset=data(),
                  dp_args=DPArguments(delta=1e-5, max_norm=1.0, noise_multiplier=1.0))
    trainer = DPTrainer(tiny_gpt2(), args(tmp_path), train_dataset=data(),
                        dp_args=DPArguments(delta=1e-5, max_norm=1.0, noise_multiplier=1.0))
    with pytest.raises(ValueError, match="cannot resume"):
        trainer.train(resume_from_checkpoint=str(tmp_path))


def test_per_sample_loss_is_each_samples_own_token_mean():
    model = tiny_gpt2()
    ds = data()[:3]
    x = torch.stack([d["input_ids"] for d in ds])
    labels = x.clone()
    labels[0, 5:] = -100
    got = per_sample_loss(model, {"input_ids": x, "labels": labels})
    for n in range(3):
        want = model(input_ids=x[n : n + 1], labels=labels[n : n + 1]).loss  # HF's own loss on one sample
        torch.testing.assert_close(got[n], want.double(), rtol=1e-6, atol=0)  # HF computes it in float32


def test_per_sample_stats_trainer_norms(tmp_path):
    """One step on the whole (shuffled) dataset: the logged norms are the naive
    per-sample norms of each sample's share of the Trainer's loss."""
    model = tiny_gpt2()
    ref = copy.deepcopy(model)
    ds = data()[:L]
    trainer = PerSampleStatsTrainer(model, args(tmp_path, max_grad_norm=1.0), train_dataset=ds)
    trainer.train()
    x = torch.stack([d["input_ids"] for d in ds])
    # The Trainer divides the batch's summed token losses by num_items_in_batch, its count of
    # labels != -100 before the shift (L * T), so sample n's share is its own mean times (T - 1) / (L T).
    ps = reference.naive(ref, lambda m, a, b: m(input_ids=a, labels=b).loss.double() * (T - 1) / (L * T), x, x)
    want = reference.norms(ps).sort().values
    torch.testing.assert_close(trainer.last_norms.sort().values, want, **TOL)
    logged = [h for h in trainer.state.log_history if "per_sample_grad_norm_median" in h]
    assert logged and logged[0]["per_sample_grad_norm_max"] == pytest.approx(float(want.max()), rel=1e-12)
    assert "gradient_noise_scale" in logged[0]
