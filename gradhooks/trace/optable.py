"""How the batch travels through each torch function: the layout of an op's outputs
from the layouts of its inputs.

Functions are classified once, by name (``torch.add``, ``Tensor.add``,
``Tensor.__add__`` and ``Tensor.add_`` are one family), into families with one
propagation rule each. A function is *pointwise* when PyTorch tags its ATen op
``pointwise`` (any overload) or it is in :data:`EXTRA_POINTWISE`. A function the
table does not know gives an :class:`~gradhooks.layout.Opaque` output when a
batched tensor goes in: harmless unless a parameter later meets it (then the
use is an error naming the op, never a guess).

The propagators themselves live in :mod:`gradhooks.trace.propagators` (values,
reductions, products) and :mod:`gradhooks.trace.shape_ops` (moving and
selecting elements); op names come from :mod:`gradhooks.trace.names`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .layout import WHOLE, AnyLayout, Opaque
from .names import name_of
from .propagators import (  # noqa: F401  (_pointwise: the tracer's fast path)
    _ALONG_DEFAULT,
    Propagator,
    _along,
    _batch0,
    _free,
    _lookup,
    _loss,
    _matmul,
    _norm_batch0,
    _norm_last,
    _pointwise,
    _reduce,
    _same,
)
from .shape_ops import (
    _cat,
    _dim_op,
    _expand,
    _flip_roll,
    _gather,
    _getitem,
    _index_select,
    _pad,
    _permute,
    _reshape,
    _tensor_unfold,
    _tri,
)

__all__ = ["classify", "propagate", "name_of", "register_family", "META_NAMES", "FREE_NAMES"]


#: Functions whose result is not a tensor (or is not data): nothing to follow.
META_NAMES = frozenset(
    {
        "size", "dim", "numel", "nelement", "ndimension", "stride", "storage_offset", "is_contiguous",
        "__len__", "data_ptr", "element_size", "is_floating_point", "is_complex", "item", "tolist",
        "__bool__", "__int__", "__float__", "__index__", "__format__", "__repr__", "__hash__",
        "has_names", "is_set_to", "untyped_storage", "storage", "get_device", "is_nonzero",
        "backward", "grad", "register_hook", "retain_grad", "_is_view", "__reduce_ex__", "__deepcopy__",
        "is_same_size", "__iter__", "equal", "allclose", "is_inference", "is_pinned", "is_shared",
        "__contains__", "__array__", "numpy", "_version",
    }
)
#: Functions whose tensor result does not depend on the values of their input.
FREE_NAMES = frozenset(
    {
        "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "randint_like",
        "new_zeros", "new_ones", "new_empty", "new_full", "new_tensor", "empty_strided",
    }
)
#: Elementwise (with broadcasting) although their ATen op is not tagged pointwise.
EXTRA_POINTWISE = frozenset(
    {
        "add", "sub", "mul", "div", "true_divide", "floor_divide", "where", "dropout", "alpha_dropout",
        "feature_alpha_dropout", "dropout1d", "dropout2d", "dropout3d", "contiguous", "clone", "detach",
        "to", "float", "double", "half", "bfloat16", "int", "long", "bool", "byte", "char", "short",
        "type", "type_as", "cpu", "cuda", "requires_grad_", "relu6", "hardtanh", "leaky_relu", "elu",
        "selu", "celu", "gelu", "silu", "mish", "hardswish", "hardsigmoid", "softplus", "softsign",
        "tanhshrink", "logsigmoid", "threshold", "rrelu", "sigmoid", "tanh", "relu",
        "pow", "masked_fill", "clamp", "clip", "nan_to_num", "lerp", "addcmul", "addcdiv", "copy_",
        "__get__data", "pin_memory", "square", "float_power", "xlogy", "hardshrink", "softshrink",
        "bernoulli", "fill_", "zero_", "abs", "neg",
    }
)
def _is_pointwise(name: str) -> bool:
    if name in EXTRA_POINTWISE:
        return True
    packet = getattr(torch.ops.aten, name, None)
    if packet is None or not hasattr(packet, "overloads"):
        return False
    try:
        return any(torch.Tag.pointwise in getattr(packet, o).tags for o in packet.overloads())
    except (AttributeError, RuntimeError):
        return False


_FAMILIES: dict[str, Propagator] = {}


def _register(names: Sequence[str], prop: Propagator) -> None:
    for n_ in names:
        _FAMILIES[n_] = prop


_register(["view", "reshape", "view_as", "reshape_as", "flatten", "unflatten", "squeeze", "unsqueeze", "ravel", "atleast_2d", "atleast_3d"], _reshape)
_register(["transpose", "swapaxes", "swapdims", "permute", "movedim", "moveaxis", "t", "__get__T", "__get__mT", "__get__mH", "numpy_T"], _permute)
_register(["expand", "expand_as", "broadcast_to"], _expand)
for _n in ("select", "unbind", "narrow", "split", "chunk", "tensor_split", "split_with_sizes"):
    _register([_n], _dim_op(_n))
_register(["sum", "mean", "nansum", "nanmean", "prod", "amax", "amin", "logsumexp", "std", "var", "norm", "vector_norm",
           "count_nonzero", "all", "any", "max", "min", "argmax", "argmin", "median", "nanmedian", "mode",
           "std_mean", "var_mean", "aminmax"], _reduce)
_register(list(_ALONG_DEFAULT), _along)
_register(["flip", "roll"], _flip_roll)
_register(["triu", "tril"], _tri)
_register(["conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "max_pool1d",
           "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
           "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
           "adaptive_max_pool3d", "lp_pool1d", "lp_pool2d", "lp_pool3d", "interpolate", "upsample",
           "upsample_nearest", "upsample_bilinear", "pixel_shuffle", "pixel_unshuffle", "channel_shuffle",
           "max_pool2d_with_indices", "max_pool1d_with_indices", "max_pool3d_with_indices", "local_response_norm",
           "grid_sample", "fractional_max_pool2d", "fractional_max_pool3d"], _batch0)
_register(["pad"], _pad)
_register(["layer_norm", "rms_norm", "native_layer_norm", "_fused_rms_norm"], _norm_last)
_register(["group_norm", "instance_norm", "batch_norm", "native_group_norm"], _norm_batch0)
_register(["cat", "concat", "concatenate", "stack"], _cat)
_register(["__getitem__"], _getitem)
_register(["index_select"], _index_select)
_register(["gather", "take_along_dim"], _gather)
_register(["linear", "matmul", "rmatmul", "mm", "bmm", "baddbmm", "addmm", "mv", "einsum", "scaled_dot_product_attention",
           "bilinear", "addbmm", "dot", "outer", "ger"], _matmul)
_register(list(FREE_NAMES), _free)
_register(["cross_entropy", "nll_loss", "mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "binary_cross_entropy",
           "binary_cross_entropy_with_logits", "kl_div", "poisson_nll_loss", "gaussian_nll_loss", "soft_margin_loss",
           "multilabel_soft_margin_loss", "hinge_embedding_loss", "margin_ranking_loss", "cosine_embedding_loss",
           "multi_margin_loss", "multilabel_margin_loss", "triplet_margin_loss"], _loss)
_register(["contiguous", "clone", "detach", "to", "float", "double", "half", "bfloat16", "int", "long", "bool", "byte",
           "char", "short", "type", "type_as", "cpu", "cuda", "requires_grad_", "pin_memory", "__get__data",
           "one_hot"], _same)


def register_family(names: Sequence[str], prop: Propagator) -> None:
    """Propagate the batch through the functions called ``names`` with ``prop``
    (a handler module adds the layouts of the ops it owns)."""
    _register(names, prop)
    _CACHE.clear()


def _opaque_of(name: str) -> Propagator:
    def prop(func, args, kwargs, out, batched, n):
        return Opaque(f"{name}: the tracer cannot follow the batch through this op")

    return prop


_CACHE: dict[Any, tuple[str, Propagator | None]] = {}


def classify(func: Any) -> tuple[str, Propagator | None]:
    """``(name, propagator)``; the propagator is ``None`` for functions whose
    result is not batch data (sizes, dtypes, ``backward``)."""
    got = _CACHE.get(func)
    if got is not None:
        return got
    name = name_of(func)
    if func is torch.nn.functional.unfold or func is torch.nn.functional.fold:
        got = (name, _batch0)
    elif func is torch.nn.functional.embedding:
        got = (name, _same)  # the batch where the indices have it, one more dim last
    elif func is torch.embedding:
        got = (name, _lookup)
    elif name == "unfold":
        got = (name, _tensor_unfold)
    elif name in META_NAMES or (name.startswith("__get__") and name not in _FAMILIES):
        got = (name, None)
    elif name in _FAMILIES:
        got = (name, _FAMILIES[name])
    elif _is_pointwise(name):
        got = (name, _pointwise)
    else:
        got = (name, _opaque_of(name))
    if len(_CACHE) < 20000:
        _CACHE[func] = got
    return got


def propagate(
    func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any, batched: dict[int, AnyLayout], n: int
) -> Any:
    """The layout(s) of ``out`` (see the module docstring)."""
    _, prop = classify(func)
    if prop is None:
        return None
    if n <= 1:
        return WHOLE
    try:
        return prop(func, args, kwargs, out, batched, n)
    except (TypeError, ValueError, IndexError, KeyError, AttributeError, AssertionError, ZeroDivisionError) as err:
        return Opaque(f"{name_of(func)}: could not follow the batch ({type(err).__name__}: {err})")
