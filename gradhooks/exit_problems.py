"""What the recording of a forward says is wrong, raised (or warned) at exit:
uses whose samples mix (``UnsupportedModuleError``), uses without a rule, a
batch size that differs between inputs (``BatchSizeError``), uses that cannot
be attributed to samples (``BatchLayoutError``), and a loss reduced otherwise
than ``loss_reduction`` says (``LossReductionWarning``)."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from .errors import BatchLayoutError, LossReductionWarning, UnsupportedModuleError
from .hooks import batch_size_error

if TYPE_CHECKING:
    from .finish import Options, State
    from .recording import Problem

__all__ = ["check_loss_reduction", "raise_problems", "reduced_notes", "unsupported_message"]


def unsupported_message(problems: list[Problem]) -> str:
    lines = sorted({f"{p.label}: {p.why} (in {p.op})" for p in problems})
    return (
        "per-sample gradients cannot be computed exactly for these parameter uses:\n  " + "\n  ".join(lines)
        + "\nRemedies: pass fallback=True to handle modules without a rule through torch.func (valid "
        "when the module treats the samples of a batch independently), strict=False to leave these "
        "modules' direct parameters out, or add a rule with gradhooks.register_rule."
    )


def raise_problems(state: State, options: Options) -> None:
    probs = state.rec.problems
    coupled = [p for p in probs if p.kind == "coupled"]
    if coupled:
        lines = sorted({f"{p.label or 'a batch_norm call'}: {p.why}" for p in coupled})
        raise UnsupportedModuleError("per-sample gradients do not exist for this model as run:\n  " + "\n  ".join(lines))
    unsupported = [p for p in probs if p.kind == "unsupported"]
    if unsupported and options.strict:
        raise UnsupportedModuleError(unsupported_message(unsupported))
    if state.batch_sizes:
        raise batch_size_error(state.batch_sizes, state.tracer.n or 0)
    layout = [p for p in probs if p.kind == "layout"]
    if layout:
        lines = sorted({f"{p.label}: {p.why} (in {p.op})" for p in layout})
        raise BatchLayoutError(
            "these parameter uses cannot be attributed to the samples of the batch exactly "
            f"(batch size {state.tracer.n} from the model's input):\n  " + "\n  ".join(lines)
            + "\nThe batch must stay in one dimension of every tensor that meets a parameter (gradhooks "
            "follows it through views, transposes and broadcasts); a slice, a reduction or a mix of "
            "the samples before the use has no per-sample gradient."
        )
    check_loss_reduction(state, options)


def check_loss_reduction(state: State, options: Options) -> None:
    """A loss passed to backward() as it came out of a sum (mean) over the batch while
    ``loss_reduction`` says mean (sum) would make every per-sample result N times off."""
    seen, n = state.tracer.loss_reductions, state.tracer.n or 0
    other = "sum" if options.loss_reduction == "mean" else "mean"
    if n <= 1 or not seen or any(kind != other for kind, _ in seen):
        return
    ops = ", ".join(sorted({op for _, op in seen}))
    warnings.warn(
        f"per_sample_grads(loss_reduction={options.loss_reduction!r}), but the loss passed to backward() "
        f"is a {other} over the batch ({ops}): every per-sample gradient and norm (and so every clip factor) is "
        f"{n} times {'too large' if other == 'sum' else 'too small'}. Pass loss_reduction={other!r} "
        f"(or reduce the loss with a {options.loss_reduction}).",
        LossReductionWarning,
        stacklevel=6,  # the user's with statement
    )


def reduced_notes(state: State) -> str:
    """Where parameters met a tensor already reduced over the batch (a penalty, or a
    batch statistic such as ``x.mean(0)``), for an error message; empty if nowhere."""
    if not state.rec.notes:
        return ""
    where = "; ".join(sorted({f"{label} in {op} ({why})" for label, op, why in state.rec.notes}))
    return f"\nParameters combined with a tensor already reduced over the batch: {where}."
