"""DP-SGD with gradhooks against Opacus and non-private training, on scikit-learn's digits.

    python examples/dp_compare_digits.py            # MLP and GroupNorm CNN, 3 seeds, 20 epochs
    python examples/dp_compare_digits.py --quick    # 1 seed, 2 epochs

Two models: the MLP 64-64-10, and a CNN on the digits as 1x8x8 images (two 3x3
convolutions, each followed by GroupNorm and ReLU, then a linear layer). For
each: non-private SGD (shuffled batches of ``--batch``), gradhooks' ``DPSGD``,
Opacus' ``PrivacyEngine`` with its hooks and (if it runs) its ghost clipping;
the DP runs share q (Opacus' ``1 / ceil(n / batch)``, so L = q n), the noise
multiplier, the clipping norm C, the epochs and the seeds. Printed as a Markdown table: test accuracy (mean and spread over
seeds), epsilon at delta, seconds per training epoch and its ratio to the
non-private epoch (medians over seeds, one process, same machine).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from collections.abc import Callable, Sequence

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from gradhooks.privacy import DPSGD  # noqa: E402

Data = tuple[Tensor, Tensor, Tensor, Tensor]


def load(seed: int) -> Data:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    as_x = lambda a: torch.tensor(a, dtype=torch.float32) / 8.0 - 1.0  # noqa: E731  (known pixel range 0..16)
    return as_x(x_tr), torch.tensor(y_tr), as_x(x_te), torch.tensor(y_te)


class Images(nn.Module):
    """``(N, 64) -> (N, 1, 8, 8)``."""

    def forward(self, x: Tensor) -> Tensor:
        return x.view(-1, 1, 8, 8)


def make_model(kind: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    return nn.Sequential(
        Images(),
        nn.Conv2d(1, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.GroupNorm(4, 32), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    out = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return out


def run_plain(model: nn.Module, data: Data, a: argparse.Namespace, seed: int) -> tuple[float, float]:
    x, y, _, _ = data
    opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(a.epochs):
        for idx in torch.randperm(len(x), generator=gen).split(a.batch):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return time.perf_counter() - start, float("nan")


def run_ours(model: nn.Module, data: Data, a: argparse.Namespace, seed: int) -> tuple[float, float]:
    x, y, _, _ = data
    opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=0.9)
    dp = DPSGD(model, opt, dataset_size=len(x), expected_batch_size=a.expected, delta=a.delta, max_norm=a.max_norm,
               noise_multiplier=a.noise_multiplier, sample_generator=torch.Generator().manual_seed(seed),
               noise_generator=torch.Generator().manual_seed(seed + 1))
    start = time.perf_counter()
    for idx in dp.batches(epochs=a.epochs):
        with dp.step():
            F.cross_entropy(model(x[idx]), y[idx], reduction="sum").backward()
    return time.perf_counter() - start, dp.epsilon()


class Indexed(torch.utils.data.Dataset):
    """A whole batch by one tensor index (``__getitems__``), as the other loops index:
    Opacus' loader then pays no per-example fetch and collate."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x[i], self.y[i]

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        idx = torch.tensor(indices, dtype=torch.long)
        return self.x[idx], self.y[idx]


def as_batch(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    return batch


def run_opacus(mode: str) -> Callable[[nn.Module, Data, argparse.Namespace, int], tuple[float, float]]:
    def run(model: nn.Module, data: Data, a: argparse.Namespace, seed: int) -> tuple[float, float]:
        from opacus import PrivacyEngine
        from torch.utils.data import DataLoader

        x, y, _, _ = data
        opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=0.9)
        loader = DataLoader(Indexed(x, y), batch_size=a.batch, collate_fn=as_batch,
                            generator=torch.Generator().manual_seed(seed))
        engine = PrivacyEngine(accountant="rdp")
        # Opacus' "mean": the loss averages over the batch, the noisy sum is divided by its expected size.
        kw = {"criterion": nn.CrossEntropyLoss()} if mode == "ghost" else {}
        got = engine.make_private(module=model, optimizer=opt, data_loader=loader, noise_multiplier=a.noise_multiplier,
                                  max_grad_norm=a.max_norm, poisson_sampling=True, grad_sample_mode=mode,
                                  loss_reduction="mean", noise_generator=torch.Generator().manual_seed(seed + 1), **kw)
        wrapped, dp_opt, dp_loader = got[0], got[1], got[-1]
        crit = got[2] if mode == "ghost" else nn.CrossEntropyLoss()
        start = time.perf_counter()
        for _ in range(a.epochs):
            for xb, yb in dp_loader:
                dp_opt.zero_grad(set_to_none=True)
                crit(wrapped(xb), yb).backward()
                dp_opt.step()
        seconds = time.perf_counter() - start
        if hasattr(wrapped, "_close"):
            wrapped._close()
        return seconds, engine.get_epsilon(a.delta)

    return run


METHODS = {
    "non-private": run_plain,
    "gradhooks DPSGD": run_ours,
    "Opacus hooks": run_opacus("hooks"),
    "Opacus ghost": run_opacus("ghost"),
}


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, 2 epochs")
    ap.add_argument("--epochs", type=int, default=None, help="default 20 (--quick: 2)")
    ap.add_argument("--seeds", type=int, default=None, help="default 3 (--quick: 1)")
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--batch", type=int, default=256, help="L: the (expected) batch size")
    ap.add_argument("--max-norm", type=float, default=1.0)
    ap.add_argument("--noise-multiplier", type=float, default=3.0)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--lr", type=float, default=0.3)
    a = ap.parse_args(argv)
    a.epochs = a.epochs or (2 if a.quick else 20)
    a.seeds = a.seeds or (1 if a.quick else 3)
    return a


def same_rate(a: argparse.Namespace, n: int) -> None:
    """Opacus' Poisson loader takes ``q = 1 / len(loader) = 1 / ceil(n / batch)``: use that
    q everywhere (our expected batch size ``q n``), so the accountants see the same run."""
    steps = -(-n // a.batch)
    a.expected = n / steps


def main(argv: Sequence[str] | None = None) -> dict[tuple[str, str], dict[str, float]]:
    a = parse(argv)
    data = load(0)
    same_rate(a, len(data[0]))
    print(f"digits {len(data[0])} train / {len(data[2])} test; L={a.expected:g} (q={a.expected / len(data[0]):.4f}; "
          f"Opacus loader batch_size={a.batch}, non-private batches of {a.batch}), "
          f"C={a.max_norm:g}, sigma={a.noise_multiplier:g}, {a.epochs} epochs, SGD lr {a.lr} momentum 0.9, "
          f"{a.seeds} seed(s), torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| model | method | test accuracy | epsilon | s / epoch | vs non-private |")
    print("| --- | --- | --- | --- | --- | --- |")
    results: dict[tuple[str, str], dict[str, float]] = {}
    for kind in a.models.split(","):
        base = None
        for name, run in METHODS.items():
            accs, secs, eps = [], [], float("nan")
            try:
                for seed in range(a.seeds):
                    model = make_model(kind, seed)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        seconds, eps = run(model, data, a, seed)
                    secs.append(seconds / a.epochs)
                    accs.append(accuracy(model, data[2], data[3]))
            except Exception as err:  # a method that does not run on this model is reported, not fatal
                print(f"| {kind} | {name} | did not run: {type(err).__name__}: {str(err).splitlines()[0][:80]} | | | |")
                continue
            t = statistics.median(secs)
            base = t if name == "non-private" else base
            spread = f" ± {statistics.stdev(accs):.3f}" if len(accs) > 1 else ""
            eps_s = "∞" if eps != eps else f"{eps:.2f}"
            ratio = f"{t / base:.2f}x" if base else "n/a"
            results[(kind, name)] = {"acc": statistics.mean(accs), "epsilon": eps, "seconds": t}
            print(f"| {kind} | {name} | {statistics.mean(accs):.3f}{spread} | {eps_s} | {t:.3f} | {ratio} |", flush=True)
    return results


if __name__ == "__main__":
    main()
