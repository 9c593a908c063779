"""``PerSampleGrads``: the read-only mapping the context manager returns.

It answers every query through an :class:`~gradhooks.accounts.Account`: the
materialized per-sample tensors, or (``materialize=False``) the captured
inputs and output gradients, from which norms and weighted sums are exact
without any ``(N, *p.shape)`` tensor. Clipping and noise are in
:mod:`gradhooks.clip`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

from . import clip
from .accounts import Account, Materialized
from .distributed import World
from .errors import ContextStateError, InvalidArgumentError, NonFiniteNormError, UnknownNameError

__all__ = ["PerSampleGrads"]

_State = Literal["open", "ready", "failed", "no_backward"]


class PerSampleGrads(Mapping[str, Tensor]):
    """Per-sample gradients of one batch: ``g[name]`` is ``(N, *p.shape)``.

    Keys are the covered parameters' names as in ``model.named_parameters()``,
    in that order; ``g[name][n]`` is the gradient of sample ``n``'s own loss
    term. Valid once the ``per_sample_grads`` context has exited normally after
    a backward pass; using it otherwise raises ``RuntimeError``.
    """

    def __init__(self, params: dict[str, torch.nn.Parameter], loss_reduction: str, materialize: bool) -> None:
        self._params = dict(params)
        self._names = list(params)
        self._entered = list(params)  # covered on entry; strict=False may leave some out at exit
        self._loss_reduction = loss_reduction
        self._materialize = materialize
        self._state: _State = "open"
        self._why = "the per_sample_grads context has not exited yet: use g after the with block"
        self._n = 0
        self._account: Account | None = None
        self._before: dict[str, Tensor | None] = {}
        self._squared: dict[str, Tensor] | None = None
        self._world: World | None = None
        self._grad_scale: float | None = None  # GradScaler's scale of the captured gradients
        self._fallback_modules: list[str] = []
        self._guard: Callable[[], None] = lambda: None
        self._sparse: list[str] = []
        self._norm_dtype = torch.float32
        self._release_fn: Callable[[], None] = lambda: None
        self._one_backward = False

    # -- lifecycle (called by the context) --------------------------------

    def _ready(self, n: int, before: dict[str, Tensor | None], account: Account, *, world: World | None,
               grad_scale: float | None, guard: Callable[[], None], release: Callable[[], None]) -> None:
        self._n = n
        self._before = before
        self._account = account
        self._world = world
        self._grad_scale = grad_scale
        self._guard = guard
        self._release_fn = release
        # Decided now, not on entry: model.double() inside the block counts.
        dtypes = {p.dtype for p in self._params.values()}
        self._norm_dtype = torch.float64 if torch.float64 in dtypes else torch.float32
        self._state = "ready"

    def _fail(self, why: str) -> None:
        self._state = "failed"
        self._why = why
        self._release()

    def _no_backward(self) -> None:
        self._state = "no_backward"
        self._why = (
            "no backward pass ran inside the per_sample_grads context (no use of a covered "
            "parameter received a gradient): call loss.backward() inside the with block"
        )
        self._release()

    def _release(self) -> None:
        self._account = None
        self._squared = None
        self._release_fn()

    def _require(self) -> Account:
        if self._state != "ready" or self._account is None:
            raise ContextStateError(self._why)
        self._guard()
        return self._account

    # -- Mapping -------------------------------------------------------------

    def __getitem__(self, name: str) -> Tensor:
        account = self._require()
        if name not in self._params:
            close = difflib.get_close_matches(str(name), self._names, n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise UnknownNameError(f"{name!r} is not a covered parameter{hint} (keys: model.named_parameters() names)")
        if not isinstance(account, Materialized):
            raise ContextStateError(
                f"per-sample gradients were not materialized (materialize=False), so g[{name!r}] "
                "does not exist; use g.norms(), g.param_norms() or g.clip_(), or enter the "
                "context with materialize=True"
            )
        return account.tensors[name]

    def __iter__(self) -> Iterator[str]:
        self._require()
        return iter(self._names)

    def __len__(self) -> int:
        self._require()
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        self._require()
        return name in self._params

    def __repr__(self) -> str:
        if self._state != "ready":
            return f"PerSampleGrads(<{self._state}>)"
        mode = "materialized" if self._materialize else "not materialized"
        return f"PerSampleGrads(batch_size={self._n}, {len(self._names)} parameters, {mode})"

    # -- results -----------------------------------------------------------

    @property
    def batch_size(self) -> int:
        """N, the batch size of the model's input (local samples under DDP)."""
        self._require()
        return self._n

    @property
    def loss_reduction(self) -> str:
        """``"mean"`` or ``"sum"``, as passed to ``per_sample_grads``."""
        return self._loss_reduction

    @property
    def fallback_modules(self) -> list[str]:
        """Qualified names of the modules handled through ``torch.func`` (``fallback=True``)."""
        return list(self._fallback_modules)

    @property
    def params(self) -> dict[str, torch.nn.Parameter]:
        """``{name: parameter}`` for the covered parameters, in key order."""
        return dict(self._params)

    def _chosen(self, names: Iterable[str] | None, fn: str) -> list[str]:
        if names is None:
            return list(self._names)
        chosen = [names] if isinstance(names, str) else list(names)
        unknown = [k for k in chosen if k not in self._params]
        if unknown:
            raise UnknownNameError(f"{fn}: not covered parameters: {unknown} (covered: {self._names})")
        return chosen

    def _squared_norms(self) -> dict[str, Tensor]:
        account = self._require()
        if self._squared is None:
            sq = account.squared_norms()
            self._squared = {k: sq[k].to(self._norm_dtype) for k in self._names}
        return self._squared

    def param_norms(self) -> dict[str, Tensor]:
        """``{name: (N,)}``: each sample's L2 gradient norm, per parameter."""
        return {name: sq.sqrt() for name, sq in self._squared_norms().items()}

    def norms(self) -> Tensor:
        """``(N,)``: each sample's L2 gradient norm over all covered parameters."""
        sq = self._squared_norms()
        if not sq:
            return torch.zeros(self._n, dtype=self._norm_dtype)
        dev = next(iter(sq.values())).device
        return torch.stack([t.to(dev) for t in sq.values()]).sum(0).sqrt()

    def dot(self, others: Mapping[str, Tensor]) -> Tensor:
        """``(N,)``: ``sum_name <g[name][n], others[name]>`` for each sample. ``others``
        maps covered names to tensors of the parameter's shape (missing: zero)."""
        account = self._require()
        self._chosen(list(others), "dot")
        for k, v in others.items():
            shape = self._params[k].shape
            if tuple(v.shape) != tuple(shape):
                raise InvalidArgumentError(f"dot: others[{k!r}] has shape {tuple(v.shape)}, expected {tuple(shape)}")
        terms = [t.to(self._norm_dtype) for t in account.dots(dict(others)).values()]
        if not terms:
            return torch.zeros(self._n, dtype=self._norm_dtype)
        return torch.stack([t.to(terms[0].device) for t in terms]).sum(0)

    def weighted_sum(self, weights: Tensor, *, names: Iterable[str] | None = None) -> dict[str, Tensor]:
        """``{name: p.shape}``: ``sum_n weights[n] * g[name][n]`` (``weights``: ``(N,)``),
        float32 (float64 for float64 parameters), unscaled under a GradScaler.
        ``weights = torch.full((N,), 1 / N)`` gives the batch's mean gradient."""
        account = self._require()
        chosen = self._chosen(names, "weighted_sum")
        if not isinstance(weights, Tensor) or tuple(weights.shape) != (self._n,):
            got = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
            raise InvalidArgumentError(f"weighted_sum: weights must be a tensor of shape ({self._n},), got {got}")
        return account.weighted_sums(weights, chosen)

    def clip_(self, max_norm: float) -> Tensor:
        """Clip each sample's whole gradient to ``max_norm`` and set ``p.grad``.

        Factor ``c_n = min(1, max_norm / (norm_n + 1e-6))``; for every covered
        parameter ``p.grad = grad_before_context + reduce_n(c_n * g_n)``
        (``reduce``: mean for ``"mean"``, sum for ``"sum"``). Idempotent.
        Raises ``FloatingPointError`` (nothing changed) if a norm is not finite.
        Under DDP this is a collective call. Returns the factors, ``(N,)``."""
        return self._clip(max_norm)

    def _clip(self, max_norm: float, *, divisor: float | None = None, noise_std: float = 0.0,
              generator: torch.Generator | None = None) -> Tensor:
        """``clip_`` with DP-SGD's options: ``p.grad = before + (sum_n c_n g_n + z) / D``,
        ``z ~ N(0, noise_std^2 I)`` (per-sample units), ``D = divisor`` or the
        reduction's own (global N for "mean", 1 for "sum")."""
        account = self._require()
        clip.check_max_norm(max_norm)
        norms = self.norms()
        bad = (~torch.isfinite(norms)).nonzero().flatten().tolist()
        total_n, bad_anywhere = clip.global_counts(self._world, self._n, len(bad))
        factors = clip.clip_factors(norms, max_norm)
        if bad_anywhere:
            if self._grad_scale is not None:
                # GradScaler overflow: p.grad must hold the inf/nan that makes scaler.step
                # skip and scaler.update lower the scale (backward put it there, unless
                # it computed no gradient for these parameters: one_backward).
                if self._one_backward:
                    clip.poison_grads(self._params)
                return factors
            where = f"sample(s) {bad}" if bad else "samples of another rank"
            raise NonFiniteNormError(
                f"clip_: the per-sample gradient norm is not finite for {where}; "
                "p.grad was left unchanged. Check those samples' inputs and the loss."
            )
        div = float(divisor) if divisor is not None else (total_n if self._loss_reduction == "mean" else 1.0)
        if div == 0.0:
            return factors  # an empty batch with "mean": nothing to add, p.grad as it was
        scale = self._grad_scale if self._grad_scale is not None else 1.0
        clip.write_clipped(
            account, self._params, self._before, factors * (scale / div),
            noise_std=noise_std * scale / div, generator=generator, world=self._world, sparse=self._sparse,
        )
        return factors

    @property
    def _covered_names(self) -> Sequence[str]:
        return self._names

    def _left_out(self) -> list[str]:
        """Trainable parameters this result does not cover: those ``strict=False`` left out
        at exit (their ``p.grad`` is backward's raw gradient). Empty with ``strict=True``."""
        return [k for k in self._entered if k not in self._params]

    def _add_weighted_(self, weights: Tensor, names: Sequence[str]) -> None:
        """``p.grad := grad_before_context + sum_n weights[n] g[name][n]`` for ``names``, on this
        process alone: no collective, no noise, no finiteness check (the DP toolkit adds each
        micro-batch this way, one call per clipping group, and reduces once per logical batch).
        ``weights``: ``(N,)``, in per-sample units."""
        account = self._require()
        scale = self._grad_scale if self._grad_scale is not None else 1.0
        params = {k: self._params[k] for k in names}
        clip.write_clipped(account, params, self._before, weights * scale, sparse=self._sparse)
