"""FSDP2 frees the storage of its unsharded parameters after backward; what a
``per_sample_grads`` result still reads of them at exit and after.

The recording refers to the unsharded parameters (the tracer saw them): the
ops' geometry, the chains from a rule's tensor back to the covered parameters,
and the leaves of those chains' derivations. :func:`restore` makes each of
them valid again, once, when the context exits (see :mod:`gradhooks.fsdp`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .errors import UnsupportedModuleError
from .trace.derive import Origin, Source

if TYPE_CHECKING:
    from .distributed import ShardedWorld
    from .sites import Site

__all__ = ["restore"]


def restore(all_params: list[Any], world: ShardedWorld, sites: Iterable[Site]) -> None:
    """Collective, at exit, on every rank after the exit sync. FSDP has freed the
    storage of the unsharded parameters, which the recording still refers to:

    * identity and view-only chains, and the ops' geometry, read only metadata:
      geometry tensors become zero-stride stand-ins of the same shape, dtype and
      device, so that views of them (a conv rule's ``weight[0]``) stay valid;
    * a chain through a non-view op (``1 + w``, ``W + B @ A``), and a recurrent
      layer's weight list, replay values at exit: those tensors are all-gathered
      from their shards once, up to the size of the largest FSDP group (what FSDP
      itself holds unsharded); beyond that the context refuses, on every rank."""
    storages = {fp._unsharded_param.untyped_storage()._cdata: k for k, fp in enumerate(all_params) if hasattr(fp, "_unsharded_param")}
    values: list[tuple[Any, int, int]] = []  # (container, key, FSDP param index)
    for site in sites:
        if not isinstance(site.module, nn.Module):
            _stand_in(site.module, storages, values)
        for chain in site.chains.values():
            if not chain.identity and chain.flat_index() is None:
                _chain_values(chain.origin, storages, values)
    need = torch.zeros(len(all_params), dtype=torch.float64, device=world.device)
    for _, _, k in values:
        need[k] = 1.0
    torch.distributed.all_reduce(need, op=torch.distributed.ReduceOp.MAX, group=world.group)
    wanted = [k for k in range(len(all_params)) if need[k] > 0]
    total = sum(all_params[k].sharded_param.numel() for k in wanted)
    if total > world.bucket_numel:
        names = [all_params[k]._param_fqn for k in wanted]
        raise UnsupportedModuleError(
            f"per_sample_grads: parameters {names} of the FSDP2 model are used through non-view ops (e.g. "
            "W + B @ A) whose per-sample gradients are replayed at exit with their values; gathering them "
            f"({total} elements) would hold more than FSDP's largest unsharded group ({world.bucket_numel})"
        )
    full = {k: _gathered(all_params[k]) for k in wanted}
    for container, key, k in values:
        old = container[key] if not isinstance(container, Source) else container.param
        new = full[k].as_strided(old.size(), old.stride(), old.storage_offset())
        if isinstance(container, Source):
            container.param = new
        else:
            container[key] = new


def _fsdp_index(t: Any, storages: dict[int, int]) -> int | None:
    if not isinstance(t, Tensor) or t.device.type == "meta":
        return None
    return storages.get(t.untyped_storage()._cdata)


def _stand_in(geometry: Any, storages: dict[int, int], values: list[tuple[Any, int, int]]) -> None:
    attrs = getattr(geometry, "__dict__", {})
    for attr, v in list(attrs.items()):
        if _fsdp_index(v, storages) is not None:
            attrs[attr] = torch.zeros((), dtype=v.dtype, device=v.device).expand(v.shape)
        elif isinstance(v, list):
            values.extend((v, i, k) for i, t in enumerate(v) if (k := _fsdp_index(t, storages)) is not None)


def _chain_values(origin: Origin, storages: dict[int, int], values: list[tuple[Any, int, int]]) -> None:
    """Every FSDP-backed tensor a non-view chain replays: its sources and leaves."""
    stack: list[Origin] = [origin]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, Source):
            k = _fsdp_index(node.param, storages)
            if k is not None:
                values.append((node, 0, k))
            continue
        slots = set(node.slots)
        values.extend((node.leaves, i, k) for i, t in enumerate(node.leaves) if i not in slots and (k := _fsdp_index(t, storages)) is not None)
        stack.extend(node.parents)


def _gathered(fp: Any) -> Tensor:
    """The full parameter, all-gathered from the shards, in the dtype forward used."""
    with torch.no_grad():
        full = fp.sharded_param.full_tensor().contiguous()
    dtype = getattr(fp, "param_dtype", None)
    return full.to(dtype) if dtype is not None else full
