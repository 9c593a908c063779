"""Snapshots of everything gradhooks could leave on a user's model."""

from __future__ import annotations

from typing import Any

from torch import nn

HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Attribute names, hook dict contents and classes of every module and parameter."""
    state: dict[str, Any] = {}
    for name, m in model.named_modules():
        state[f"module:{name}:class"] = type(m)
        state[f"module:{name}:attrs"] = sorted(m.__dict__)
        for d in HOOK_DICTS:
            state[f"module:{name}:{d}"] = list(getattr(m, d, {}).items())
        state[f"module:{name}:forward"] = m.__dict__.get("forward")
    for name, p in model.named_parameters():
        state[f"param:{name}:attrs"] = sorted(p.__dict__)
        state[f"param:{name}:hooks"] = p._backward_hooks
        state[f"param:{name}:class"] = type(p)
    return state


def assert_clean(model: nn.Module, before: dict[str, Any]) -> None:
    after = snapshot(model)
    diff = {k: (before.get(k), after.get(k)) for k in set(before) | set(after) if before.get(k) != after.get(k)}
    assert not diff, f"gradhooks left state on the model: {diff}"
