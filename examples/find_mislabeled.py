"""Find mislabeled training examples by their per-sample gradient norm.

    python examples/find_mislabeled.py                 # writes mislabeled_norms.png here
    python examples/find_mislabeled.py --out norms.png
    python examples/find_mislabeled.py --quick         # CI

10% of scikit-learn's digits training labels are flipped to another class at
random (seeded). After brief training the model fits the clean majority, so a
flipped example's loss, and with it its gradient, stays large. gradhooks gives
every training example's gradient norm from one forward/backward pass over the
whole set, without building per-sample gradients (``materialize=False``);
ranking by it finds the flipped labels far above the 10% a random pick gets.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from gradhooks import per_sample_grads  # noqa: E402
from gradhooks.diagnostics import NormStats  # noqa: E402


def load_train(seed: int) -> tuple[Tensor, Tensor]:
    """The digits training split (1437 images), pixels scaled to [-1, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, _, y_tr, _ = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    return torch.tensor(x_tr, dtype=torch.float32) / 8.0 - 1.0, torch.tensor(y_tr)


def flip_labels(y: Tensor, fraction: float, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """``(noisy labels, flipped mask)``: ``fraction`` of the labels moved to another class."""
    k = round(fraction * len(y))
    picked = torch.randperm(len(y), generator=gen)[:k]
    noisy = y.clone()
    noisy[picked] = (y[picked] + torch.randint(1, 10, (k,), generator=gen)) % 10
    flipped = torch.zeros(len(y), dtype=torch.bool)
    flipped[picked] = True
    return noisy, flipped


def train(model: nn.Module, x: Tensor, y: Tensor, epochs: int, batch: int, gen: torch.Generator) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()


def gradient_norms(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Each example's gradient norm, ``(N,)``, and per layer ``{layer: (N,)}``, from
    one pass over ``x`` with nothing materialized."""
    with per_sample_grads(model, materialize=False) as g:
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    squares: dict[str, Tensor] = {}
    for name, norm in g.param_norms().items():
        layer = name.rpartition(".")[0]
        squares[layer] = squares.get(layer, 0) + norm.square()
    return g.norms(), {layer: sq.sqrt() for layer, sq in squares.items()}


def precision_at_k(scores: Tensor, positives: Tensor) -> float:
    """Fraction of positives among the ``k = positives.sum()`` highest scores."""
    k = int(positives.sum())
    return positives[scores.topk(k).indices].float().mean().item()


def save_histogram(path: str, norms: Tensor, flipped: Tensor, threshold: float) -> str:
    try:
        import matplotlib
    except ImportError:
        return "no plot: matplotlib is not installed (pip install matplotlib)"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    bins = torch.linspace(0, float(norms.max()), 50).tolist()
    ax.hist(norms[~flipped].tolist(), bins=bins, alpha=0.6, label=f"clean labels ({int((~flipped).sum())})")
    ax.hist(norms[flipped].tolist(), bins=bins, alpha=0.6, label=f"flipped labels ({int(flipped.sum())})")
    ax.axvline(threshold, color="k", linestyle="--", linewidth=1, label=f"top-k cut (k={int(flipped.sum())})")
    ax.set_xlabel("per-sample gradient norm")
    ax.set_ylabel("training examples (log scale)")
    ax.set_yscale("log")
    ax.set_title("digits, 10% labels flipped: per-sample gradient norms after brief training")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"histogram of clean vs flipped norms: {path}"


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer epochs (CI)")
    ap.add_argument("--epochs", type=int, default=None, help="training epochs (default 8, --quick 3)")
    ap.add_argument("--fraction", type=float, default=0.1, help="fraction of training labels flipped")
    ap.add_argument("--out", default="mislabeled_norms.png", help="histogram PNG path")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    args = parse(argv)
    epochs = args.epochs or (3 if args.quick else 8)
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(args.seed)
    x, y = load_train(args.seed)
    noisy, flipped = flip_labels(y, args.fraction, gen)
    k = int(flipped.sum())
    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    train(model, x, noisy, epochs, 64, gen)
    fit = (model(x).argmax(1) == noisy).float()
    norms, layer_norms = gradient_norms(model, x, noisy)
    with torch.no_grad():
        losses = F.cross_entropy(model(x), noisy, reduction="none")

    print(
        f"digits: {len(x)} training images, {k} labels flipped ({args.fraction:.0%}); "
        f"MLP 64-64-10 trained {epochs} epochs on the noisy labels\n"
        f"  it fits {fit[~flipped].mean().item():.1%} of the clean labels, {fit[flipped].mean().item():.1%} of the flipped ones\n"
    )
    print(f"per-sample gradient norm, clean  : {NormStats.of(norms[~flipped])}")
    print(f"per-sample gradient norm, flipped: {NormStats.of(norms[flipped])}\n")
    base = k / len(x)
    print(f"precision at k={k}: share of flipped labels among the {k} top-ranked examples (random pick: {base:.3f})")
    rankings = {"gradient norm, whole model": norms}
    rankings.update({f"gradient norm, layer {layer!r}": v for layer, v in layer_norms.items()})
    rankings["per-sample loss (for reference)"] = losses
    scores = {what: precision_at_k(v, flipped) for what, v in rankings.items()}
    for what, p in scores.items():
        print(f"  {what:<32} {p:.3f}")
    threshold = norms.topk(k).values[-1].item()
    print(save_histogram(args.out, norms, flipped, threshold))
    print(f"({time.perf_counter() - start:.1f} s)")
    return {"precision_at_k": scores["gradient norm, whole model"], "baseline": base, "k": float(k)}


if __name__ == "__main__":
    main()
