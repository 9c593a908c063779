"""Hugging Face ``Trainer`` subclasses: DP-SGD (:class:`DPTrainer`) and per-sample
gradient diagnostics (:class:`PerSampleStatsTrainer`). Imports ``transformers``
(only this module does)::

    from gradhooks.integrations.transformers import DPArguments, DPTrainer

    args = TrainingArguments(output_dir, per_device_train_batch_size=256,   # expected batch size L
                             num_train_epochs=3, max_grad_norm=0.0, ...)
    trainer = DPTrainer(model, args, train_dataset=train, data_collator=collator,
                        dp_args=DPArguments(target_epsilon=8.0, delta=1e-5, max_norm=1.0,
                                            max_physical_batch_size=32))
    trainer.train()
    trainer.dp.epsilon()

``DPTrainer`` draws Poisson logical batches of expected size
``per_device_train_batch_size`` (its data loader yields one logical batch per
optimizer step, empty ones included), runs each in physical micro-batches of
at most ``max_physical_batch_size`` through :class:`gradhooks.privacy.DPSGD`
(per-sample clipping, one noise draw, one accountant step), then lets the
Trainer step the optimizer and scheduler as usual; ``epsilon`` is logged.
The loss is computed per sample (:func:`per_sample_loss`), never as one mean
over the batch's tokens: a token mean couples the samples (each one's
gradient would depend on the others' lengths), which breaks the clipping bound.

Refused, with the reason: ``gradient_accumulation_steps != 1`` (use
``max_physical_batch_size``), ``max_grad_norm > 0`` (clipping is per sample),
``fp16`` (its loss scaling is not wired in; bf16 works), more than one
process, resuming from a Trainer checkpoint (the Trainer replays the data
loader to skip batches, which would redraw Poisson batches).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sized
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler

from ..context import per_sample_grads
from ..diagnostics import noise_scale
from ..errors import ArgumentTypeError, ContextStateError, InvalidArgumentError
from ..privacy import DPSGD, Clipping
from ..privacy.accounting import Mechanism

try:
    from transformers import Trainer
except ImportError as err:  # pragma: no cover - exercised only without transformers
    raise ImportError("gradhooks.integrations.transformers needs transformers: pip install transformers") from err

__all__ = ["DPArguments", "DPTrainer", "PerSampleStatsTrainer", "per_sample_loss"]

_KEY = "gradhooks_examples"


def per_sample_loss(model: nn.Module, inputs: dict[str, Any]) -> Tensor:
    """``(N,)``: each sample's own loss, from ``inputs["labels"]``.

    Labels ``(N,)``: cross-entropy per sample (squared error for one float output).
    Labels ``(N, T)``: each sample's mean token cross-entropy over its labels
    ``!= -100``, shifted by one position for causal language models (as their own
    loss does). Pass your own function to :class:`DPTrainer` for anything else.
    """
    inputs = dict(inputs)
    labels = inputs.pop("labels", None)
    if labels is None:
        raise InvalidArgumentError("per_sample_loss: the batch has no 'labels'; pass per_sample_loss= your own loss function")
    logits = model(**inputs).logits
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if labels.dim() == 1:
        if logits.shape[-1] == 1 and labels.is_floating_point():
            return (logits.squeeze(-1) - labels.to(logits.dtype)).square()
        return F.cross_entropy(logits, labels, reduction="none")
    if _is_causal_lm(model):
        logits, labels = logits[:, :-1], labels[:, 1:]
    tokens = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=-100, reduction="none")
    mask = labels.ne(-100)
    return (tokens.view(labels.shape) * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def _is_causal_lm(model: nn.Module) -> bool:
    """A causal language model (its labels are the inputs, predicted one position on)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    get_base = getattr(model, "get_base_model", None)  # peft
    base = get_base() if callable(get_base) else model
    name = type(base).__name__
    return name.endswith("ForCausalLM") or name in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


@dataclass
class DPArguments:
    """The DP settings :class:`DPTrainer` adds to ``TrainingArguments`` (see
    :class:`gradhooks.privacy.DPSGD`; the expected batch size is
    ``per_device_train_batch_size``, the epochs ``num_train_epochs``).
    ``seed``: the batches' generator is seeded with it, the noise's with ``seed + 1``
    (default: ``TrainingArguments.seed``)."""

    delta: float
    max_norm: float | None = None
    clipping: Clipping | None = None
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    max_physical_batch_size: int | None = None
    accountant: Mechanism = "rdp"
    seed: int | None = None


def _keep(examples: list[Any]) -> dict[str, list[Any]]:
    """Collate of a logical batch: the examples themselves (collated per micro-batch later)."""
    return {_KEY: examples}


class _LogicalBatches(Sampler[list[int]]):
    """One Poisson logical batch per step, drawn by the trainer's ``DPSGD`` sampler."""

    def __init__(self, trainer: DPTrainer, steps: int) -> None:
        self.trainer = trainer
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        dp = self.trainer.dp
        if dp is None:
            raise ContextStateError("DPTrainer: the optimizer (and its DPSGD) must exist before the training batches are drawn")
        for _ in range(self.steps):
            yield dp.sampler.draw().tolist()


class PerSampleStatsTrainer(Trainer):
    """A ``Trainer`` that also logs per-sample gradient statistics of every step
    (not differentially private): the median and max of the per-sample norms and
    the gradient noise scale ``B_simple`` (McCandlish et al. 2018; ratio of the
    averages of its two unbiased estimates since the last log).

    Training is unchanged: backward fills ``p.grad`` as usual, the per-sample
    results come from ``per_sample_grads(materialize=False)`` around each
    micro-batch's ``training_step``; ``g_n`` is sample n's share of the batch loss
    as the Trainer computes it. ``last_norms``: the last micro-batch's norms.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.last_norms: Tensor | None = None
        self._stats: dict[str, list[float]] = {"norms": [], "trace_cov": [], "grad_sq": []}

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Tensor:
        scaler = getattr(self.accelerator, "scaler", None)
        with per_sample_grads(self.accelerator.unwrap_model(model), loss_reduction="sum", materialize=False,
                              grad_scaler=scaler) as g:
            loss = super().training_step(model, inputs, num_items_in_batch)
        self.last_norms = g.norms().detach()
        self._stats["norms"].extend(self.last_norms.tolist())
        if g.batch_size > 1:
            ns = noise_scale(g)
            self._stats["trace_cov"].append(float(ns.trace_cov))
            self._stats["grad_sq"].append(float(ns.grad_sq))
        return loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        norms = self._stats["norms"]
        if norms and "loss" in logs:
            t = torch.tensor(norms, dtype=torch.float64)
            logs["per_sample_grad_norm_median"] = float(t.median())
            logs["per_sample_grad_norm_max"] = float(t.max())
            if self._stats["grad_sq"]:
                mean_sq = sum(self._stats["grad_sq"]) / len(self._stats["grad_sq"])
                logs["gradient_noise_scale"] = sum(self._stats["trace_cov"]) / len(self._stats["trace_cov"]) / mean_sq if mean_sq else math.nan
            self._stats = {k: [] for k in self._stats}
        super().log(logs, *args, **kwargs)


class DPTrainer(Trainer):
    """A ``Trainer`` running DP-SGD (see the module docstring).

    ``dp_args``: :class:`DPArguments`. ``per_sample_loss``: ``(model, inputs) -> (N,)``,
    each sample's own loss (default :func:`per_sample_loss`). ``log_per_sample_stats``:
    also log the median per-sample norm and the fraction of clipped samples; these
    are computed from the private data without noise and are *not* covered by the
    guarantee (nor is the logged training loss). ``trainer.dp`` is the
    :class:`~gradhooks.privacy.DPSGD` (created with the optimizer): ``epsilon()``,
    ``state_dict()``.
    """

    def __init__(self, *args: Any, dp_args: DPArguments, per_sample_loss: Callable[[nn.Module, dict[str, Any]], Tensor] = per_sample_loss,
                 log_per_sample_stats: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(dp_args, DPArguments):
            raise ArgumentTypeError(f"DPTrainer: dp_args must be a DPArguments, got {type(dp_args).__name__}")
        a = self.args
        problems = [
            (a.gradient_accumulation_steps != 1, "gradient_accumulation_steps must be 1: use DPArguments(max_physical_batch_size=...) for logical batches larger than memory"),
            (bool(a.max_grad_norm), "set max_grad_norm=0 in TrainingArguments: DP clipping is per sample (DPArguments.max_norm or clipping)"),
            (bool(a.fp16), "fp16 loss scaling is not supported by DPTrainer; use bf16 or float32"),
            (a.world_size > 1, "DPTrainer runs in one process; for DDP use gradhooks.privacy.DPSGD directly"),
            (self.train_dataset is None or not hasattr(self.train_dataset, "__len__"), "train_dataset must be a sized dataset (Poisson sampling needs its size)"),
            (dp_args.target_epsilon is not None and (a.max_steps > 0 or float(a.num_train_epochs) != int(a.num_train_epochs)),
             "with target_epsilon, give a whole num_train_epochs and no max_steps (the noise is calibrated for them)"),
        ]
        bad = [why for cond, why in problems if cond]
        if bad:
            raise InvalidArgumentError("DPTrainer: " + "; ".join(bad))
        self.dp_args = dp_args
        self.per_sample_loss = per_sample_loss
        self.log_per_sample_stats = log_per_sample_stats
        self.dp: DPSGD | None = None
        self._collate: Callable[[list[Any]], Any] = self.data_collator

    def _logical_size(self) -> float:
        return float(self.args.per_device_train_batch_size)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        if self.dp is None:
            d, a = self.dp_args, self.args
            seed = a.seed if d.seed is None else d.seed
            assert self.model is not None
            assert isinstance(self.train_dataset, Sized)  # checked in __init__
            device = next(self.model.parameters()).device
            self.dp = DPSGD(
                self.model, optimizer, dataset_size=len(self.train_dataset), expected_batch_size=self._logical_size(),
                delta=d.delta, max_norm=d.max_norm, clipping=d.clipping, noise_multiplier=d.noise_multiplier,
                target_epsilon=d.target_epsilon, epochs=int(a.num_train_epochs) if d.target_epsilon is not None else None,
                max_physical_batch_size=d.max_physical_batch_size, accountant=d.accountant,
                sample_generator=torch.Generator().manual_seed(seed),
                noise_generator=torch.Generator(device=device).manual_seed(seed + 1),
            )
            self.dp._external_step = True  # the Trainer steps the optimizer after training_step
        return optimizer

    def get_train_dataloader(self) -> DataLoader:
        dataset = self.train_dataset
        assert isinstance(dataset, Sized)  # checked in __init__
        try:
            import datasets  # pyright: ignore[reportMissingImports]

            is_hf = isinstance(dataset, datasets.Dataset)
        except ImportError:
            is_hf = False
        if is_hf:
            dataset = self._remove_unused_columns(dataset, description="training")
            self._collate = self.data_collator
        else:
            self._collate = self._get_collator_with_removed_columns(self.data_collator, description="training")
        steps = max(1, round(len(dataset) / self._logical_size()))
        # torch types DataLoader's dataset as a torch Dataset; any sized map-style one works (HF datasets).
        return DataLoader(dataset, batch_sampler=_LogicalBatches(self, steps), collate_fn=_keep,  # type: ignore[arg-type]
                          num_workers=self.args.dataloader_num_workers)

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Tensor:
        dp = self.dp
        assert dp is not None
        examples = inputs[_KEY]
        model.train()
        dp._open()
        total = torch.zeros((), dtype=torch.float64)
        try:
            for chunk in dp._micro_batches(torch.arange(len(examples))):
                micro = self._prepare_inputs(self._collate([examples[i] for i in chunk.tolist()]))
                with dp.step():
                    with self.compute_loss_context_manager():
                        loss = self.per_sample_loss(model, micro).sum()
                    loss.backward()
                total += float(loss.detach())
        finally:
            dp._pending = None
            if dp._batch is not None:
                dp._abandon()
        return (total / max(len(examples), 1)).to(device=self.args.device, dtype=torch.float32)

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        return 0  # a logical batch is a list of examples; FLOPs are not estimated

    def train(self, resume_from_checkpoint: Any = None, *args: Any, **kwargs: Any) -> Any:
        if resume_from_checkpoint:
            raise InvalidArgumentError(
                "DPTrainer cannot resume from a Trainer checkpoint: the Trainer replays the data loader to skip "
                "batches, which would draw new Poisson batches. Train in one run, or use gradhooks.privacy.DPSGD "
                "with its state_dict() / load_state_dict()."
            )
        return super().train(None, *args, **kwargs)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        dp = self.dp
        if dp is not None and "loss" in logs:
            try:
                logs["epsilon"] = dp.epsilon()
            except ImportError:
                pass
            if self.log_per_sample_stats and dp.last_norms:
                norms = torch.cat(dp.last_norms)
                logs["per_sample_grad_norm_median"] = float(norms.median())
                c = getattr(dp.clipping, "max_norm", None)
                if isinstance(c, float):
                    logs["clipped_fraction"] = float((norms > c).double().mean())
        super().log(logs, *args, **kwargs)
