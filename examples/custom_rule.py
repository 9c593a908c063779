"""Per-sample gradients for your own layer: write its rule, register it.

    @gradhooks.register_rule(Scale)              # class Scale(nn.Module): y = x * self.w
    class ScaleRule(gradhooks.Rule):
        def per_sample(self, module: nn.Module, calls: Sequence[gradhooks.Call],
                       names: Sequence[str]) -> dict[str, Tensor]:
            # {name: (N, *p.shape)}, summed over the module's forward calls. Each call has
            # c.input (X, (N, *, d)) and c.grad (G = dloss/dy for the reduced loss, as
            # autograd delivered it; gradhooks rescales for loss_reduction="mean").
            rows = [(c.input * c.grad).reshape(len(c.grad), -1, c.grad.shape[-1]).sum(1) for c in calls]
            return {"w": torch.stack(rows).sum(0)}   # sum over the positions * and the calls

    with gradhooks.per_sample_grads(model) as g:  # Scale is now handled like nn.Linear
        loss_fn(model(x), y).backward()           # g["1.w"]: (N, d); norms(), clip_() work

``per_sample`` is all a rule needs: with ``materialize=False`` the norms and
clipped sums are derived from it one layer at a time (override
``squared_norms`` / ``weighted_sum`` where a cheaper exact form exists). At
exit gradhooks checks the rule's batch sum against what backward put in
``p.grad``: a rule whose sum is wrong raises. A sum cannot see a row given to
the wrong sample, so test the rule itself with ``gradhooks.check_rule`` (every
query against the naive loop, in float64), as ``torch.autograd.gradcheck``
tests a Function::

    gradhooks.check_rule(ScaleRule, Scale(16), torch.randn(8, 6, 16))   # True, or CheckError

    python examples/custom_rule.py
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gradhooks


class Scale(nn.Module):
    """``y = x * w`` with ``x: (N, *, d)``, ``w: (d,)``: a layer gradhooks does not know."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.w


@gradhooks.register_rule(Scale)
class ScaleRule(gradhooks.Rule):
    def per_sample(self, module: nn.Module, calls: Sequence[gradhooks.Call], names: Sequence[str]) -> dict[str, Tensor]:
        # {name: (N, *p.shape)}, summed over the module's forward calls. Each call has
        # c.input (X, (N, *, d)) and c.grad (G = dloss/dy for the reduced loss, as
        # autograd delivered it; gradhooks rescales for loss_reduction="mean").
        rows = [(c.input * c.grad).reshape(len(c.grad), -1, c.grad.shape[-1]).sum(1) for c in calls]
        return {"w": torch.stack(rows).sum(0)}  # summed over the positions * and the calls


class ReshapeBugRule(ScaleRule):
    """``reshape(-1, N, d)`` where ``reshape(N, -1, d)`` was meant: the batch sum is
    right, the rows belong to other samples. The exit check cannot see it."""

    def per_sample(self, module: nn.Module, calls: Sequence[gradhooks.Call], names: Sequence[str]) -> dict[str, Tensor]:
        n, d = calls[0].grad.shape[0], calls[0].grad.shape[-1]
        return {"w": torch.stack([(c.input * c.grad).reshape(-1, n, d).sum(0) for c in calls]).sum(0)}


def naive_loop(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """One backward per sample: ``{name: (N, *p.shape)}``."""
    names, params = zip(*model.named_parameters(), strict=True)
    rows = [torch.autograd.grad(F.cross_entropy(model(x[n : n + 1]), y[n : n + 1]), params) for n in range(len(x))]
    return {name: torch.stack([r[i] for r in rows]) for i, name in enumerate(names)}


class Model(nn.Module):
    """Tokens ``(N, T, 10)`` -> Linear -> Scale -> ReLU -> mean over T -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(10, 16), Scale(16), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.head(self.body(x).mean(1))
        return out


def main() -> None:
    torch.manual_seed(0)
    net = Model()
    x, y = torch.randn(16, 6, 10), torch.randint(0, 3, (16,))

    with gradhooks.per_sample_grads(net) as g:
        F.cross_entropy(net(x), y).backward()
    ref = naive_loop(net, x, y)
    worst = max((g[k] - ref[k]).abs().max().item() for k in ref)
    print(f"per-sample grads of {list(g)}: max |gradhooks - naive loop| = {worst:.1e}")
    assert g["body.1.w"].shape == (16, 16) and worst < 1e-5

    net.zero_grad()
    with gradhooks.per_sample_grads(net, materialize=False) as lean:
        F.cross_entropy(net(x), y).backward()
    gap = (lean.norms() - g.norms()).abs().max().item()
    print(f"materialize=False norms (from per_sample, one layer at a time) differ by {gap:.1e}")
    assert gap < 1e-5

    # check_rule: the rule against the naive loop on a module and inputs of our choice.
    assert gradhooks.check_rule(ScaleRule, Scale(16), torch.randn(8, 6, 16))
    try:
        gradhooks.check_rule(ReshapeBugRule, Scale(16), torch.randn(8, 6, 16))
    except gradhooks.CheckError as err:
        print("check_rule caught the reshape bug:", str(err).splitlines()[1].strip()[:80], "...")
    else:
        raise AssertionError("check_rule should have caught the reshape-order bug")

    # A rule whose batch sum is wrong is caught at exit, not returned.
    class HalfRule(ScaleRule):
        def per_sample(self, module: nn.Module, calls: Sequence[gradhooks.Call], names: Sequence[str]) -> dict[str, Tensor]:
            return {"w": super().per_sample(module, calls, names)["w"] / 2}

    gradhooks.register_rule(Scale, rule=HalfRule(), replace=True)
    try:
        with gradhooks.per_sample_grads(net):
            F.cross_entropy(net(x), y).backward()
    except RuntimeError as err:
        print("wrong rule caught:", str(err).splitlines()[1].strip())
    else:
        raise AssertionError("the exit check should have caught the wrong rule")
    finally:
        gradhooks.register_rule(Scale, rule=ScaleRule(), replace=True)


if __name__ == "__main__":
    main()
