"""FSDP2 (``fully_shard``): real gloo processes on localhost. After ``clip_`` every
rank's ``p.grad`` shard equals the same shard of what one process computes with
the naive per-sample loop and clipping on the concatenated batch (float64).

The model is a small transformer (token and position embeddings, pre-norm
blocks of attention built from Linear layers and an MLP, final norm, head),
``fully_shard`` on every block and on the root. Dimensions are chosen so that
shards are uneven (11 and 5 rows over 2 and 4 ranks: the last rank's shard of
the position table is empty over 4). The reference never touches FSDP or our
DDP path: ``tests.reference.naive`` on an unsharded copy.
"""

from __future__ import annotations

import os
import sys
import traceback

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.spawn import spawn

pytestmark = pytest.mark.backward_mode("one")  # FSDP2 needs one_backward=True (the default mode is refused, tested)

TIMEOUT_S = 150
V, D, T = 11, 8, 5
CLIP = 0.5
F64 = {"rtol": 1e-9, "atol": 1e-12}


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.up, self.down = nn.Linear(D, 3 * D), nn.Linear(3 * D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        att = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2) / D**0.5, dim=-1)
        x = x + self.o(att @ self.v(h))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class LoRA(nn.Module):
    """A frozen base Linear plus a trainable low-rank update (as peft's LoRA)."""

    def __init__(self, base: nn.Linear, rank: int = 2) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.a = nn.Linear(base.in_features, rank, bias=False)
        self.b = nn.Linear(rank, base.out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.b(self.a(x))


class Net(nn.Module):
    def __init__(self, blocks: int = 2) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(V, D), nn.Embedding(T, D)
        self.blocks = nn.ModuleList([Block() for _ in range(blocks)])
        self.ln, self.head = nn.LayerNorm(D), nn.Linear(D, V)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def make(dtype: torch.dtype, lora: bool = False) -> Net:
    torch.manual_seed(0)
    net = Net()
    if lora:
        net.requires_grad_(False)
        for block in net.blocks:
            for name in ("q", "v", "up"):
                setattr(block, name, LoRA(getattr(block, name)))
    return net.to(dtype)


def loss_fn(reduction: str):
    """Cross-entropy over every token: sample n's own loss is the mean ("mean") or the
    sum ("sum") over its tokens. bf16 logits are upcast, as a training loop would."""

    def loss(m: nn.Module, ids: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = m(ids).reshape(-1, V)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return F.cross_entropy(logits, y.reshape(-1), reduction=reduction)

    return loss


def data(total: int, seed: int = 7):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (total, T), generator=gen), torch.randint(0, V, (total, T), generator=gen)


def reference_clipped(model: nn.Module, ids, y, reduction: str, max_norm: float):
    """Single process, float64: the naive per-sample loop and clipping on the whole batch."""
    from tests import reference

    per = reference.naive(model, loss_fn(reduction), ids, y)
    clipped, _ = reference.clipped(per, max_norm, reduction)
    return clipped, reference.norms(per)


def shard_of(full: torch.Tensor, p) -> torch.Tensor:
    """This rank's part of ``full`` under ``p``'s DTensor placements (DTensor's own arithmetic)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return full[tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True))]


def sharded(net: Net, mp_policy=None, placement=None) -> Net:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw = {"mp_policy": mp_policy or MixedPrecisionPolicy()}
    if placement is not None:
        kw["shard_placement_fn"] = placement
    for block in net.blocks:
        fully_shard(block, **kw)
    fully_shard(net, **kw)
    return net


def compare(net: Net, want: dict, tol: dict) -> None:
    """Every rank's shard against the reference's. bf16 compute (``tol["rel"]``): the
    shard's error norm within ``rel`` of the parameter's gradient norm, or of 1e-2 of
    the model's largest one (a gradient that is zero in exact arithmetic, as the key
    bias's under softmax, is bf16 rounding noise)."""
    top = max(float(t.norm()) for t in want.values())
    for k, p in net.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, k
            continue
        got = p.grad.to_local()
        ref = shard_of(want[k], p).to(got.dtype)
        if "rel" in tol:  # bf16 compute: relative to the parameter's largest entry
            err = float((got - ref).norm())
            bound = tol["rel"] * max(float(want[k].norm()), 1e-2 * top)
            assert err <= bound, (k, err, bound)
        else:
            torch.testing.assert_close(got, ref, **tol, msg=lambda m, k=k: f"{k}: {m}")


def _cases(world: int, quick: bool):
    """(id, dtype, bf16 param dtype, lora, reduction, micro-batches)."""
    cases = [
        ("f64-mean", torch.float64, False, False, "mean", 1),
        ("f64-sum-accum", torch.float64, False, False, "sum", 2),
        ("lora-mean", torch.float64, False, True, "mean", 1),
        ("bf16-mean", torch.float32, True, False, "mean", 1),
    ]
    if quick:
        return cases[:1]
    return cases + [("f64-mean-accum", torch.float64, False, False, "mean", 2), ("bf16-lora-sum", torch.float32, True, True, "sum", 1)]


def run_clip_cases(rank: int, world: int, sizes: list[int], quick: bool = False) -> int:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from gradhooks import per_sample_grads

    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    checked = 0
    for _, dtype, bf16, lora, reduction, micro in _cases(world, quick):
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
        net = sharded(make(dtype, lora), policy)
        ref_net = make(dtype, lora)
        if bf16:  # the reference computes with the weights FSDP casts to: bf16-rounded, then float64
            ref_net = ref_net.to(torch.bfloat16)
        ref_net = ref_net.double()
        ids, y = data(sum(sizes) * micro)
        want: dict = {}
        for m in range(micro):
            off = m * sum(sizes)
            with per_sample_grads(net, loss_reduction=reduction, materialize=False, one_backward=True) as g:
                loss_fn(reduction)(net, ids[off + lo : off + hi], y[off + lo : off + hi]).backward()
            assert g.batch_size == hi - lo
            assert list(g) == [k for k, p in net.named_parameters() if p.requires_grad]
            ref, ref_norms = reference_clipped(ref_net, ids[off : off + sum(sizes)], y[off : off + sum(sizes)], reduction, CLIP)
            want = ref if not want else {k: want[k] + ref[k] for k in want}
            if bf16:
                torch.testing.assert_close(g.norms().double(), ref_norms[lo:hi], rtol=3e-2, atol=1e-3)
            else:
                torch.testing.assert_close(g.norms(), ref_norms[lo:hi], **F64)
            g.clip_(CLIP)
            g.clip_(CLIP)  # idempotent, still collective
        compare(net, want, {"rel": 6e-2} if bf16 else F64)
        checked += 1
    return checked


def run_privatize(rank: int, world: int, sizes: list[int]) -> int:
    """DP-SGD: noise drawn once (rank 0's generator, one randn(p.shape) per parameter in
    key order, as one process draws it), each rank gets its shard of it."""
    from gradhooks import per_sample_grads
    from gradhooks.privacy import privatize_

    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    sigma, expected = 0.7, 4.5
    net = sharded(make(torch.float64))
    ids, y = data(sum(sizes), seed=3)
    with per_sample_grads(net, loss_reduction="sum", materialize=False, one_backward=True) as g:
        loss_fn("sum")(net, ids[lo:hi], y[lo:hi]).backward()
    gen = torch.Generator().manual_seed(11 + rank)  # only rank 0's is used
    privatize_(g, max_norm=CLIP, noise_multiplier=sigma, expected_batch_size=expected, generator=gen)
    want, _ = reference_clipped(make(torch.float64), ids, y, "sum", CLIP)
    ref_gen = torch.Generator().manual_seed(11)
    for k, p in net.named_parameters():
        z = torch.randn(p.shape, generator=ref_gen, dtype=torch.float64) * sigma * CLIP
        torch.testing.assert_close(p.grad.to_local(), shard_of((want[k] + z) / expected, p), **F64)
    return 1


def run_shard_dim1(rank: int, world: int, sizes: list[int]) -> int:
    """``shard_placement_fn``: matrices sharded along dimension 1 (evenly)."""
    from torch.distributed.tensor import Shard

    from gradhooks import per_sample_grads

    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    net = sharded(make(torch.float64), placement=lambda p: Shard(1) if p.ndim == 2 and p.shape[1] % world == 0 else None)
    assert any(p.placements[0].dim == 1 for p in net.parameters())
    ids, y = data(sum(sizes), seed=5)
    with per_sample_grads(net, materialize=False, one_backward=True) as g:
        loss_fn("mean")(net, ids[lo:hi], y[lo:hi]).backward()
    g.clip_(CLIP)
    want, _ = reference_clipped(make(torch.float64), ids, y, "mean", CLIP)
    compare(net, want, F64)
    return 1


class CheckpointedNet(Net):
    """Every block under ``torch.utils.checkpoint`` (recomputed in backward, FSDP
    all-gathering its parameters again for the recomputation)."""

    reentrant = False

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=self.reentrant)
        return self.head(self.ln(x))


def clip_and_compare(net: Net, ids, y, lo: int, hi: int, want: dict, norms) -> None:
    """This rank's slice through the one-backward context: norms, then the clipped
    shards, against the single-process reference."""
    from gradhooks import per_sample_grads

    with per_sample_grads(net, materialize=False, one_backward=True) as g:
        loss_fn("mean")(net, ids[lo:hi], y[lo:hi]).backward()
    torch.testing.assert_close(g.norms(), norms[lo:hi], **F64)
    g.clip_(CLIP)
    compare(net, want, F64)


def run_checkpoint(rank: int, world: int, sizes: list[int]) -> int:

    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    ids, y = data(sum(sizes), seed=9)
    want, norms = reference_clipped(make(torch.float64), ids, y, "mean", CLIP)
    for reentrant in (False, True):
        torch.manual_seed(0)
        net = CheckpointedNet().double()
        net.reentrant = reentrant
        clip_and_compare(sharded(net), ids, y, lo, hi, want, norms)
    return 1


class GemmaNorm(nn.Module):
    """RMSNorm scaled by ``1 + weight`` (Gemma): a use through a non-view op."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)


class MergedLoRA(nn.Module):
    """LoRA merged into the weight, ``F.linear(x, W + B @ A)``: adapters used through a
    product with each other and a frozen (sharded) base weight."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.a = nn.Parameter(torch.randn(2, base.in_features) * 0.3)
        self.b = nn.Parameter(torch.randn(base.out_features, 2) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.base.weight + self.b @ self.a, self.base.bias)


def run_derived(rank: int, world: int, sizes: list[int]) -> int:
    """Uses through non-view ops, whose per-sample gradients are replayed at exit with
    the parameters' values (all-gathered, since FSDP freed the unsharded copies)."""

    def build() -> Net:
        net = make(torch.float64)
        torch.manual_seed(1)
        for block in net.blocks:
            block.ln1, block.up = GemmaNorm(D).double(), MergedLoRA(block.up).double()
        return net

    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    ids, y = data(sum(sizes), seed=13)
    want, norms = reference_clipped(build(), ids, y, "mean", CLIP)
    clip_and_compare(sharded(build()), ids, y, lo, hi, want, norms)
    return 1


class ConvRNN(nn.Module):
    """Conv1d + GroupNorm + LSTM + Linear, each of the first two sharded on its own:
    rules that read their geometry (conv) and replay values (the recurrence)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv1d(3, 6, 3, padding=1), nn.GroupNorm(2, 6))
        self.rnn = nn.LSTM(6, 5, batch_first=True)
        self.head = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(F.relu(self.conv(x)).transpose(1, 2))
        return self.head(out[:, -1])


def run_conv_rnn(rank: int, world: int, sizes: list[int]) -> int:
    from torch.distributed.fsdp import fully_shard

    from gradhooks import per_sample_grads
    from tests import reference

    def build() -> ConvRNN:
        torch.manual_seed(0)
        return ConvRNN().double()

    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(sum(sizes), 3, 7, generator=gen, dtype=torch.float64), torch.randint(0, 4, (sum(sizes),), generator=gen)
    loss = lambda m, x, y: F.cross_entropy(m(x), y)  # noqa: E731
    per = reference.naive(build(), loss, x, y)
    want, _ = reference.clipped(per, CLIP, "mean")
    net = build()
    for m in (net.conv, net.rnn, net):
        fully_shard(m)
    with per_sample_grads(net, materialize=False, one_backward=True) as g:
        loss(net, x[lo:hi], y[lo:hi]).backward()
    torch.testing.assert_close(g.norms(), reference.norms(per)[lo:hi], **F64)
    g.clip_(CLIP)
    for k, p in net.named_parameters():
        torch.testing.assert_close(p.grad.to_local(), shard_of(want[k], p), **F64)
    return 1


def _raises(exc: type[BaseException], words: tuple[str, ...], fn) -> None:
    try:
        fn()
    except exc as err:
        assert all(w in str(err) for w in words), str(err)
    else:
        raise AssertionError(f"expected {exc.__name__} mentioning {words}")


def run_refusals(rank: int, world: int, sizes: list[int]) -> int:
    """Set-ups that cannot be handled exactly are refused on entry with the reason;
    uses no hook sees are found exactly; a non-finite norm anywhere stops every rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    from gradhooks import GradhooksError, UnseenGradientError, UnsupportedModuleError, per_sample_grads

    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    net = sharded(make(torch.float64))
    ids, y = data(sum(sizes))
    enter = lambda **kw: per_sample_grads(net, **kw).__enter__()  # noqa: E731
    _raises(UnsupportedModuleError, ("one_backward=True",), lambda: enter(materialize=False, one_backward=False))
    _raises(UnsupportedModuleError, ("materialize=False",), lambda: enter(materialize=True, one_backward=True))
    fsdp1 = FullyShardedDataParallel(nn.Linear(4, 4).double(), device_id=torch.device("cpu"))
    _raises(UnsupportedModuleError, ("FSDP1", "fully_shard"), lambda: per_sample_grads(fsdp1, one_backward=True, materialize=False).__enter__())
    tp = nn.Sequential(nn.Linear(4, 4))
    parallelize_module(tp, init_device_mesh("cpu", (world,)), {"0": ColwiseParallel()})
    _raises(UnsupportedModuleError, ("tensor parallelism",), lambda: per_sample_grads(tp, one_backward=True, materialize=False).__enter__())
    half = make(torch.float64)
    for block in half.blocks:
        fully_shard(block)
    _raises(UnsupportedModuleError, ("not managed by FSDP2", "head.weight"), lambda: per_sample_grads(half, one_backward=True, materialize=False).__enter__())
    # a penalty on the root's (unsharded) head weight, and one on a block's local shard
    for penalty in (lambda: net.head.weight.pow(2).sum(), lambda: net.blocks[0].up.weight.to_local().pow(2).sum()):
        net.zero_grad(set_to_none=True)

        def step(penalty=penalty) -> None:
            with per_sample_grads(net, materialize=False, one_backward=True):
                (loss_fn("mean")(net, ids[lo:hi], y[lo:hi]) + 1e-3 * penalty()).backward()

        _raises(UnseenGradientError, ("outside their captured uses",), step)
    # rank 1's non-finite sample: every rank raises, nothing changes
    net.zero_grad(set_to_none=True)
    emb = net.tok.weight
    with per_sample_grads(net, materialize=False, one_backward=True) as g:
        out = net(ids[lo:hi])
        scale = torch.ones(hi - lo, 1, 1, dtype=out.dtype)
        if rank == 1:
            scale[0] = float("inf")
        F.cross_entropy((out * scale).reshape(-1, V), y[lo:hi].reshape(-1)).backward()
    _raises(FloatingPointError, ("not finite",), lambda: g.clip_(CLIP))
    assert emb.grad is None and all(p.grad is None for p in net.parameters())
    assert isinstance(UnsupportedModuleError("x"), GradhooksError)
    return 1


PARTS = {
    "clip": lambda rank, world, sizes: run_clip_cases(rank, world, sizes, quick=False),
    "clip-quick": lambda rank, world, sizes: run_clip_cases(rank, world, sizes, quick=True),
    "privatize": run_privatize,
    "shard-dim1": run_shard_dim1,
    "checkpoint": run_checkpoint,
    "refusals": run_refusals,
    "derived": run_derived,
    "conv-rnn": run_conv_rnn,
}


Plan = list[tuple[list[int], tuple[str, ...]]]  # (local batch sizes, parts run with them)


def _worker(rank: int, world: int, init: str, plan: Plan, out) -> None:
    import torch.distributed as dist

    try:
        sys.path.insert(0, os.getcwd())
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
        out.put((rank, "ok", sum(PARTS[part](rank, world, sizes) for sizes, parts in plan for part in parts)))
    except BaseException:
        out.put((rank, "fail", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _spawn(tmp_path, plan: Plan) -> list:
    world = len(plan[0][0])
    return spawn(world, _worker, world, f"file://{tmp_path / 'rendezvous'}", plan, timeout_s=TIMEOUT_S)


# Process start-up and FSDP's first step cost seconds: each world size is one spawn.
RUNS: dict[str, Plan] = {
    "2-ranks": [
        ([3, 3], ("clip", "shard-dim1", "conv-rnn", "refusals")),
        ([2, 5], ("clip", "privatize", "checkpoint", "derived")),
    ],
    "4-ranks": [([1, 3, 2, 2], ("clip-quick",))],  # one rank's shard of the position table is empty
}


@pytest.mark.parametrize("run", list(RUNS))
def test_fsdp_clip_matches_single_process(tmp_path, run):
    plan = RUNS[run]
    results = _spawn(tmp_path, plan)
    want = sum(len(_cases(len(sizes), part == "clip-quick")) if part.startswith("clip") else 1 for sizes, parts in plan for part in parts)
    assert [r[2] for r in sorted(results)] == [want] * len(plan[0][0])
