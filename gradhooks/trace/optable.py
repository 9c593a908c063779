"""How the batch travels through each torch function: the layout of an op's outputs
from the layouts of its inputs.

Functions are classified once, by name (``torch.add``, ``Tensor.add``,
``Tensor.__add__`` and ``Tensor.add_`` are one family), into families with one
propagation rule each. A function is *pointwise* when PyTorch tags its ATen op
``pointwise`` (any overload) or it is in :data:`EXTRA_POINTWISE`. A function the
table does not know gives an :class:`~gradhooks.layout.Opaque` output when a
batched tensor goes in: harmless unless a parameter later meets it (then the
use is an error naming the op, never a guess).

Every propagator receives ``(func, args, kwargs, out, batched, n)`` where
``batched`` maps ``id(tensor)`` of the inputs with a layout to that layout, and
returns the layout of the output (one for every tensor of a tuple output) or a
list with one entry per output tensor (``None``: batch-independent).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from . import layout as L
from .layout import WHOLE, AnyLayout, Layout, Opaque, Whole

__all__ = ["classify", "propagate", "name_of", "register_family", "META_NAMES", "FREE_NAMES"]

Propagator = Callable[[Any, tuple[Any, ...], dict[str, Any], Any, dict[int, AnyLayout], int], Any]

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


# -- argument helpers ---------------------------------------------------------------


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], pos: int, name: str, default: Any = None) -> Any:
    if len(args) > pos:
        return args[pos]
    return kwargs.get(name, default)


def _self_layout(args: tuple[Any, ...], batched: dict[int, AnyLayout]) -> tuple[Tensor, AnyLayout]:
    t = args[0]
    return t, batched[id(t)]


def _ints(value: Any) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


# -- propagators ---------------------------------------------------------------------


def _pointwise(func, args, kwargs, out, batched, n):
    leaves = [a for a in args if isinstance(a, Tensor)] + [v for v in kwargs.values() if isinstance(v, Tensor)]
    for a in args:
        if isinstance(a, (list, tuple)):
            leaves.extend(t for t in a if isinstance(t, Tensor))
    ref = out if isinstance(out, Tensor) else leaves[0]
    parts = [(t.dim(), batched[id(t)]) for t in leaves if id(t) in batched]
    return L.broadcast(ref.dim(), parts, ref.shape)


def _same(func, args, kwargs, out, batched, n):
    """Layout of ``self`` only (``to(other)``, ``type_as(other)``: other gives just a dtype)."""
    return batched.get(id(args[0]), Opaque("an op on a batch-independent tensor with a batched argument"))


def _reshape(func, args, kwargs, out, batched, n):
    t, lay = _self_layout(args, batched)
    if not isinstance(lay, Layout):
        return lay
    return L.reshape(lay, t.shape, out.shape, n)


def _permute_dims(name: str, args: tuple[Any, ...], kwargs: dict[str, Any], ndim: int) -> list[int]:
    order = list(range(ndim))
    if name in ("transpose", "swapaxes", "swapdims"):
        a = _arg(args, kwargs, 1, "dim0", None)
        b = _arg(args, kwargs, 2, "dim1", None)
        if a is None:
            a, b = kwargs.get("axis0"), kwargs.get("axis1")
        a, b = a % ndim, b % ndim
        order[a], order[b] = order[b], order[a]
    elif name in ("t", "__get__T", "numpy_T"):
        order = order[::-1] if name != "t" or ndim == 2 else order
    elif name == "__get__mT" or name == "__get__mH":
        order[-1], order[-2] = order[-2], order[-1]
    elif name == "permute":
        dims = args[1:] if len(args) > 1 else kwargs["dims"]
        if len(dims) == 1 and isinstance(dims[0], (list, tuple, torch.Size)):
            dims = dims[0]
        order = [d % ndim for d in dims]
    else:  # movedim / moveaxis
        src = _ints(_arg(args, kwargs, 1, "source"))
        dst = _ints(_arg(args, kwargs, 2, "destination"))
        assert src is not None and dst is not None
        src = [s % ndim for s in src]
        dst = [d % ndim for d in dst]
        rest = iter([d for d in range(ndim) if d not in src])
        order = [0] * ndim
        placed = dict(zip(dst, src))
        order = [placed[j] if j in placed else next(rest) for j in range(ndim)]
    return order


def _permute(func, args, kwargs, out, batched, n):
    t, lay = _self_layout(args, batched)
    if not isinstance(lay, Layout):
        return lay
    return L.permute(lay, _permute_dims(name_of(func), args, kwargs, t.dim()))


def _expand(func, args, kwargs, out, batched, n):
    t, lay = _self_layout(args, batched)
    if not isinstance(lay, Layout):
        return lay
    return L.insert_dims(lay, out.dim() - t.dim())


def _dim_op(name: str, default: int = 0) -> Propagator:
    """``select``/``unbind`` (the dim disappears) and ``narrow``/``split``/``chunk``
    (the dim is cut): fine away from the batch dimension."""
    pos = {"select": 1, "unbind": 1, "narrow": 1, "split": 2, "chunk": 2, "tensor_split": 2, "split_with_sizes": 2}[name]

    def prop(func, args, kwargs, out, batched, n):
        t, lay = _self_layout(args, batched)
        if not isinstance(lay, Layout):
            return lay
        dim = _arg(args, kwargs, pos, "dim", default) % t.dim()
        if dim == lay.dim:
            what = "one sample" if name in ("select", "unbind") else "part of the batch"
            return Opaque(f"{name} took {what} along the batch dimension")
        if name in ("select", "unbind") and dim < lay.dim:
            return lay.moved(lay.dim - 1)
        return lay

    return prop


def _reduce_spec(name: str) -> tuple[int, str, bool]:
    """(position of ``dim``, its keyword, default keepdim) per reduction."""
    if name in ("norm", "vector_norm"):
        return 2, "dim", False
    return 1, "dim", False


def _tensor_unfold(func, args, kwargs, out, batched, n):
    """``Tensor.unfold(dim, size, step)``: windows along one dim, appended last."""
    t, lay = _self_layout(args, batched)
    if not isinstance(lay, Layout):
        return lay
    if _arg(args, kwargs, 1, "dimension") % t.dim() == lay.dim:
        return Opaque("unfold along the batch dimension")
    return lay


def _reduce(func, args, kwargs, out, batched, n):
    name = name_of(func)
    if name in ("max", "min") and len(args) > 1 and isinstance(args[1], Tensor):
        return _pointwise(func, args, kwargs, out, batched, n)  # elementwise maximum/minimum
    t = args[0]
    lay = batched.get(id(t))
    if not isinstance(lay, Layout):
        return lay if lay is not None else _pointwise(func, args, kwargs, out, batched, n)
    pos, key, _ = _reduce_spec(name)
    dims = _arg(args, kwargs, pos, key, None)
    if isinstance(dims, bool):  # std/var(unbiased) without dim
        dims = None
    if dims is None and "axis" in kwargs:
        dims = kwargs["axis"]
    keepdim = bool(_arg(args, kwargs, pos + 1, "keepdim", False))
    if isinstance(dims, (int, list, tuple)) and (dims == [] or dims == ()):
        dims = None
    return L.reduce(lay, _ints(dims), keepdim, t.dim(), name)


_ALONG_DEFAULT = {"softmax": None, "log_softmax": None, "softmin": None, "topk": -1, "sort": -1, "argsort": -1,
                  "normalize": 1, "glu": -1, "diff": -1, "cumsum": None, "cumprod": None, "cummax": None,
                  "cummin": None, "logcumsumexp": None, "gumbel_softmax": -1, "kthvalue": -1,
                  "cosine_similarity": 1, "msort": 0}
_ALONG_POS = {"topk": 2, "normalize": 2, "diff": 2, "kthvalue": 2, "cosine_similarity": 2, "msort": 99}


def _along(func, args, kwargs, out, batched, n):
    """Ops along one dimension that keep the others (softmax, cumsum, sort, topk)."""
    name = name_of(func)
    t = args[0]
    lay = batched.get(id(t))
    if name == "cosine_similarity":
        parts = [(a.dim(), batched[id(a)]) for a in args[:2] if isinstance(a, Tensor) and id(a) in batched]
        lay = L.broadcast(max(a.dim() for a in args[:2]), parts, ())
    if not isinstance(lay, Layout):
        return lay if lay is not None else Opaque(name)
    dim = _arg(args, kwargs, _ALONG_POS.get(name, 1), "dim", _ALONG_DEFAULT.get(name))
    if dim is None:
        return Opaque(f"{name} without an explicit dim")
    ndim = max(t.dim(), 1)
    if dim % ndim == lay.dim:
        return Opaque(f"{name} along the batch dimension")
    if name == "cosine_similarity" and dim % ndim < lay.dim:
        return lay.moved(lay.dim - 1)
    return lay


def _flip_roll(func, args, kwargs, out, batched, n):
    t, lay = _self_layout(args, batched)
    if not isinstance(lay, Layout):
        return lay
    name = name_of(func)
    dims = _ints(_arg(args, kwargs, 1 if name == "flip" else 2, "dims", None))
    if dims is None:
        return Opaque(f"{name} over all dimensions")
    if lay.dim in [d % t.dim() for d in dims]:
        return Opaque(f"{name} along the batch dimension")
    return lay


def _tri(func, args, kwargs, out, batched, n):
    t, lay = _self_layout(args, batched)
    if isinstance(lay, Layout) and lay.dim >= t.dim() - 2:
        return Opaque(f"{name_of(func)} over the batch dimension")
    return lay


def _batch0(func, args, kwargs, out, batched, n):
    """Ops that treat dimension 0 as their own batch (conv, pooling, interpolation):
    the output's dimension 0 is the input's."""
    lays = [batched[id(a)] for a in args if isinstance(a, Tensor) and id(a) in batched]
    lays += [batched[id(v)] for v in kwargs.values() if isinstance(v, Tensor) and id(v) in batched]
    first = lays[0]
    if isinstance(first, (Opaque, Whole)):
        return first
    for lay in lays:
        if not isinstance(lay, Layout) or lay.dim != 0 or not lay.same_structure(first):
            return Opaque(f"{name_of(func)} needs the batch in dimension 0")
    return first


def _pad(func, args, kwargs, out, batched, n):
    t, lay = _self_layout(args, batched)
    if not isinstance(lay, Layout):
        return lay
    pad = _arg(args, kwargs, 1, "pad", ())
    if lay.dim >= t.dim() - len(pad) // 2:
        return Opaque("padding along the batch dimension")
    return lay


def _norm_last(func, args, kwargs, out, batched, n):
    """layer_norm / rms_norm: statistics over the trailing ``normalized_shape``."""
    t, lay = _self_layout(args, batched)
    if not isinstance(lay, Layout):
        return lay
    shape = _arg(args, kwargs, 1, "normalized_shape")
    count = 1 if isinstance(shape, int) else len(shape)
    if lay.dim >= t.dim() - count:
        return Opaque(f"{name_of(func)} normalizes over the batch dimension")
    return lay


def _norm_batch0(func, args, kwargs, out, batched, n):
    """group/instance/batch norm: per-row statistics need the batch in dimension 0;
    batch norm with batch statistics mixes the rows (the use handler refuses it)."""
    t, lay = _self_layout(args, batched)
    if isinstance(lay, Layout) and lay.dim != 0:
        return Opaque(f"{name_of(func)} needs the batch in dimension 0")
    return lay


def _cat(func, args, kwargs, out, batched, n):
    # torch.cat skips 1-d empty tensors (the legacy placeholder of an empty cache)
    tensors = [t for t in _arg(args, kwargs, 0, "tensors") if not (t.dim() == 1 and t.numel() == 0)]
    dim = _arg(args, kwargs, 1, "dim", 0)
    name = name_of(func)
    ndim = tensors[0].dim()
    lays = [(t, batched[id(t)]) for t in tensors if id(t) in batched]
    first = lays[0][1]
    if isinstance(first, (Opaque, Whole)):
        return first
    if name == "stack":
        dim = dim % (ndim + 1)
        moved = [lay.moved(lay.dim + (1 if dim <= lay.dim else 0)) for _, lay in lays if isinstance(lay, Layout)]
    else:
        dim = dim % max(ndim, 1)
        moved = [lay for _, lay in lays if isinstance(lay, Layout)]
    if len(moved) != len(lays):
        return Opaque(f"{name} of tensors with unknown batch layouts")
    if any(m.dim != moved[0].dim or not m.same_structure(moved[0]) for m in moved):
        return Opaque(f"{name} of tensors whose batch dimensions differ")
    if name != "stack" and moved[0].dim == dim:
        if len(lays) != len(tensors) or not moved[0].plain:
            return Opaque(f"{name} along the batch dimension with batch-independent parts")
        rows = torch.arange(n, device=out.device).repeat(len(tensors))
        return Layout(dim, rows=rows)
    return moved[0]


def _getitem(func, args, kwargs, out, batched, n):
    """Basic indexing (ints, slices, None, Ellipsis) and one advanced index tensor."""
    from .indexing import getitem_layout

    return getitem_layout(args[0], args[1], out, batched, n)


def _index_select(func, args, kwargs, out, batched, n):
    t = args[0]
    dim = _arg(args, kwargs, 1, "dim") % max(t.dim(), 1)
    idx = _arg(args, kwargs, 2, "index")
    lay_t, lay_i = batched.get(id(t)), batched.get(id(idx))
    if isinstance(lay_t, (Opaque, Whole)):
        return lay_t
    if lay_t is not None and (lay_i is None or dim == lay_t.dim):
        # Along the batch dimension only the index's values matter (they name the
        # rows taken), even when they were computed from the batch (a sort of lengths).
        if dim != lay_t.dim:
            return lay_t
        if idx.dim() != 1 or not (lay_t.plain or lay_t.rows is not None):
            return Opaque("index_select along a merged batch dimension")
        idx = idx.to(torch.long)
        # row r is the sample of input row idx[r]
        return L.with_rows(dim, idx if lay_t.rows is None else lay_t.rows[idx], n)
    if lay_t is None and isinstance(lay_i, Layout) and lay_i.plain and idx.dim() == 1:
        return Layout(dim)
    return lay_i if isinstance(lay_i, (Opaque, Whole)) else Opaque("index_select with a batched index")


def _gather(func, args, kwargs, out, batched, n):
    t, idx = args[0], _arg(args, kwargs, 2, "index")
    dim = _arg(args, kwargs, 1, "dim") % max(t.dim(), 1)
    lays = [batched[id(a)] for a in (t, idx) if isinstance(a, Tensor) and id(a) in batched]
    if any(isinstance(x, (Opaque, Whole)) for x in lays):
        return next(x for x in lays if isinstance(x, (Opaque, Whole)))
    bdims = {x.dim for x in lays}
    if len(bdims) != 1 or dim in bdims or not all(x.plain for x in lays):
        return Opaque("gather across the batch dimension")
    b = bdims.pop()
    if t.shape[b] != idx.shape[b]:
        return Opaque("gather with a broadcast batch")
    return Layout(b)


def _matmul(func, args, kwargs, out, batched, n):
    from .products import matmul_layout

    return matmul_layout(name_of(func), args, kwargs, out, batched, n)


def _lookup(func, args, kwargs, out, batched, n):
    """``torch.embedding(weight, indices)``: the indices' layout."""
    lay = batched.get(id(args[1]))
    return lay if lay is not None else Opaque("a lookup in a batched table")


def _free(func, args, kwargs, out, batched, n):
    return None


def _loss(func, args, kwargs, out, batched, n):
    reduction = kwargs.get("reduction", "mean")
    if reduction != "none":
        return Opaque(f"{name_of(func)} reduced over the batch", reduced=True)
    name = name_of(func)
    if name in ("cross_entropy", "nll_loss", "multi_margin_loss", "multilabel_margin_loss"):
        t, lay = args[0], batched.get(id(args[0]))
        if isinstance(lay, Layout) and t.dim() >= 2:
            if lay.dim == 1:
                return Opaque("the class dimension is the batch")
            return lay.moved(lay.dim - 1) if lay.dim > 1 else lay
        return lay if lay is not None else batched.get(id(args[1]), Opaque(name))
    return _pointwise(func, args, kwargs, out, batched, n)


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
