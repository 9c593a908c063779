"""Torch functions by op name: ``torch.add``, ``Tensor.add``, ``Tensor.__add__`` and
``Tensor.add_`` are all ``"add"`` (the tracer's tables are keyed by these names)."""

from __future__ import annotations

from typing import Any

__all__ = ["name_of"]

_DUNDER = {
    "__add__": "add", "__radd__": "add", "__iadd__": "add", "__sub__": "sub", "__rsub__": "sub",
    "__isub__": "sub", "__mul__": "mul", "__rmul__": "mul", "__imul__": "mul", "__truediv__": "div",
    "__rtruediv__": "div", "__itruediv__": "div", "__div__": "div", "__rdiv__": "div", "__idiv__": "div",
    "__floordiv__": "floor_divide", "__rfloordiv__": "floor_divide", "__ifloordiv__": "floor_divide",
    "__pow__": "pow", "__rpow__": "pow", "__ipow__": "pow", "__mod__": "remainder", "__rmod__": "remainder",
    "__neg__": "neg", "__abs__": "abs", "__and__": "bitwise_and", "__rand__": "bitwise_and",
    "__iand__": "bitwise_and", "__or__": "bitwise_or", "__ror__": "bitwise_or", "__ior__": "bitwise_or",
    "__xor__": "bitwise_xor", "__rxor__": "bitwise_xor", "__ixor__": "bitwise_xor", "__invert__": "bitwise_not",
    "__lt__": "lt", "__le__": "le", "__gt__": "gt", "__ge__": "ge", "__eq__": "eq", "__ne__": "ne",
    "__lshift__": "bitwise_left_shift", "__rshift__": "bitwise_right_shift",
    "__matmul__": "matmul", "__rmatmul__": "rmatmul", "__imatmul__": "matmul",
}


def name_of(func: Any) -> str:
    """The op's name: ``"add"`` for ``torch.add``, ``Tensor.add_`` and ``Tensor.__add__``;
    ``"__get__T"`` for the ``Tensor.T`` property."""
    name = getattr(func, "__name__", None) or type(func).__name__
    if name == "__get__":
        owner = getattr(func, "__self__", None)
        return "__get__" + str(getattr(owner, "__name__", ""))
    name = _DUNDER.get(name, name)
    if name.endswith("_") and not name.endswith("__") and name not in ("copy_", "fill_", "zero_", "requires_grad_"):
        name = name[:-1]
    return name
