"""Lookups in a weight: ``F.embedding(ids, W, padding_idx, ...)``,
``torch.embedding(W, ids, ...)`` and ``W[ids]``, with batched index tensors.

A lookup at batch-independent indices (position ids ``arange(T)`` or ``(1, T)``)
is no use of the weight yet: its output is a batch-independent tensor derived
from the weight, and its per-sample gradient is taken where it meets the batch
(:mod:`gradhooks.uses.elementwise`). ``scale_grad_by_freq=True`` divides by the
frequency of each index in the whole batch, which couples the samples.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..rules.embedding import EmbeddingRule
from ..trace.derive import Origin
from ..trace.layout import AnyLayout
from ..trace.tracer import Tracer, register_handler
from .common import Geometry, arg, new_site, record

EMBEDDING = EmbeddingRule()


def _lookup(tr: Tracer, call_fn: Any, ids: Tensor, w: Tensor, wo: Origin, padding_idx: int | None, sparse: bool) -> Any:
    rec = tr.rec
    lay = tr.layout_of(ids)
    assert lay is not None  # every caller found ids batched
    geometry = lambda: Geometry(weight=w, padding_idx=padding_idx, num_embeddings=w.shape[0], sparse=sparse)  # noqa: E731
    site = new_site(tr, ("embedding", padding_idx, id(wo)), EMBEDDING, geometry, {"weight": (w, wo)})
    call = record(site, ids, lay, lay, "first")
    out = call_fn(rec.operand(w, wo, site, "weight", track=not sparse))
    # The output puts the batch where the indices have it (one more dim, last).
    tr.set_layout(out, lay)
    call.memo["out_layout"] = lay
    watched = rec.watch(out, call, 0, [ids])
    if watched is not out:
        tr.set_layout(watched, lay)
    return watched


def _refuse_freq(tr: Tracer, name: str, origins: dict[int, Origin]) -> None:
    tr.rec.unsupported(
        tr, name, origins,
        "scale_grad_by_freq=True divides each row's gradient by how often its index occurs in the whole "
        "batch, which couples the samples, so per-sample gradients do not exist; use "
        "scale_grad_by_freq=False or freeze the embedding",
    )


@register_handler(F.embedding)
def embedding(tr: Tracer, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], batched: dict[int, AnyLayout], origins: dict[int, Origin]) -> Any:
    ids, w = args[0], arg(args, kwargs, 1, "weight")
    opts = {k: arg(args, kwargs, i, k, d) for i, k, d in ((2, "padding_idx", None), (3, "max_norm", None), (4, "norm_type", 2.0), (5, "scale_grad_by_freq", False), (6, "sparse", False))}
    wo = origins.get(id(w))
    if wo is None or id(ids) not in batched:
        tr.rec.unsupported(tr, "embedding", origins, "a lookup whose table depends on the batch")
        return tr.rec.plain(tr, func, args, kwargs, batched, origins)
    if opts["scale_grad_by_freq"]:
        _refuse_freq(tr, "embedding", origins)
        return tr.rec.plain(tr, func, args, kwargs, batched, origins)
    pad = opts["padding_idx"]
    if pad is not None and pad < 0:
        pad += w.shape[0]
    return _lookup(tr, lambda w_op: func(ids, w_op, **opts), ids, w, wo, pad, bool(opts["sparse"]))


@register_handler(torch.embedding)
def embedding_op(tr: Tracer, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], batched: dict[int, AnyLayout], origins: dict[int, Origin]) -> Any:
    w, ids = args[0], arg(args, kwargs, 1, "indices")
    pad = arg(args, kwargs, 2, "padding_idx", -1)
    freq, sparse = arg(args, kwargs, 3, "scale_grad_by_freq", False), arg(args, kwargs, 4, "sparse", False)
    wo = origins.get(id(w))
    if wo is None or id(ids) not in batched:
        tr.rec.unsupported(tr, "embedding", origins, "a lookup whose table depends on the batch")
        return tr.rec.plain(tr, func, args, kwargs, batched, origins)
    if freq:
        _refuse_freq(tr, "embedding", origins)
        return tr.rec.plain(tr, func, args, kwargs, batched, origins)
    padding_idx = None if pad < 0 else pad
    return _lookup(tr, lambda w_op: func(w_op, ids, pad, freq, sparse), ids, w, wo, padding_idx, bool(sparse))


@register_handler(Tensor.__getitem__)
def getitem(tr: Tracer, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], batched: dict[int, AnyLayout], origins: dict[int, Origin]) -> Any:
    """``W[ids]``: a batch-independent table indexed by one batched long tensor."""
    w, index = args[0], args[1]
    wo = origins.get(id(w))
    ok = (
        isinstance(index, Tensor) and id(index) in batched and w.dim() == 2
        and index.dtype in (torch.long, torch.int) and id(w) not in batched
    )
    if wo is None or not ok:
        tr.rec.unsupported(tr, "__getitem__", origins, "indexing that mixes a parameter with the batch in this way")
        return tr.rec.plain(tr, func, args, kwargs, batched, origins)
    return _lookup(tr, lambda w_op: w_op[index], index, w, wo, None, False)
