"""FSDP2 (``torch.distributed.fsdp.fully_shard``): exact per-sample clipping on a
sharded model. Every rank runs::

    with per_sample_grads(model, one_backward=True, materialize=False) as g:
        loss_fn(model(x), y).backward()
    g.clip_(max_norm)      # collective: one reduce-scatter per bucket of parameters
    optimizer.step()

What FSDP2 does (torch 2.13): ``model.named_parameters()`` are DTensor shards
(``FSDPParam.sharded_param``). A module's forward pre-hook, registered by
``fully_shard`` ahead of every other hook, all-gathers its parameter group and
puts into each owning module's ``_parameters`` a plain unsharded ``Parameter``
(``FSDPParam._unsharded_param``: one object per parameter, created at the first
all-gather and kept; FSDP frees its storage after forward and after backward
and refills it before backward). FSDP's post-backward reduce-scatters the
gradient of that unsharded parameter, if it has one, into ``sharded_param.grad``.

How the context sees it:

* the plan covers the sharded parameters (keys, ``g.params``, the ``p.grad`` that
  ``clip_`` writes); a forward pre-hook of ours, which runs after FSDP's, binds
  each covered :class:`~gradhooks.trace.derive.Source` to the unsharded
  parameter, so the tracer recognizes its uses by identity as on any model;
* the one-backward mode is required: backward computes no gradient for a
  covered parameter, so FSDP reduce-scatters nothing of them, and a gradient
  that reaches an unsharded covered parameter came through a use the hooks do
  not see: a post-accumulate-grad hook on it catches that exactly;
* every rank holds ``X`` and ``G`` of its local batch for every layer, so
  per-sample norms over the whole model are complete on each rank; ``clip_``
  reduce-scatters the clipped sums (:class:`~gradhooks.distributed.ShardedWorld`).

Refused on entry, with the reason: FSDP1's ``FullyShardedDataParallel``,
tensor parallelism (DTensor parameters outside FSDP2, or FSDP2 over a 2-D
mesh), HSDP / ``replicate``, parameters of one model on different meshes,
trainable parameters FSDP2 does not manage, module-level rules on sharded
parameters, the default backward mode and ``materialize=True``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .distributed import ShardedWorld, ShardLayout
from .errors import UnseenGradientError, UnsupportedModuleError
from .plan import Plan
from .sharding import restore

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule

    from .finish import Options, State
    from .sites import Covered, Site

__all__ = ["Sharding", "sharding_of"]


def _modules_of(name: str) -> Any:
    """``torch.distributed.fsdp`` if already imported (a model cannot be sharded otherwise)."""
    return sys.modules.get(name)


def _refuse(what: str) -> UnsupportedModuleError:
    return UnsupportedModuleError(f"per_sample_grads: {what}")


def _refuse_foreign(model: nn.Module, plan: Plan, fsdp_ids: set[int]) -> None:
    """FSDP1 and tensor parallelism: sharded in ways whose uses cannot be attributed exactly."""
    fsdp = _modules_of("torch.distributed.fsdp")
    fsdp1 = getattr(fsdp, "FullyShardedDataParallel", None) if fsdp is not None else None
    if fsdp1 is not None and any(isinstance(m, fsdp1) for m in model.modules()):
        raise _refuse(
            "the model contains FSDP1's FullyShardedDataParallel wrapper, which flattens parameters into "
            "FlatParameters and runs its own hooks around them: the uses of each parameter cannot be "
            "captured exactly. Shard the model with FSDP2 instead (torch.distributed.fsdp.fully_shard on "
            "each block and on the root), then per_sample_grads(model, one_backward=True, materialize=False)."
        )
    tensor = _modules_of("torch.distributed.tensor")
    dtensor = getattr(tensor, "DTensor", None) if tensor is not None else None
    if dtensor is None:
        return
    tp = [s.name for s in plan.covered if isinstance(s.param, dtensor) and id(s.param) not in fsdp_ids]
    if tp:
        raise _refuse(
            f"parameters {tp} are DTensors that FSDP2 does not manage (tensor parallelism): each rank "
            "computes only part of every sample's gradient, so per-sample norms would need collectives "
            "inside every layer; this is not supported. Use FSDP2 alone (fully_shard over a 1-D mesh)."
        )


def _fsdp_params(model: nn.Module) -> tuple[dict[int, Any], list[Any]]:
    """``{id(sharded parameter): FSDPParam}`` and the FSDP states, for every FSDP2
    module in ``model``."""
    fsdp = _modules_of("torch.distributed.fsdp")
    module_cls: type[FSDPModule] | None = getattr(fsdp, "FSDPModule", None) if fsdp is not None else None
    if module_cls is None:
        return {}, []
    states: dict[int, Any] = {}
    for m in model.modules():
        if isinstance(m, module_cls):
            st = m._get_fsdp_state()
            states.setdefault(id(st), st)
    params: dict[int, Any] = {}
    for st in states.values():
        for group in _groups(st):
            for fp in group.fsdp_params:
                params[id(fp.sharded_param)] = fp
    return params, list(states.values())


def _groups(state: Any) -> list[Any]:
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:  # torch before per-parameter meshes
        group = getattr(state, "_fsdp_param_group", None)
        groups = [] if group is None else [group]
    return list(groups)


def _check_mesh(name: str, fp: Any, group: Any) -> None:
    mi = fp.mesh_info
    if getattr(fp, "is_dtensor", False) or mi.mesh.ndim != 1:
        raise _refuse(
            f"'{name}' is sharded by FSDP2 over a {mi.mesh.ndim}-D mesh or was a DTensor before fully_shard "
            "(tensor parallelism): each rank computes only part of every sample's gradient, so per-sample "
            "norms would need collectives inside every layer; this is not supported. Use fully_shard over a 1-D mesh."
        )
    if getattr(mi, "replicate_mesh_dim", None) is not None or getattr(mi, "shard_mesh_dim", None) is None:
        raise _refuse(f"'{name}' is replicated by FSDP2 (HSDP or replicate()): only plain fully_shard over one shard group is supported")
    if getattr(group, "reduce_scatter_unused_params", False):
        raise _refuse(
            f"'{name}' is in an FSDP2 group with reduce_scatter_unused_params=True: FSDP would add zeros to "
            "p.grad during backward, which the exact one_backward check cannot tell from an unseen gradient; "
            "turn it off for the steps inside per_sample_grads"
        )


def sharding_of(model: nn.Module, plan: Plan, options: Options) -> Sharding | None:
    """The :class:`Sharding` of an FSDP2 model, ``None`` for an unsharded one; raises
    :class:`UnsupportedModuleError` on entry for what cannot be handled exactly."""
    if _modules_of("torch.distributed.fsdp") is None and _modules_of("torch.distributed.tensor") is None:
        return None
    by_id, states = _fsdp_params(model)
    _refuse_foreign(model, plan, set(by_id))
    if not by_id:
        return None
    covered: dict[str, Any] = {s.name: by_id.get(id(s.param)) for s in plan.covered}  # None: refused below
    plain = [k for k, fp in covered.items() if fp is None]
    if plain:
        raise _refuse(
            f"trainable parameters {plain} are not managed by FSDP2 while others are: nothing would keep "
            "them equal across ranks. Call fully_shard on the root module too (after its blocks), or freeze them."
        )
    groups = {id(fp): g for st in states for g in _groups(st) for fp in g.fsdp_params}
    for name, fp in covered.items():
        _check_mesh(name, fp, groups[id(fp)])
    pgs = {id(fp.mesh_info.shard_process_group) for fp in covered.values()}
    if len(pgs) > 1:
        raise _refuse("the covered parameters are sharded over different meshes; clip_ needs one shard group for all of them")
    sharded = {id(s.param) for s in plan.covered}
    module_level = sorted({site.label for site in plan.module_sites if any(id(p) in sharded for p in site.module.parameters())})
    if module_level:
        raise _refuse(
            f"{', '.join(module_level)}: a module-level rule (register_rule, fallback=True) reads its module's "
            "parameters when the context exits, after FSDP2 has freed their unsharded copies; this is not "
            "supported on sharded parameters (rules by op, such as the built-in ones, are)"
        )
    if not options.one_backward:
        raise _refuse(
            "an FSDP2 model needs one_backward=True: in the default mode backward computes every unclipped "
            "gradient, FSDP reduce-scatters it (a communication clip_ then overwrites), and the exit check "
            "would hold a full unsharded copy of every gradient, more than FSDP itself ever holds. Use "
            "per_sample_grads(model, one_backward=True, materialize=False)."
        )
    if options.materialize:
        raise _refuse(
            "an FSDP2 model needs materialize=False: materialized per-sample gradients are (N, *p.shape) "
            "for the full unsharded shape of every parameter on every rank, far more than the sharded model. "
            "norms(), param_norms(), dot(), weighted_sum(), clip_() and privatize_() are exact without them."
        )
    return Sharding(plan, covered, [g for st in states for g in _groups(st)], states)


def _world(covered: dict[str, Any], groups: list[Any]) -> ShardedWorld:
    fps = list(covered.values())
    pg = fps[0].mesh_info.shard_process_group
    device = torch.device("cpu") if torch.distributed.get_backend(pg) == "gloo" else fps[0].device
    layouts = {name: ShardLayout(fp.fsdp_placement.dim, torch.Size(fp.sharded_size), fp.to_sharded_dtensor) for name, fp in covered.items()}
    largest = max((sum(math.prod(fp._orig_size) for fp in g.fsdp_params) for g in groups), default=1)
    return ShardedWorld(pg, device, layouts, largest)


class Sharding:
    """What one context knows of an FSDP2 model: which FSDPParam each covered name is,
    the shard group, and the unsharded parameters that received gradient."""

    def __init__(self, plan: Plan, covered: dict[str, Any], groups: list[Any], states: list[Any]) -> None:
        self.fsdp_params = covered  # name -> FSDPParam
        self.all_params = [fp for g in groups for fp in g.fsdp_params]  # frozen ones too, in model order
        self.sources = {s.name: s for s in plan.covered}
        self.states = states
        self.world = _world(covered, groups)
        self.outside: list[str] = []  # covered names whose unsharded copy got a gradient
        self._hooked: set[int] = set()

    def install(self, state: State) -> None:
        """A forward pre-hook on every FSDP2 module (after FSDP's own, which unshards)."""
        names = {id(fp): name for name, fp in self.fsdp_params.items()}
        for st in self.states:
            mine = [names[id(fp)] for g in _groups(st) for fp in g.fsdp_params if id(fp) in names]
            if not mine:
                continue
            for m in st._modules:
                state.rec.keep(m.register_forward_pre_hook(_Bind(self, state, mine)))

    def bind(self, state: State, names: Iterable[str]) -> None:
        """Point each covered Source at its unsharded parameter (which FSDP just put on
        the module) and watch that parameter for gradients from outside the hooks."""
        tracer, rec = state.tracer, state.rec
        for name in names:
            u = getattr(self.fsdp_params[name], "_unsharded_param", None)
            if u is None:
                continue
            src = self.sources[name]
            src.param = u  # the tracer's identity check and the chains' metadata
            tracer.sources[id(u)] = src
            if id(u) not in self._hooked:
                self._hooked.add(id(u))
                rec.keep(u.register_post_accumulate_grad_hook(_Outside(self, name, rec.is_active)))

    def verify(self, covered: list[Covered], snapshots: dict[str, Any]) -> None:
        """Raise :class:`UnseenGradientError` if a covered parameter got gradient from a
        use the hooks do not see: on its unsharded copy (which FSDP then reduce-scatters)
        or on the shard itself. Local; the exit's failure flag tells the other ranks."""
        changed = [c.name for c in covered if snapshots[c.name].changed(c.param)]
        names = list(dict.fromkeys(self.outside + changed))
        if names:
            raise UnseenGradientError(
                f"gradient reached covered parameter(s) {names} of the FSDP2 model outside their captured uses "
                "(one_backward=True, exact): they are used where no hook sees them, e.g. in a penalty added to "
                "the loss, which has no per-sample meaning. Add such a penalty's gradient after clip_(), or "
                "freeze the parameter."
            )

    def restore(self, sites: Iterable[Site]) -> None:
        """Collective, at exit: see :func:`gradhooks.sharding.restore`."""
        restore(self.all_params, self.world, sites)


class _Bind:
    """Forward pre-hook of an FSDP2 module: :meth:`Sharding.bind` for its parameters."""

    __slots__ = ("sharding", "state", "names")

    def __init__(self, sharding: Sharding, state: State, names: list[str]) -> None:
        self.sharding = sharding
        self.state = state
        self.names = names

    def __call__(self, module: nn.Module, args: Any) -> None:
        if self.state.rec.active:
            self.sharding.bind(self.state, self.names)


class _Outside:
    """Post-accumulate-grad hook of an unsharded covered parameter: in the one-backward
    mode no hooked use gives it a gradient, so any gradient came from outside."""

    __slots__ = ("sharding", "name", "is_active")

    def __init__(self, sharding: Sharding, name: str, is_active: Any) -> None:
        self.sharding = sharding
        self.name = name
        self.is_active = is_active

    def __call__(self, param: Tensor) -> None:
        if self.is_active() and self.name not in self.sharding.outside:
            self.sharding.outside.append(self.name)
