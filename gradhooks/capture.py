"""What a hook records for one use of a parameter: inputs, output gradients.

A :class:`Call` pairs the inputs of one forward call (of a module with a rule,
or of one op that uses a parameter) with the gradient that backward later
sends to *that call's* outputs. The pairing is by object, not by order: the
hook is registered on the call's own output tensor when the call runs, so
repeated calls (weight sharing, recurrence) can never be mixed up. Rules see
both batch first: ``call.input`` is ``(N, ...)`` and ``call.grad`` is
``(N, ...)``, whatever dimension the batch had in the model.

Why tensor hooks and not ``register_full_backward_hook``: a full backward hook
wraps the output in a ``BackwardHookFunction`` whose output is a view, and an
in-place op right after the module (``nn.ReLU(inplace=True)``) then fails
(pytorch#61519). A hook registered on the output tensor receives the gradient
with respect to the value *before* any later in-place change, which is exactly
the ``G`` we need. When the output is itself a reshaping view of a fresh tensor
(``F.linear`` on ``(N, *, in)`` returns a view of a 2-D matmul result) an
in-place op re-bases the view's history and a hook on the view would never
fire, so the hook goes on the view's base instead.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from .errors import InvalidArgumentError

__all__ = ["Call", "GradHook", "Attach", "detach_tree", "first_tensor", "hook_target", "output_tensors"]

Transform = Callable[[Tensor], Tensor]


class Call:
    """One recorded call: its inputs (batch first) and its outputs' gradients.

    Attributes:
        args: the positional inputs, tensors detached (they alias, not copy).
        kwargs: the keyword inputs, tensors detached.
        grads: one entry per tensor leaf of the output (in ``pytree`` order):
            the gradient backward sent to it (batch first), summed over backward
            passes, or ``None`` when none arrived.
        out_meta: ``(shape, dtype, device)`` of each output gradient, ``None`` for
            non-tensor leaves.
        batch_size: size of dimension 0 of the first tensor input.
        memo: what the tracer recorded about the call (layouts, names), and
            quantities a rule derives once (keys starting with ``"~"``: row norms),
            which a scaled copy drops. Small tensors only.
    """

    __slots__ = ("args", "kwargs", "grads", "out_meta", "batch_size", "memo", "_input", "versions")

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any], outputs: list[Any]) -> None:
        if not kwargs and len(args) == 1 and isinstance(args[0], Tensor):
            x: Tensor | None = args[0].detach()
            self.args: tuple[Any, ...] = (x,)
            self.kwargs: dict[str, Any] = {}
        elif not kwargs and not args:  # a dense site's call: no pytree walk
            x, self.args, self.kwargs = None, (), {}
        else:
            self.args = detach_tree(args)
            self.kwargs = detach_tree(kwargs)
            x = first_tensor((self.args, self.kwargs))
        self._input = x
        self.grads: list[Tensor | None] = [None] * len(outputs)
        self.out_meta = [(o.shape, o.dtype, o.device) if isinstance(o, Tensor) else None for o in outputs]
        self.batch_size = int(x.shape[0]) if x is not None and x.dim() > 0 else None
        self.memo: dict[str, Any] = {}
        #: ``(weakref to tensor, version)`` of captured inputs that must not change.
        self.versions: list[tuple[Any, int]] = []

    def keep_version(self, t: Tensor) -> None:
        """Remember ``t``'s version counter: an in-place change of it after the call
        would make the results wrong (checked before every query)."""
        self.versions.append((weakref.ref(t), t._version))

    @property
    def input(self) -> Tensor:
        """The first tensor input, ``(N, ...)`` (e.g. ``X`` of a Linear)."""
        if self._input is None:
            raise InvalidArgumentError("this call has no tensor input")
        return self._input

    @property
    def grad(self) -> Tensor:
        """Gradient of the first tensor output, ``(N, ...)`` (``G``); zeros if none arrived."""
        g = self.grads[0] if self.grads else None
        if g is not None:
            return g
        for i, meta in enumerate(self.out_meta):
            if meta is not None:
                return self.grad_of(i)
        raise InvalidArgumentError("this call has no tensor output")

    def grad_of(self, i: int) -> Tensor:
        """Gradient of output leaf ``i``; zeros of the output's shape if none arrived."""
        g = self.grads[i]
        if g is not None:
            return g
        meta = self.out_meta[i]
        if meta is None:
            raise InvalidArgumentError(f"output {i} of this call is not a tensor")
        shape, dtype, device = meta
        return torch.zeros(shape, dtype=dtype, device=device)

    @property
    def has_grad(self) -> bool:
        return any(g is not None for g in self.grads)

    def add_grad(self, i: int, g: Tensor) -> None:
        g = g.detach()
        prev = self.grads[i]
        # Out of place: the tensor belongs to autograd, which may reuse it.
        self.grads[i] = g if prev is None else prev + g

    def release(self) -> None:
        """Drop the captured tensors (memory)."""
        self.args = ()
        self.kwargs = {}
        self._input = None
        self.grads = [None] * len(self.grads)
        self.memo = {}
        self.versions = []

    @classmethod
    def of(cls, x: Tensor | None, grads: Sequence[Tensor | None], memo: dict[str, Any]) -> Call:
        """A call with input ``x`` and these gradients (both batch first already)."""
        call = cls((x,) if x is not None else (), {}, [None] * len(grads))
        call.grads = list(grads)
        call.out_meta = [(g.shape, g.dtype, g.device) if g is not None else None for g in grads]
        call.memo.update(memo)
        return call

    def scaled(self, factor: float) -> Call:
        """A copy whose gradients are multiplied by ``factor`` (inputs shared, derived
        caches dropped): the captures themselves are never modified."""
        if factor == 1.0:
            return self
        copy = Call.__new__(Call)
        copy.args, copy.kwargs, copy._input = self.args, self.kwargs, self._input
        copy.grads = [None if g is None else g * factor for g in self.grads]
        copy.out_meta, copy.batch_size, copy.versions = self.out_meta, self.batch_size, self.versions
        copy.memo = {k: v for k, v in self.memo.items() if isinstance(k, str) and not k.startswith("~")}
        return copy

    def eps(self) -> float:
        """Machine epsilon of the least precise floating tensor this call captured."""
        got = self.memo.get("~eps")
        if got is None:
            leaves = pytree.tree_leaves((self.args, self.kwargs, self.grads))
            got = max(
                (torch.finfo(t.dtype).eps for t in leaves if isinstance(t, Tensor) and t.dtype.is_floating_point),
                default=0.0,
            )
            self.memo["~eps"] = got
        return got


def detach_tree(tree: Any) -> Any:
    """``tree`` with every tensor leaf detached (a view sharing storage)."""
    return pytree.tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, tree)


def first_tensor(tree: Any) -> Tensor | None:
    """The first tensor leaf of ``tree`` in pytree order, or ``None``."""
    for leaf in pytree.tree_leaves(tree):
        if isinstance(leaf, Tensor):
            return leaf
    return None


def output_tensors(output: Any) -> tuple[list[Any], Any]:
    """Flatten a module's output into leaves and the spec to rebuild it."""
    return pytree.tree_flatten(output)


def hook_target(out: Tensor, inputs: list[Any]) -> Tensor:
    """The tensor whose hook sees the gradient of ``out`` as produced by the call.

    ``out`` itself, unless it is a same-layout reshaping view of a tensor created
    inside the call (not one of its ``inputs``); then that base, whose gradient is
    ``out``'s gradient reshaped and survives in-place ops on the view."""
    base = out._base
    if (
        base is None
        or base.grad_fn is None
        or base.numel() != out.numel()
        or not out.is_contiguous()
        or not base.is_contiguous()
        or base.storage_offset() != out.storage_offset()
    ):
        return out
    ptr = base.untyped_storage().data_ptr()
    if any(isinstance(t, Tensor) and t.untyped_storage().data_ptr() == ptr for t in inputs):
        return out
    return base


class GradHook:
    """Tensor hook: ``call.grads[index] += transform(grad)`` while ``is_active()``.

    ``transform`` reshapes the gradient to the output's shape and puts its batch
    first. It runs with torch function handling disabled (backward may run
    inside the tracer, e.g. a reentrant checkpoint)."""

    __slots__ = ("call", "index", "transform", "is_active")

    def __init__(self, call: Call, index: int, transform: Transform, is_active: Callable[[], bool]) -> None:
        self.call = call
        self.index = index
        self.transform = transform
        self.is_active = is_active

    def __call__(self, grad: Tensor) -> None:
        if self.is_active():
            with torch._C.DisableTorchFunction():
                self.call.add_grad(self.index, self.transform(grad))


class FuncHook:
    """Tensor hook calling ``fn(grad)`` while ``is_active()``, torch functions disabled."""

    __slots__ = ("fn", "is_active")

    def __init__(self, fn: Callable[[Tensor], None], is_active: Callable[[], bool]) -> None:
        self.fn = fn
        self.is_active = is_active

    def __call__(self, grad: Tensor) -> None:
        if self.is_active():
            with torch._C.DisableTorchFunction():
                self.fn(grad.detach())


class Attach(torch.autograd.Function):
    """``x`` (copied) made part of the graph through ``anchor``: backward sends the
    gradient to nowhere. Used in the one-backward mode, where a parameter's use
    is computed from detached operands and its output would otherwise not
    require grad (the first layer), so no gradient could be captured for it.
    A copy, not a view: a view made in a custom Function cannot be modified in
    place (``nn.ReLU(inplace=True)`` after the layer)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, anchor: Tensor) -> Tensor:  # type: ignore[override]
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad, None
