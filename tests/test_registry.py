"""gradhooks.register_rule: a user's rule is used exactly like a built-in one
(against the naive loop and torch.func, float64), lookup by class hierarchy,
the overwrite guard, type checks, unregistering, and the exit check catching a
rule whose math is wrong."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gradhooks
from gradhooks import Call, Rule, per_sample_grads, register_rule, rule_for, unregister_rule
from gradhooks import registry as registry_module
from tests import reference
from tests.check import TOL, check_model


class Scale(nn.Module):
    """``y = x * w``, ``x: (N, *, d)``: not a built-in type."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(d))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.w


class ScaleChild(Scale):
    """A subclass: uses ``Scale``'s rule unless it has its own."""


def _per_sample_w(calls: Sequence[Call]) -> Tensor:
    """``(N, d)``: ``sum_t x_nt * g_nt``, summed over calls."""
    total = 0
    for c in calls:
        xg = c.input * c.grad
        total = total + xg.reshape(xg.shape[0], -1, xg.shape[-1]).sum(1)
    return total


class ScaleRule(Rule):
    """Only ``per_sample``: every other method comes from the ``Rule`` defaults."""

    def __init__(self) -> None:
        self.used: list[str] = []

    def per_sample(self, module: nn.Module, calls: Sequence[Call], names: Sequence[str]) -> dict[str, Tensor]:
        self.used.append("per_sample")
        return {"w": _per_sample_w(calls)}


class ScaleNormRule(ScaleRule):
    """Adds its own ``squared_norms`` (a Gram form over positions and calls): what
    ``materialize=False`` norms must then use."""

    def squared_norms(self, module: nn.Module, calls: Sequence[Call], names: Sequence[str]) -> dict[str, Tensor]:
        self.used.append("squared_norms")
        xs = [c.input.reshape(c.input.shape[0], -1, c.input.shape[-1]) for c in calls]
        gs = [c.grad.reshape(c.grad.shape[0], -1, c.grad.shape[-1]) for c in calls]
        x, g = torch.cat(xs, 1), torch.cat(gs, 1)
        # ||sum_t x_t * g_t||^2 = sum_{t,u} <x_t * g_t, x_u * g_u>
        return {"w": torch.einsum("ntd,nud->n", x * g, x * g)}


class HalfRule(ScaleRule):
    """Wrong math: half the true gradient."""

    def per_sample(self, module: nn.Module, calls: Sequence[Call], names: Sequence[str]) -> dict[str, Tensor]:
        return {"w": _per_sample_w(calls) / 2}


@pytest.fixture
def clean_registry() -> Iterator[None]:
    """Undo every registration the test made (through the public API), then check
    the registry is exactly as before, so tests cannot leak into each other."""
    before = dict(registry_module._RULES)
    yield
    for t, rule in list(registry_module._RULES.items()):
        if t not in before:
            unregister_rule(t)
        elif rule is not before[t]:
            register_rule(t, rule=before[t], replace=True)
    assert registry_module._RULES == before


def _register(form: str, rule_cls: type[Rule], *types: type[nn.Module]) -> Rule:
    """Register ``rule_cls`` in the decorator form or the ``rule=`` form; the instance."""
    if form == "decorator":
        assert register_rule(*types)(rule_cls) is rule_cls
    else:
        instance = rule_cls()
        assert register_rule(*types, rule=instance) is instance
    return registry_module._RULES[types[0]]


def _model(d: int = 4) -> nn.Module:
    return nn.Sequential(nn.Linear(5, d), Scale(d), nn.Tanh(), nn.Linear(d, 3))


def _seq_model() -> nn.Module:
    """``Scale`` on ``(N, T, d)``, and called twice."""

    class TwiceSeq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(5, 4)
            self.s = Scale(4)
            self.out = nn.Linear(4, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.out(torch.tanh(self.s(torch.tanh(self.s(self.inp(x)))))).mean(1)

    return TwiceSeq()


def ce(reduction: str):
    return lambda m, x, y: F.cross_entropy(m(x), y, reduction=reduction)


CASES = [
    ("flat", _model, lambda n: torch.randn(n, 5, dtype=torch.float64)),
    ("seq-twice", _seq_model, lambda n: torch.randn(n, 3, 5, dtype=torch.float64)),
]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("n", [1, 6], ids=["N=1", "N=6"])
@pytest.mark.parametrize("make, make_x", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
@pytest.mark.parametrize("form", ["decorator", "rule="])
@pytest.mark.parametrize("rule_cls", [ScaleRule, ScaleNormRule], ids=["per_sample-only", "own-squared_norms"])
def test_registered_rule_is_used_like_a_builtin(clean_registry, rule_cls, form, make, make_x, n, reduction):
    instance = _register(form, rule_cls, Scale)
    torch.manual_seed(n)
    check_model(make, ce(reduction), (make_x(n), torch.randint(0, 3, (n,))), reduction)
    assert "per_sample" in instance.used  # the exit check's probe, at least
    assert ("squared_norms" in instance.used) == (rule_cls is ScaleNormRule)


def test_decorator_on_an_instance_and_several_types(clean_registry):
    class Other(Scale):
        pass

    instance = ScaleRule()
    assert register_rule(ScaleChild, Other)(instance) is instance
    assert rule_for(ScaleChild(2)) is instance and rule_for(Other(2)) is instance
    assert rule_for(Scale(2)) is None


def test_subclass_of_linear_uses_the_linear_rule():
    class MyLinear(nn.Linear):
        pass

    assert rule_for(MyLinear(2, 3)) is rule_for(nn.Linear(2, 3)) is not None
    make = lambda: nn.Sequential(MyLinear(5, 4), nn.Tanh(), MyLinear(4, 3))  # noqa: E731
    check_model(make, ce("sum"), (torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))), "sum")


def test_own_rule_overrides_the_parents(clean_registry):
    parent, child = _register("rule=", ScaleRule, Scale), _register("rule=", ScaleRule, ScaleChild)
    assert rule_for(Scale(2)) is parent and rule_for(ScaleChild(2)) is child

    class Grandchild(ScaleChild):
        pass

    assert rule_for(Grandchild(2)) is child
    model = nn.Sequential(nn.Linear(5, 4), Scale(4), ScaleChild(4), nn.Linear(4, 3)).double()
    x, y = torch.randn(3, 5, dtype=torch.float64), torch.randint(0, 3, (3,))
    with per_sample_grads(model) as g:
        ce("mean")(model, x, y).backward()
    assert parent.used and child.used
    ref = reference.naive(model, ce("mean"), x, y)
    for k in ref:
        torch.testing.assert_close(g[k], ref[k], **TOL)


def test_registering_twice_needs_replace(clean_registry):
    first = _register("rule=", ScaleRule, Scale)
    with pytest.raises(ValueError, match=r"Scale.*replace=True"):
        register_rule(Scale, rule=ScaleRule())
    with pytest.raises(ValueError, match="replace=True"):
        register_rule(Scale)(ScaleRule)
    assert rule_for(Scale(2)) is first
    assert register_rule(Scale, rule=first) is first  # the same instance again is no conflict
    second = register_rule(Scale, rule=ScaleRule(), replace=True)
    assert rule_for(Scale(2)) is second is not first


def test_builtin_needs_replace_too(clean_registry):
    linear = rule_for(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"Linear.*replace=True"):
        register_rule(nn.Linear, rule=ScaleRule())
    assert rule_for(nn.Linear(2, 2)) is linear


@pytest.mark.parametrize(
    "call",
    [
        lambda: register_rule(int, rule=ScaleRule()),
        lambda: register_rule(Scale(2), rule=ScaleRule()),
        lambda: register_rule(rule=ScaleRule()),
        lambda: register_rule(Scale, rule=object()),
        lambda: register_rule(Scale, rule=ScaleRule.per_sample),
        lambda: register_rule(Scale)(type("NotARule", (), {})),
        lambda: register_rule(Scale, rule=nn.Linear),
    ],
    ids=["int-type", "module-instance", "no-type", "object", "function", "plain-class", "module-as-rule"],
)
def test_bad_registrations_raise_type_error(clean_registry, call):
    with pytest.raises(TypeError, match="register_rule"):
        call()
    assert rule_for(Scale(2)) is None


def test_unregister_restores(clean_registry):
    rule = _register("decorator", ScaleRule, Scale)
    assert unregister_rule(Scale) is rule
    assert rule_for(Scale(2)) is None
    # Without a rule, Scale is handled by how it uses its parameter (x * w).
    check_model(_model, ce("mean"), (torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))), "mean")
    assert not rule.used
    with pytest.raises(KeyError, match="Scale"):
        unregister_rule(Scale)

    class MyLinear(nn.Linear):
        pass

    mine = register_rule(MyLinear, rule=ScaleRule())
    assert rule_for(MyLinear(2, 2)) is mine
    unregister_rule(MyLinear)
    assert rule_for(MyLinear(2, 2)) is rule_for(nn.Linear(2, 2))  # back to the parent's


@pytest.mark.parametrize("materialize", [True, False])
def test_wrong_rule_is_caught_at_exit(clean_registry, materialize):
    register_rule(Scale, rule=HalfRule())
    model = _model().double()
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    with pytest.raises(RuntimeError, match=r"'1\.w'") as info:
        with per_sample_grads(model, materialize=materialize) as g:
            ce("mean")(model, x, y).backward()
    assert "0.weight" not in str(info.value)  # the built-in rules' parameters are fine
    with pytest.raises(RuntimeError, match="raised at exit"):
        g.norms()


def test_public_surface():
    assert gradhooks.register_rule is register_rule and gradhooks.Rule is Rule
    assert "register_rule" in gradhooks.__all__ and "unregister_rule" in gradhooks.__all__


class Temperature(nn.Module):
    """A 0-dim parameter: ``y = x / t``."""

    def __init__(self) -> None:
        super().__init__()
        self.t = nn.Parameter(torch.tensor(2.0))

    def forward(self, x: Tensor) -> Tensor:
        return x / self.t


class TemperatureRule(Rule):
    def per_sample(self, module: nn.Module, calls: Sequence[Call], names: Sequence[str]) -> dict[str, Tensor]:
        t = module.get_parameter("t")
        return {"t": sum(-(c.input * c.grad).flatten(1).sum(1) / t.square() for c in calls)}


@pytest.mark.parametrize("materialize", [True, False])
def test_scalar_parameter_through_the_defaults(clean_registry, materialize):
    register_rule(Temperature, rule=TemperatureRule())
    model = nn.Sequential(nn.Linear(5, 3), Temperature()).double()
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    ref = reference.naive(model, ce("sum"), x, y)
    with per_sample_grads(model, loss_reduction="sum", materialize=materialize) as g:
        ce("sum")(model, x, y).backward()
    torch.testing.assert_close(g.param_norms()["1.t"], ref["1.t"].abs(), **TOL)
