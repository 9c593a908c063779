"""Helpers shared by the use handlers: argument access, sites, recorded calls."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from ..capture import Call
from ..recording import label_for
from ..rule import Rule
from ..rules.dense import DENSE
from ..sites import Site
from ..trace.derive import Chain, Origin
from ..trace.layout import AnyLayout
from ..trace.tracer import Tracer

__all__ = ["arg", "Geometry", "new_site", "record", "dense_site"]


def arg(args: tuple[Any, ...], kwargs: dict[str, Any], pos: int, name: str, default: Any = None) -> Any:
    """Argument ``name`` of a call, given at position ``pos`` or by keyword."""
    if len(args) > pos:
        return args[pos]
    return kwargs.get(name, default)


class Geometry:
    """An op's arguments under a module's attribute names, for a rule. The tensors
    are detached: the rule only reads their shape, dtype and values."""

    def __init__(self, **attrs: Any) -> None:
        for k, v in attrs.items():
            setattr(self, k, v.detach() if isinstance(v, Tensor) else v)

    def get_parameter(self, name: str) -> Tensor:
        return getattr(self, name)


def new_site(tr: Tracer, key: Any, rule: Rule, geometry: Callable[[], Any], operands: dict[str, tuple[Tensor, Origin]]) -> Site:
    """The site for ``key``, created on first use (``geometry()`` builds the rule's
    ``module`` then). ``operands``: local name -> (tensor the op used, its origin)."""
    site = tr.rec.sites.get(key)
    if site is not None:
        return site
    rec = tr.rec
    origins = [o for _, o in operands.values()]
    chains = {local: Chain(o) for local, (_, o) in operands.items()}

    labels = rec.labels  # not rec: the recording holds the site (no reference cycle)

    def label() -> str:
        return ", ".join(dict.fromkeys(label_for(labels, o) for o in origins))

    site = rec.sites[key] = Site(rule, geometry(), label, list(operands), chains)
    return site


def record(
    site: Site, x: Tensor, in_layout: AnyLayout, out_layout: AnyLayout, canon: str, n_outputs: int = 1, **memo: Any
) -> Call:
    """A call of ``site`` with raw input ``x``: the context puts its batch first at
    exit (``canon``: ``"first"`` moves the batch to dimension 0, ``"split"`` keeps
    dimension 0 and splits merged rows into several calls, ``"first_t"`` also
    transposes the last two dimensions)."""
    call = Call((x,), {}, [None] * n_outputs)
    call.memo.update(in_layout=in_layout, out_layout=out_layout, canon=canon, **memo)
    call.keep_version(x)
    site.calls.append(call)
    return call


def dense_site(tr: Tracer, key: Any, operands: dict[str, tuple[Tensor, Origin]]) -> tuple[Site, Call]:
    """A site whose per-sample gradients are recorded as they are (one call holds
    them, in the order of ``call.memo["names"]``)."""
    site = new_site(tr, key, DENSE, lambda: Geometry(**{local: t for local, (t, _) in operands.items()}), operands)
    if not site.calls:
        call = Call((), {}, [None] * len(site.names))
        call.memo["names"] = list(site.names)
        site.calls.append(call)
    return site, site.calls[0]
