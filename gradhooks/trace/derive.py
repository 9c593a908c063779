"""Batch-independent tensors computed from covered parameters, and how to pull a
gradient back through them.

A parameter rarely meets the batch as itself only: MultiheadAttention chunks
its ``in_proj_weight``, GPT-2's ``Conv1D`` multiplies by its weight transposed,
a position table is looked up at ``arange(T)`` before it is added to the batch,
Gemma normalizes with ``1 + weight``, weight norm computes the weight from
``g`` and ``v``. The tracer records each such op as a :class:`Derived` node
(the function, its arguments, which of them came from parameters); a rule
then works in the space of the derived tensor ``c``, and a :class:`Chain`
maps its results to the parameters:

* ``pull(u)``: ``J^T u`` for a ``c``-shaped ``u`` (one vjp: weighted sums are
  linear, so ``sum_n w_n J^T u_n = J^T sum_n w_n u_n``);
* ``pull_batched(u)``: the same for ``(N, *c.shape)`` (vmapped vjp);
* ``push(v)``: ``J v`` (a jvp; for dot products ``<J^T u_n, v> = <u_n, J v>``);
* ``flat_index``: for a chain of view ops from one parameter, the parameter
  element behind each element of ``c`` (replayed on an index tensor), so a
  gradient scatters back without a vjp, and an injective map keeps norms as
  they are.

The replay uses the parameters' current values (they do not change between the
forward and the exit of a context).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from ..errors import ArgumentTypeError

__all__ = ["Source", "Derived", "Origin", "Chain", "VIEW_NAMES", "IDENTITY_NAMES"]


class Source:
    """A covered parameter, as the root of derivations."""

    __slots__ = ("param", "name")

    def __init__(self, param: nn.Parameter, name: str) -> None:
        # A Parameter; an FSDP2 context's exit replays with its gathered values instead.
        self.param: Tensor = param
        self.name = name

    def __repr__(self) -> str:
        return f"Source({self.name!r})"


class Derived:
    """One op whose output is batch-independent and depends on covered parameters."""

    __slots__ = ("func", "spec", "leaves", "slots", "parents", "out_path", "name")

    def __init__(
        self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], parents: dict[int, Origin], out_path: int | None
    ) -> None:
        self.func = func
        self.leaves, self.spec = pytree.tree_flatten((args, kwargs))
        self.slots = list(parents)
        self.parents = [parents[i] for i in self.slots]
        self.out_path = out_path
        self.name = getattr(func, "__name__", repr(func))

    def sources(self) -> list[Source]:
        """The covered parameters this tensor depends on, each once."""
        seen: dict[int, Source] = {}
        stack: list[Origin] = [self]
        while stack:
            node = stack.pop()
            if isinstance(node, Source):
                seen.setdefault(id(node), node)
            else:
                stack.extend(node.parents)
        return list(seen.values())

    def value(self, env: dict[int, Tensor], memo: dict[int, Any] | None = None) -> Tensor:
        """Recompute this tensor from parameter values ``env`` (``id(source) -> tensor``)."""
        memo = {} if memo is None else memo
        key = id(self)
        if key in memo:
            return memo[key]
        leaves = list(self.leaves)
        for slot, parent in zip(self.slots, self.parents, strict=False):
            leaves[slot] = env[id(parent)] if isinstance(parent, Source) else parent.value(env, memo)
        args, kwargs = pytree.tree_unflatten(leaves, self.spec)
        out = self.func(*args, **kwargs)
        if self.out_path is not None:
            out = [o for o in pytree.tree_leaves(out) if isinstance(o, Tensor)][self.out_path]
        memo[key] = out
        return out


Origin = Source | Derived

#: Ops that only rearrange, select (a lookup too) or repeat elements: a chain of them from one
#: parameter maps each element of its result to one parameter element.
VIEW_NAMES = frozenset(
    {
        "view", "reshape", "view_as", "reshape_as", "flatten", "unflatten", "squeeze", "unsqueeze",
        "ravel", "transpose", "swapaxes", "swapdims", "permute", "movedim", "moveaxis", "t",
        "expand", "expand_as", "broadcast_to", "narrow", "select", "split", "chunk", "unbind",
        "tensor_split", "split_with_sizes", "__getitem__", "contiguous", "clone", "__get__",
        "index_select", "repeat", "tile", "flip", "roll", "embedding",
    }
)
#: Ops that keep every value (dtype or device changes): identity for an index map.
IDENTITY_NAMES = frozenset({"float", "double", "half", "bfloat16", "to", "type", "type_as", "detach", "cpu", "cuda"})


class Chain:
    """From a rule's tensor ``c`` back to the covered parameters it was computed from."""

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self.sources = [origin] if isinstance(origin, Source) else origin.sources()
        self._index: Tensor | None | bool = False  # False: not computed yet

    @property
    def identity(self) -> bool:
        return isinstance(self.origin, Source)

    def _env(self) -> dict[int, Tensor]:
        return {id(s): s.param.detach() for s in self.sources}

    def _fn(self) -> Callable[[dict[int, Tensor]], Tensor]:
        origin = self.origin

        def fn(env: dict[int, Tensor]) -> Tensor:
            return env[id(origin)] if isinstance(origin, Source) else origin.value(env)

        return fn

    def pull(self, u: Tensor) -> dict[int, Tensor]:
        """``{id(source): J^T u}`` for ``u`` shaped like ``c``."""
        if isinstance(self.origin, Source):
            return {id(self.origin): u}
        index = self.flat_index()
        if index is not None and len(self.sources) == 1:
            p = self.sources[0].param
            out = u.new_zeros(p.numel())
            out.index_add_(0, index.reshape(-1), u.reshape(-1))
            return {id(self.sources[0]): out.view(p.shape)}
        with torch.enable_grad():
            pullback = torch.func.vjp(self._fn(), self._env())[1]  # (output, vjp_fn)
            return pullback(u.to(self._dtype()))[0]

    def pull_batched(self, u: Tensor) -> dict[int, Tensor]:
        """``{id(source): (N, *p.shape)}`` for ``u`` of shape ``(N, *c.shape)``."""
        if isinstance(self.origin, Source):
            return {id(self.origin): u}
        index = self.flat_index()
        if index is not None and len(self.sources) == 1:
            p = self.sources[0].param
            n = u.shape[0]
            out = u.new_zeros(n, p.numel())
            out.index_add_(1, index.reshape(-1), u.reshape(n, -1))
            return {id(self.sources[0]): out.view(n, *p.shape)}
        with torch.enable_grad():
            pullback = torch.func.vjp(self._fn(), self._env())[1]  # (output, vjp_fn)
            return torch.func.vmap(lambda v: pullback(v)[0])(u.to(self._dtype()))

    def push(self, v: dict[int, Tensor]) -> Tensor:
        """``J v`` (shaped like ``c``) for tangents ``v[id(source)]`` (missing: zero)."""
        if isinstance(self.origin, Source):
            return v[id(self.origin)]
        index = self.flat_index()
        if index is not None and len(self.sources) == 1:
            return v[id(self.sources[0])].reshape(-1)[index]
        # J v by reverse-over-reverse (d/du <J^T u, v>): every op with a double
        # backward supports it, where forward-mode AD misses some (weight norm).
        with torch.enable_grad():
            env = {k: t.detach().requires_grad_() for k, t in self._env().items()}
            c = self._fn()(env)
            u = torch.zeros_like(c, requires_grad=True)
            keys = list(env)
            grads = torch.autograd.grad(c, [env[k] for k in keys], u, create_graph=True, allow_unused=True)
            dot = sum((g * v[k].to(g.dtype)).sum() for k, g in zip(keys, grads, strict=False) if g is not None and k in v)
            if not isinstance(dot, Tensor) or not dot.requires_grad:
                return torch.zeros_like(c).detach()
            return torch.autograd.grad(dot, u)[0].detach()

    def _dtype(self) -> torch.dtype:
        return self.sources[0].param.dtype

    def flat_index(self) -> Tensor | None:
        """For a chain of view ops from one parameter: ``c``-shaped long tensor of the
        parameter's flat element behind each element of ``c``; else ``None``."""
        index = self._index
        if isinstance(index, bool):  # False: not computed yet
            index = self._index = _index_map(self.origin) if len(self.sources) == 1 else None
        return index

    def injective(self) -> bool:
        """Each parameter element appears at most once in ``c`` (norms carry over)."""
        if isinstance(self.origin, Source):
            return True
        index = self.flat_index()
        if index is None:
            return False
        if _only_ops(self.origin, INJECTIVE_NAMES):
            return True  # a transpose or a chunk: no need to count (a sort per call and step)
        counts = torch.zeros(self.sources[0].param.numel(), dtype=torch.int32, device=index.device)
        counts.index_add_(0, index.reshape(-1), torch.ones_like(index.reshape(-1), dtype=torch.int32))
        return bool((counts <= 1).all())


#: View ops that never repeat an element of their input (bijections and sub-views);
#: the others can (broadcasts, repeats, lookups with repeated indices).
INJECTIVE_NAMES = VIEW_NAMES - {"expand", "expand_as", "broadcast_to", "repeat", "tile", "index_select", "embedding", "__getitem__"}


def _only_ops(origin: Origin, names: frozenset[str]) -> bool:
    """Whether every op from the parameter to ``origin`` is in ``names`` (or keeps values)."""
    stack: list[Origin] = [origin]
    while stack:
        node = stack.pop()
        if isinstance(node, Derived):
            if node.name not in names and node.name not in IDENTITY_NAMES:
                return False
            stack.extend(node.parents)
    return True


def _index_map(origin: Origin) -> Tensor | None:
    """Replay ``origin`` on an index tensor if every op on the way is a view."""
    if not _only_ops(origin, VIEW_NAMES):
        return None
    source = origin.sources()[0] if isinstance(origin, Derived) else origin
    p = source.param
    env = {id(source): torch.arange(p.numel(), device=p.device).view(p.shape)}
    try:
        return _replay_index(origin, env, {})
    except (RuntimeError, TypeError, ValueError, IndexError):
        return None


def _replay_index(node: Origin, env: dict[int, Tensor], memo: dict[int, Tensor]) -> Tensor:
    if isinstance(node, Source):
        return env[id(node)]
    if id(node) in memo:
        return memo[id(node)]
    if node.name in IDENTITY_NAMES:
        out = _replay_index(node.parents[0], env, memo)
    else:
        leaves = list(node.leaves)
        for slot, parent in zip(node.slots, node.parents, strict=False):
            leaves[slot] = _replay_index(parent, env, memo)
        args, kwargs = pytree.tree_unflatten(leaves, node.spec)
        out = node.func(*args, **kwargs)
        if node.out_path is not None:
            out = [o for o in pytree.tree_leaves(out) if isinstance(o, Tensor)][node.out_path]
    if not isinstance(out, Tensor) or out.dtype != torch.long:
        raise ArgumentTypeError("not an index map")
    memo[id(node)] = out
    return out

