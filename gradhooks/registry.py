"""Module type -> rule. The one place rules are looked up.

Lookup walks the module's class hierarchy (``type(module).__mro__``) and takes
the nearest registered class, so a subclass of ``nn.Linear`` uses the Linear
rule. A subclass that overrides ``forward`` does not inherit a rule (unless the
rule declares ``subclass_forward_ok``): it is handled by how its forward uses
its parameters, like any module without a rule.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar, overload

from torch import nn

from .errors import ArgumentTypeError, InvalidArgumentError, UnknownNameError
from .rule import Rule

__all__ = ["register_rule", "unregister_rule", "rule_for", "registered_rule"]

_RULES: dict[type[nn.Module], Rule] = {}

R = TypeVar("R", Rule, type[Rule])


def _check_types(module_types: tuple[type[nn.Module], ...]) -> None:
    if not module_types:
        raise ArgumentTypeError("register_rule needs at least one module type, e.g. register_rule(MyLayer)")
    for t in module_types:
        if not (isinstance(t, type) and issubclass(t, nn.Module)):
            raise ArgumentTypeError(f"register_rule: {t!r} is not a subclass of torch.nn.Module")


def _install(module_types: tuple[type[nn.Module], ...], rule: Rule | type[Rule], replace: bool) -> Rule:
    instance = rule() if isinstance(rule, type) and issubclass(rule, Rule) else rule
    if not isinstance(instance, Rule):
        raise ArgumentTypeError(
            f"register_rule: expected a gradhooks.Rule subclass or instance, got {rule!r}"
        )
    taken = [t for t in module_types if t in _RULES and _RULES[t] is not instance]
    if taken and not replace:
        names = ", ".join(f"{t.__qualname__} (by {type(_RULES[t]).__qualname__})" for t in taken)
        raise InvalidArgumentError(
            f"register_rule: a rule is already registered for {names}; "
            "pass replace=True to replace it deliberately"
        )
    for t in module_types:
        _RULES[t] = instance
    return instance


@overload
def register_rule(*module_types: type[nn.Module], replace: bool = False) -> Callable[[R], R]: ...
@overload
def register_rule(*module_types: type[nn.Module], rule: Rule | type[Rule], replace: bool = False) -> Rule: ...


def register_rule(
    *module_types: type[nn.Module],
    rule: Rule | type[Rule] | None = None,
    replace: bool = False,
) -> Callable[[R], R] | Rule:
    """Register the per-sample rule for one or more module types.

    As a class decorator (the class is instantiated once, with no arguments)::

        @gradhooks.register_rule(MyLayer)
        class MyLayerRule(gradhooks.Rule):
            def per_sample(self, module, calls, names): ...

    or directly: ``register_rule(MyLayer, rule=MyLayerRule())``.

    Subclasses of a registered type use its rule unless they have their own.
    Registering a type that already has a rule raises ``ValueError`` unless
    ``replace=True``. Returns the decorated object, or the registered instance.
    """
    _check_types(module_types)
    if rule is not None:
        return _install(module_types, rule, replace)

    def decorate(obj: R) -> R:
        _install(module_types, obj, replace)
        return obj

    return decorate


def unregister_rule(module_type: type[nn.Module]) -> Rule:
    """Remove and return the rule registered for exactly ``module_type``.

    Raises ``KeyError`` when that type has no rule of its own."""
    try:
        return _RULES.pop(module_type)
    except KeyError:
        raise UnknownNameError(f"no rule is registered for {module_type.__qualname__}") from None


def rule_for(module: nn.Module) -> Rule | None:
    """The rule for ``module``'s type: the nearest registered class in its MRO, unless
    the module's class overrides that class's ``forward`` (and the rule does not say
    ``subclass_forward_ok``); ``None`` when there is none. A module without a rule
    is handled by how its forward uses its parameters."""
    for cls in type(module).__mro__:
        found = _RULES.get(cls)
        if found is not None:
            if type(module).forward is not cls.forward and not found.subclass_forward_ok:
                return None
            return found
    return None


def registered_rule(module_type: type[nn.Module]) -> Rule | None:
    """The rule registered for ``module_type`` or its nearest registered base class
    (what an instance that does not override ``forward`` gets); ``None`` if none."""
    for cls in module_type.__mro__:
        found = _RULES.get(cls)
        if found is not None:
            return found
    return None
