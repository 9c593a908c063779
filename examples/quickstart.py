"""gradhooks in one minute: per-sample gradients of a small MLP, checked against
the naive loop, then one step of per-sample-clipped SGD.

    python examples/quickstart.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gradhooks import per_sample_grads


def main() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(inplace=True), nn.Linear(64, 5))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(32, 20), torch.randint(0, 5, (32,))

    # 1. Per-sample gradients: one forward, one backward, hooks do the rest.
    with per_sample_grads(model) as g:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
    print(f"batch of {g.batch_size}; per-sample gradient shapes:")
    for name, grad in g.items():
        print(f"  {name:<10} {tuple(grad.shape)}")

    # 2. Check them against the naive loop: one backward per sample.
    worst = 0.0
    for n in range(g.batch_size):
        params = list(model.parameters())
        own = torch.autograd.grad(F.cross_entropy(model(x[n : n + 1]), y[n : n + 1]), params)
        for name, ref in zip(g.keys(), own, strict=False):
            worst = max(worst, (g[name][n] - ref).abs().max().item())
    print(f"max |gradhooks - naive loop| = {worst:.2e}")
    assert worst < 1e-5

    # 3. Norms, and the mean gradient backward put in p.grad.
    norms = g.norms()
    print(f"per-sample gradient norms: min {norms.min():.3f}, median {norms.median():.3f}, max {norms.max():.3f}")
    assert torch.allclose(g["0.weight"].mean(0), model[0].weight.grad, atol=1e-6)

    # 4. One step of per-sample-clipped SGD: p.grad := mean of the clipped gradients.
    factors = g.clip_(max_norm=1.0)
    print(f"clipped {(factors < 1).sum().item()} of {g.batch_size} samples to norm 1.0")
    optimizer.step()
    optimizer.zero_grad()

    # 5. The same without building (N, out, in) tensors: norms and clip_ stay exact.
    with per_sample_grads(model, materialize=False) as lean:
        F.cross_entropy(model(x), y).backward()
    lean.clip_(max_norm=1.0)
    optimizer.step()
    print("materialize=False: norms", [round(v, 3) for v in lean.norms()[:4].tolist()], "...")


if __name__ == "__main__":
    main()
