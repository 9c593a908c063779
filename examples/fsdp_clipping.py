"""Per-sample clipping on a model sharded with FSDP2, and what it costs.

Run with two processes on this machine (gloo backend, CPU)::

    torchrun --nproc-per-node 2 examples/fsdp_clipping.py

A small GPT-style transformer (``fully_shard`` on every block and on the root)
is trained with exact per-sample clipping, each rank on its own micro-batch.
The script checks once that every rank's clipped ``p.grad`` shard equals the
same shard of what one process computes on the concatenated batch, then times
a training step (forward, backward, clip, optimizer step) against plain FSDP
(forward, backward with FSDP's reduce-scatter, optimizer step), and reports
each rank's peak memory during a step above what it held before the step.
``--bf16`` adds ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=f32)``.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: E402

from gradhooks import per_sample_grads  # noqa: E402


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(n, t, d))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int, d: int, blocks: int, heads: int, seq: int) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList([Block(d, heads) for _ in range(blocks)])
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def make_model(args: argparse.Namespace) -> GPT:
    torch.manual_seed(0)
    return GPT(args.vocab, args.width, args.blocks, args.heads, args.seq)


def shard(model: GPT, bf16: bool) -> GPT:
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for block in model.blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def make_data(n: int, args: argparse.Namespace, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, args.vocab, (n, args.seq + 1), generator=gen)
    return ids[:, :-1], ids[:, 1:]


def loss_of(model: nn.Module, ids: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(ids).flatten(0, 1).float(), y.flatten())


def check_against_one_process(args: argparse.Namespace, rank: int, world: int) -> float:
    """Max abs difference between this rank's clipped shards and one process's clipping."""
    ids, y = make_data(args.local_batch * world, args, seed=123)
    lo, hi = rank * args.local_batch, (rank + 1) * args.local_batch
    model = shard(make_model(args), args.bf16)
    with per_sample_grads(model, one_backward=True, materialize=False) as g:
        loss_of(model, ids[lo:hi], y[lo:hi]).backward()
    g.clip_(args.max_norm)

    single = make_model(args)
    if args.bf16:  # the weights FSDP computes with
        single = single.to(torch.bfloat16)
    with per_sample_grads(single, materialize=False) as g1:
        loss_of(single, ids, y).backward()
    g1.clip_(args.max_norm)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    err = 0.0
    for p, q in zip(model.parameters(), single.parameters(), strict=True):
        size, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        want = q.grad.float()[tuple(slice(o, o + s) for o, s in zip(offset, size, strict=True))]
        if want.numel():
            err = max(err, float((p.grad.to_local() - want).abs().max()))
    return err


def peak_mib(step) -> float:
    """Peak of the bytes allocated during one ``step`` minus those freed (MiB), from
    the profiler's allocation events: what the step needs on top of what it started with."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()  # start from a clean heap: nothing of an earlier step left for the collector
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak / 2**20


def measure(steps: dict[str, Callable[[], None]], n: int) -> dict[str, tuple[float, float]]:
    """Median step time (s) and peak memory of one extra profiled step (MiB) per method;
    the methods' steps alternate, so that a noisy machine slows them alike."""
    times: dict[str, list[float]] = {k: [] for k in steps}
    for step in steps.values():
        step()  # warm-up
    for _ in range(n):
        for name, step in steps.items():
            gc.collect()  # outside the timed region, for every method alike
            dist.barrier()
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    dist.barrier()
    return {name: (statistics.median(times[name]), peak_mib(step)) for name, step in steps.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--local-batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--max-norm", type=float, default=1.0)
    parser.add_argument("--bf16", action="store_true", help="MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=f32)")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    err = check_against_one_process(args, rank, world)
    ids, y = make_data(args.local_batch, args, seed=rank)

    def runner(private: bool):
        model = shard(make_model(args), args.bf16)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            if private:
                with per_sample_grads(model, one_backward=True, materialize=False) as g:
                    loss_of(model, ids, y).backward()
                g.clip_(args.max_norm)
            else:
                loss_of(model, ids, y).backward()
            opt.step()

        return step

    got = measure({"plain": runner(False), "ours": runner(True)}, args.steps)
    (plain_t, plain_m), (ours_t, ours_m) = got["plain"], got["ours"]
    errs = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(errs, torch.tensor([err], dtype=torch.float64))
    if rank == 0:
        n_params = sum(p.numel() for p in make_model(args).parameters())
        print(f"{world} ranks, gloo, 1 thread each; GPT {args.blocks}x{args.width}, seq {args.seq}, vocab {args.vocab} "
              f"({n_params / 1e6:.2f}M parameters), local batch {args.local_batch}{', bf16 params' if args.bf16 else ''}")
        print(f"max |clipped p.grad shard - one process| over ranks: {max(float(e) for e in errs):.2e}")
        print("| training step | time | vs plain FSDP | peak memory of a step, per rank |")
        print("| --- | --- | --- | --- |")
        print(f"| plain FSDP2 (no clipping) | {plain_t * 1e3:.1f} ms | 1.00x | {plain_m:.1f} MiB |")
        print(f"| per_sample_grads(one_backward=True, materialize=False) + clip_ | {ours_t * 1e3:.1f} ms | {ours_t / plain_t:.2f}x | {ours_m:.1f} MiB |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
