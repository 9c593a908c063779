"""Per-sample clipping under DistributedDataParallel, and what it costs.

Run with two processes on this machine (gloo backend, CPU)::

    torchrun --nproc-per-node 2 examples/ddp_clipping.py

Each rank trains the same MLP on its own shard of a synthetic regression task
with per-sample gradient clipping, checks once that its clipped gradient equals
what one process computes on the concatenated batch, then times a training
step three ways: plain DDP, gradhooks inside ``no_sync()`` (one all-reduce, in
``clip_``), and gradhooks without ``no_sync()`` (DDP's unclipped all-reduce
during backward, then ``clip_``'s).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

from gradhooks import per_sample_grads  # noqa: E402


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(inplace=True), nn.Linear(256, 256), nn.ReLU(inplace=True), nn.Linear(256, 1))


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 64, generator=gen)
    y = torch.sin(x[:, :8].sum(1, keepdim=True)) + 0.1 * torch.randn(n, 1, generator=gen)
    return x, y


def check_against_one_process(ddp: DDP, rank: int, world: int, local_n: int, max_norm: float) -> float:
    """Max abs difference between this rank's clipped p.grad and the single-process one."""
    x, y = make_data(local_n * world, seed=123)
    lo = rank * local_n
    ddp.zero_grad(set_to_none=True)
    with ddp.no_sync(), per_sample_grads(ddp, one_backward=True) as g:
        F.mse_loss(ddp(x[lo : lo + local_n]), y[lo : lo + local_n]).backward()
    g.clip_(max_norm)
    ours = [p.grad.clone() for p in ddp.module.parameters()]

    single = make_model()
    single.load_state_dict(ddp.module.state_dict())
    with per_sample_grads(single) as g1:
        F.mse_loss(single(x), y).backward()
    g1.clip_(max_norm)
    return max((a - p.grad).abs().max().item() for a, p in zip(ours, single.parameters(), strict=False))


def timed(fn, steps: int) -> float:
    fn()  # warm-up
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    dist.barrier()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--local-batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--max-norm", type=float, default=1.0)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    ddp = DDP(make_model())
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)

    diff = check_against_one_process(ddp, rank, world, 16, args.max_norm)
    if rank == 0:
        print(f"clipped p.grad vs one process on the concatenated batch: max abs diff {diff:.2e}")

    x, y = make_data(args.local_batch, seed=rank)

    def plain() -> None:
        opt.zero_grad(set_to_none=True)
        F.mse_loss(ddp(x), y).backward()
        opt.step()

    def clipped(no_sync: bool, materialize: bool) -> None:
        opt.zero_grad(set_to_none=True)
        sync = ddp.no_sync() if no_sync else torch.enable_grad()
        # one_backward needs no_sync(): DDP's reducer would wait for weight gradients that never come
        with sync, per_sample_grads(ddp, materialize=materialize, one_backward=no_sync) as g:
            F.mse_loss(ddp(x), y).backward()
        g.clip_(args.max_norm)
        opt.step()

    for epoch in range(3):
        for _ in range(10):
            clipped(True, False)
        with torch.no_grad():
            loss = F.mse_loss(ddp(x), y).detach()
        dist.all_reduce(loss)
        if rank == 0:
            print(f"epoch {epoch}: mean training loss {loss.item() / world:.4f}")

    rows = [
        ("plain DDP step", lambda: plain()),
        ("gradhooks, no_sync, one_backward, materialize=False", lambda: clipped(True, False)),
        ("gradhooks, no_sync, one_backward, materialize=True", lambda: clipped(True, True)),
        ("gradhooks, DDP sync (default mode) + clip_", lambda: clipped(False, False)),
    ]
    times = [(name, timed(fn, args.steps)) for name, fn in rows]
    if rank == 0:
        base = times[0][1]
        print(f"\n{world} ranks, local batch {args.local_batch}, {torch.get_num_threads()} thread(s) per rank")
        for name, t in times:
            print(f"  {name:<52} {t * 1e3:8.2f} ms  {t / base:5.2f}x")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
