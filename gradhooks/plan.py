"""Planning, without hooks: model + options -> what gets covered, and how.

* every parameter with ``requires_grad=True`` is covered, once (a tied
  parameter under its first name in ``model.named_parameters()``);
* a module whose rule is a registered module-level rule (``register_rule``)
  keeps its direct parameters under that rule (a :class:`ModuleSite`); with
  ``fallback=True`` a module without any rule that owns trainable parameters
  is a fallback unit with its whole subtree;
* every other covered parameter is captured per op by the tracer (its
  :class:`~gradhooks.trace.derive.Source`);
* refusals: a compiled wrapper, and modules whose rule says per-sample
  gradients do not exist as configured (BatchNorm in training mode).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from torch import nn

from .errors import UnsupportedModuleError
from .registry import rule_for
from .rule import Rule
from .trace.derive import Source

__all__ = ["Plan", "ModuleSite", "make_plan", "label_of", "FallbackWarning"]


class FallbackWarning(UserWarning):
    """Modules without a rule are being handled through ``torch.func`` (``fallback=True``)."""


def label_of(name: str, module: nn.Module) -> str:
    """How messages name a module: ``'encoder.0' (Linear)``, or ``the model (Net)``."""
    return f"'{name}' ({type(module).__name__})" if name else f"the model ({type(module).__name__})"


@dataclass(eq=False)
class ModuleSite:
    """A module handled as a whole by a module-level rule (or the fallback)."""

    name: str
    module: nn.Module
    rule: Rule
    names: list[str]  # local names of the covered parameters (dotted for a fallback unit)
    fallback: bool = False

    @property
    def label(self) -> str:
        return label_of(self.name, self.module)


@dataclass(eq=False)
class Plan:
    covered: list[Source] = field(default_factory=list)  # in named_parameters order
    module_sites: list[ModuleSite] = field(default_factory=list)
    traced: dict[int, Source] = field(default_factory=dict)  # id(param) -> Source
    labels: dict[int, str] = field(default_factory=dict)  # id(Source) -> owner label
    owners: dict[int, tuple[str, nn.Module]] = field(default_factory=dict)  # id(Source) -> (label, module)
    refusable: list[tuple[str, nn.Module, Rule]] = field(default_factory=list)  # rules that can refuse

    @property
    def fallback_modules(self) -> list[str]:
        return [s.name for s in self.module_sites if s.fallback]


def _compiled(name: str, m: nn.Module) -> None:
    if type(m).__name__ == "OptimizedModule" and type(m).__module__.startswith("torch._dynamo"):
        raise UnsupportedModuleError(
            f"{label_of(name, m)} is a torch.compile'd module: its compiled graph bypasses the "
            "tracing of the ops inside, so per-sample gradients cannot be captured through "
            "it. Use the eager module, which shares the parameters: "
            "per_sample_grads(compiled._orig_mod) and call compiled._orig_mod(x) inside the context."
        )


def make_plan(model: nn.Module, *, fallback: bool) -> Plan:
    """The plan for ``model`` (raises :class:`UnsupportedModuleError` for refusals)."""
    plan = Plan()
    units: list[str] = []  # prefixes of fallback subtrees
    refused = []
    owners: dict[int, tuple[str, nn.Module]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        _compiled(name, m)
        rule = rule_for(m)
        if rule is not None and type(rule).refuse is not Rule.refuse:
            why = rule.refuse(m)
            if why:
                refused.append(f"{label_of(name, m)}: {why}")
            plan.refusable.append((label_of(name, m), m, rule))
        own = [(n, p) for n, p in m.named_parameters(recurse=False) if p.requires_grad]
        for _, p in own:
            owners.setdefault(id(p), (label_of(name, m), m))
        if not own or any(name == u or u == "" or name.startswith(u + ".") for u in units):
            continue
        if rule is not None and not rule.by_ops:
            plan.module_sites.append(ModuleSite(name, m, rule, [n for n, _ in own]))
        elif rule is None and fallback:
            from .rules.fallback import FallbackRule

            names = [n for n, p in m.named_parameters() if p.requires_grad]
            plan.module_sites.append(ModuleSite(name, m, FallbackRule(label_of(name, m)), names, fallback=True))
            units.append(name)
    if refused:
        raise UnsupportedModuleError("per-sample gradients do not exist for this model as configured:\n  " + "\n  ".join(dict.fromkeys(refused)))
    for name, p in model.named_parameters():  # tied parameters once, under their first name
        if not p.requires_grad:
            continue
        src = Source(p, name)
        plan.covered.append(src)
        plan.labels[id(src)] = owners[id(p)][0] if id(p) in owners else repr(name)
        if id(p) in owners:
            plan.owners[id(src)] = owners[id(p)]
        # Traced everywhere except inside the forward of the module-level rule that
        # covers it (a weight tied across such a module and others counts both).
        plan.traced[id(p)] = src
    if plan.fallback_modules:
        warnings.warn(
            "per_sample_grads(fallback=True): computing per-sample gradients through torch.func for "
            f"{', '.join(s.label for s in plan.module_sites if s.fallback)} (each module with its whole "
            "subtree; valid when it treats samples independently)",
            FallbackWarning,
            stacklevel=4,
        )
    return plan
