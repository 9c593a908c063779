"""``--plot FILE.png``: the time ratios of one run as two panels of horizontal bars.

Left: methods that give every per-sample gradient and the norms; right: methods
that give the norms and the clipped mean gradient (a DP-SGD step), with
BackPACK's norms-only method beside them. One row group per configuration,
named by its readable label; one colour per method (gradhooks' modes solid,
the others hatched); log-scaled x axis, 1 = plain forward + backward.
"""

from __future__ import annotations

import math
from typing import Any

from .methods import CLIPPING

__all__ = ["COLOURS", "write_plot"]

#: Okabe-Ito colours (distinguishable with colour-vision deficiencies); the same
#: colour for the same mode in both panels (one-backward purple, say).
COLOURS = {
    "gradhooks": "#0b4f9c",
    "gradhooks-reuse": "#56b4e9",
    "gradhooks-1bw": "#8e44ad",
    "gradhooks-ghost": "#0b4f9c",
    "gradhooks-ghost-1bw": "#8e44ad",
    "naive": "#999999",
    "torch.func": "#e69f00",
    "opacus": "#d55e00",
    "opacus-clip": "#d55e00",
    "opacus-ghost": "#cc79a7",
    "backpack": "#009e73",
    "backpack-l2": "#009e73",
}

TITLE = "Time per training step, relative to plain forward + backward (lower is better)"
XLABEL = "time per step / plain step (log scale; 1 = plain backward, lower is better)"


def _ratio(rows: list[dict[str, Any]], config: str, method: str) -> tuple[float | None, str]:
    """``(ratio, "")`` for a good row, else ``(None, its status)`` (``n/a``, ``error``, ...)."""
    for r in rows:
        if r["config"] == config and r["method"] == method:
            return (r["ratio"], "") if r["status"] == "ok" and r["ratio"] is not None else (None, r["status"])
    return None, "not run"


def _panel(ax: Any, rows: list[dict[str, Any]], configs: list[str], labels: dict[str, str], methods: list[str], title: str) -> None:
    height = 0.8 / max(1, len(methods))
    for k, method in enumerate(methods):
        ys = [i + k * height for i in range(len(configs))]
        got = [_ratio(rows, c, method) for c in configs]
        ratios = [r for r, _ in got]
        ours = method.startswith("gradhooks")
        vals = [r if r is not None else math.nan for r in ratios]
        ax.barh(ys, vals, height, color=COLOURS.get(method, "#444444"), label=method,
                hatch=None if ours else "///", edgecolor="white" if not ours else None, linewidth=0)
        for y, (r, why) in zip(ys, got, strict=True):
            ax.text(r * 1.03 if r is not None else 1.03, y, f"{r:.2f}x" if r is not None else why,
                    va="center", fontsize=6, color="#222222" if r is not None else "#888888")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(configs))], [labels.get(c, c) for c in configs])
    ax.set_xlabel(XLABEL, fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.045 * 12 / max(6, len(configs))), ncol=4,
              frameon=False)
    ax.grid(axis="x", which="both", alpha=0.25)


def write_plot(path: str, rows: list[dict[str, Any]]) -> str | None:
    """Write the figure; returns an explanation instead when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "--plot needs matplotlib: pip install matplotlib (or the 'bench' extra)"
    configs = list(dict.fromkeys(r["config"] for r in rows))
    labels = {r["config"]: r.get("label") or r["config"] for r in rows}
    present = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "plain"]
    left = [m for m in present if m not in CLIPPING]
    right = [m for m in present if m in CLIPPING]
    panels = [(left, "every per-sample gradient + norms"), (right, "norms + clipped gradient (DP-SGD step)")]
    panels = [p for p in panels if p[0]]
    fig, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels), 1.0 + 0.75 * len(configs) + 0.05 * len(present) * len(configs)),
                             sharey=True, squeeze=False)
    for ax, (methods, title) in zip(axes[0], panels, strict=True):
        _panel(ax, rows, configs, labels, methods, title)
    axes[0][0].invert_yaxis()  # first configuration on top (the panels share the axis: once)
    fig.suptitle(TITLE, fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
