"""An independent DP-SGD step for the privacy tests: the naive per-sample loop, each
clipping style's formula written out, the noise drawn from a replica generator.

``step(...)`` returns what every ``p.grad`` must be after one logical batch:
``(sum_n c_{n,k} g_{n,k} + z) / L`` with ``z ~ N(0, (sigma' S)^2)`` drawn per
parameter in key order, then (adaptive clipping) one count-noise draw.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradhooks.privacy import DPSGD, PoissonBatchSampler
from tests import reference

N_DATA = 40


def groups_of(names: list[str], spec: str | dict[str, list[str]]) -> dict[str, list[str]]:
    if spec == "parameter":
        return {n: [n] for n in names}
    if spec == "module":
        out: dict[str, list[str]] = {}
        for n in names:
            out.setdefault(n.rpartition(".")[0], []).append(n)
        return out
    assert isinstance(spec, dict)
    return spec


def factors(ps: dict[str, Tensor], style: dict) -> list[tuple[list[str], Tensor]]:
    """Per-group factors from the per-sample gradients ``ps`` (``{name: (N, ...)}``)."""
    names = list(ps)
    flat = lambda ks: torch.cat([ps[k].reshape(ps[k].shape[0], -1) for k in ks], 1).norm(dim=1)  # noqa: E731
    kind = style["kind"]
    if kind in ("flat", "adaptive"):
        return [(names, (style["C"] / (flat(names) + 1e-6)).clamp(max=1.0))]
    if kind == "automatic":
        return [(names, style["C"] / (flat(names) + style["gamma"]))]
    groups = groups_of(names, style["groups"])
    cs = style["C"] if isinstance(style["C"], dict) else dict.fromkeys(groups, style["C"])
    return [(ks, (cs[k] / (flat(ks) + 1e-6)).clamp(max=1.0)) for k, ks in groups.items()]


def sensitivity(ps_names: list[str], style: dict) -> float:
    if style["kind"] != "group":
        return style["C"]
    groups = groups_of(ps_names, style["groups"])
    cs = style["C"] if isinstance(style["C"], dict) else dict.fromkeys(groups, style["C"])
    return math.sqrt(sum(c * c for c in cs.values()))


def step(model: nn.Module, loss: Callable, x: Tensor, y: Tensor, *, style: dict, L: float, sigma: float,
         gen: torch.Generator) -> tuple[dict[str, Tensor], float]:
    """``({name: p.grad}, adaptive count statistic or 0)`` for the logical batch ``(x, y)``."""
    params = reference.trainable(model)
    total = {k: torch.zeros_like(p) for k, p in params.items()}
    stat = 0.0
    if len(x):
        ps = reference.naive(model, loss, x, y)
        for ks, c in factors(ps, style):
            for k in ks:
                total[k] += torch.einsum("n,n...->...", c, ps[k])
        if style["kind"] == "adaptive":
            stat = float((reference.norms(ps) <= style["C"]).double().sub(0.5).sum())
    sig = sigma
    if style["kind"] == "adaptive" and sigma > 0:
        sig = (sigma ** -2 - (2 * style["count_std"]) ** -2) ** -0.5
    std = sig * sensitivity(list(params), style)
    out = {}
    for k, p in params.items():
        z = std * torch.randn(p.shape, generator=gen, dtype=p.dtype) if std > 0 else 0.0
        out[k] = (total[k] + z) / L
    if style["kind"] == "adaptive":
        stat += float(torch.randn((), generator=gen, dtype=torch.float64)) * style["count_std"]
    return out, stat


# -- a small float64 DP run and its replay -------------------------------------


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()


class Signal(nn.Module):
    """``(N, 6) -> (N, 1, 6)``: the features as a one-channel signal."""

    def forward(self, x: Tensor) -> Tensor:
        return x.unsqueeze(1)


def group_norm_cnn() -> nn.Sequential:
    """Conv1d + GroupNorm + Linear on the same data (normalization layers under DP)."""
    torch.manual_seed(0)
    return nn.Sequential(Signal(), nn.Conv1d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.Tanh(),
                         nn.Flatten(), nn.Linear(24, 3)).double()


def dataset(n: int = N_DATA) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen)


def loss_of(reduction: str):
    return lambda m, x, y: F.cross_entropy(m(x), y, reduction=reduction)


def make(model, *, lr=0.1, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    args = {"dataset_size": N_DATA, "expected_batch_size": 6.0, "delta": 1e-5, "max_norm": 0.5,
            "noise_multiplier": 0.9, "sample_generator": torch.Generator().manual_seed(5),
            "noise_generator": torch.Generator().manual_seed(7), **kw}
    return DPSGD(model, opt, **args), opt


def run_and_capture(dp, opt, model, x, y, epochs=1, reduction="sum"):
    """Train; return p.grad at every optimizer step and the micro-batch sizes seen."""
    steps, sizes = [], []
    handle = opt.register_step_pre_hook(lambda *_: steps.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}))
    try:
        for idx in dp.batches(epochs=epochs):
            sizes.append(len(idx))
            with dp.step():
                loss_of(reduction)(model, x[idx], y[idx]).backward()
    finally:
        handle.remove()
    return steps, sizes


def replay(model, x, y, *, L, sigma, style, epochs=1, lr=0.1, q=None, steps_per_epoch=None):
    """The reference run: same batches (a replica sampler), naive clipped sums, replica noise, plain SGD."""
    ref = copy.deepcopy(model)
    q = q if q is not None else L / N_DATA
    sampler = PoissonBatchSampler(N_DATA, q, generator=torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(7)
    out = []
    for _ in range(epochs * (steps_per_epoch or round(1 / q))):
        idx = sampler.draw()
        want, stat = step(ref, loss_of("sum"), x[idx], y[idx], style=style, L=L, sigma=sigma, gen=gen)
        out.append((want, len(idx)))
        with torch.no_grad():
            for k, p in ref.named_parameters():
                if p.requires_grad:
                    p -= lr * want[k]
        if style["kind"] == "adaptive":
            style = {**style, "C": style["C"] * math.exp(-style["lr"] * (stat / L + 0.5 - style["q"]))}
    return out, ref
