"""DistributedDataParallel: two real gloo processes on localhost; after clip_ every
rank holds what one process computes with per-sample clipping on the
concatenated batch. Started by the test, bounded in time."""

from __future__ import annotations

import os
import sys
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from tests.spawn import spawn

WORLD = 2
TIMEOUT_S = 120
TOL = {"rtol": 1e-9, "atol": 1e-12}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 3)).double()


def _data(total: int):
    gen = torch.Generator().manual_seed(7)
    return torch.randn(total, 4, dtype=torch.float64, generator=gen), torch.randint(0, 3, (total,), generator=gen)


def _loss(reduction):
    return lambda m, x, y: F.cross_entropy(m(x), y, reduction=reduction)


def _expected(x, y, per_micro, reduction, max_norm):
    """Single-process reference: per-sample clipping on each concatenated micro-batch,
    summed over micro-batches; and the per-sample norms of the first one."""
    from tests import reference

    model = _model()
    want, first_norms = None, None
    for m in range(x.shape[0] // per_micro):
        xs, ys = x[m * per_micro : (m + 1) * per_micro], y[m * per_micro : (m + 1) * per_micro]
        ref = reference.naive(model, _loss(reduction), xs, ys)
        clipped, _ = reference.clipped(ref, max_norm, reduction)
        want = clipped if want is None else {k: want[k] + clipped[k] for k in want}
        if first_norms is None:
            first_norms = reference.norms(ref)
    return want, first_norms


def _worker(rank: int, init: str, sizes: list[int], one_backward: bool, out: mp.Queue) -> None:
    try:
        sys.path.insert(0, os.getcwd())
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
        from torch.nn.parallel import DistributedDataParallel as DDP

        from gradhooks import GradhooksError
        from gradhooks import per_sample_grads as psg

        def per_sample_grads(*a, **kw):
            return psg(*a, one_backward=one_backward, **kw)

        lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
        checked = 0
        for reduction in ("mean", "sum"):
            for materialize in (True, False):
                for sync in (False, True):
                    for micro in (1, 2):
                        ddp = DDP(_model())
                        x, y = _data(sum(sizes) * micro)
                        if sync and one_backward:
                            # DDP's reducer would wait for gradients this mode never computes.
                            try:
                                with per_sample_grads(ddp, loss_reduction=reduction):
                                    _loss(reduction)(ddp, x[lo:hi], y[lo:hi]).backward()
                                raise AssertionError("one_backward without no_sync() should be refused")
                            except GradhooksError as err:
                                assert "no_sync" in str(err), str(err)
                            checked += 1
                            continue
                        for m in range(micro):
                            off = m * sum(sizes)
                            xs, ys = x[off + lo : off + hi], y[off + lo : off + hi]
                            ctx = ddp.no_sync() if not sync else torch.enable_grad()
                            with ctx, per_sample_grads(ddp, loss_reduction=reduction, materialize=materialize) as g:
                                _loss(reduction)(ddp, xs, ys).backward()
                            assert g.batch_size == hi - lo
                            assert list(g) == [k for k, _ in ddp.named_parameters()]
                            if m == 0:
                                _, ref_norms = _expected(x, y, sum(sizes), reduction, 0.5)
                                torch.testing.assert_close(g.norms(), ref_norms[lo:hi], **TOL)
                            g.clip_(0.5)
                            g.clip_(0.5)  # idempotent, still collective
                        want, _ = _expected(x, y, sum(sizes), reduction, 0.5)
                        for k, p in ddp.module.named_parameters():
                            torch.testing.assert_close(p.grad, want[k], **TOL)
                        checked += 1
        # one rank's non-finite sample: every rank raises, nothing changes
        ddp = DDP(_model())
        x, y = _data(sum(sizes))
        xs = x[lo:hi].clone()
        if rank == 1:
            xs[0, 0] = float("nan")
        with ddp.no_sync(), per_sample_grads(ddp) as g:
            _loss("mean")(ddp, xs, y[lo:hi]).backward()
        before = [None if p.grad is None else p.grad.clone() for p in ddp.parameters()]
        try:
            g.clip_(1.0)
            raise AssertionError("clip_ should have raised")
        except FloatingPointError as err:
            assert ("sample(s) [0]" in str(err)) == (rank == 1), str(err)
        for b, p in zip(before, ddp.parameters(), strict=False):
            if b is None:
                assert p.grad is None
            else:
                torch.testing.assert_close(p.grad, b, rtol=0, atol=0, equal_nan=True)
        # DP-SGD: clipping + noise drawn once (rank 0's generator), global divisor
        from gradhooks.privacy import privatize_

        sigma, clip, expected = 0.7, 0.5, 4.5
        for reduction in ("mean", "sum"):
            for materialize in (True, False):
                ddp = DDP(_model())
                x, y = _data(sum(sizes))
                with ddp.no_sync(), per_sample_grads(ddp, loss_reduction=reduction, materialize=materialize) as g:
                    _loss(reduction)(ddp, x[lo:hi], y[lo:hi]).backward()
                gen = torch.Generator().manual_seed(11 + rank)  # only rank 0's is used
                privatize_(g, max_norm=clip, noise_multiplier=sigma, expected_batch_size=expected, generator=gen)
                want, _ = _expected(x, y, sum(sizes), "sum", clip)
                ref_gen = torch.Generator().manual_seed(11)
                for k, p in ddp.module.named_parameters():
                    z = torch.randn(p.shape, generator=ref_gen, dtype=torch.float64) * sigma * clip
                    torch.testing.assert_close(p.grad, (want[k] + z) / expected, **TOL)
                checked += 1
        out.put((rank, "ok", checked))
    except BaseException:
        out.put((rank, "fail", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _float32_sync_worker(rank: int, init: str, out: mp.Queue) -> None:
    """DDP in sync mode (default backward mode), float32, a 256-wide layer, several
    SGD steps: the all-reduced p.grad agrees with the ranks' average account (no
    false alarm from rounding), and a weight penalty on one rank is still found."""
    try:
        sys.path.insert(0, os.getcwd())
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
        from torch.nn.parallel import DistributedDataParallel as DDP

        from gradhooks import UnseenGradientError, per_sample_grads

        torch.manual_seed(0)
        ddp = DDP(nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 1)))
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
        gen = torch.Generator().manual_seed(rank)
        x, y = torch.randn(128, 64, generator=gen), torch.randn(128, 1, generator=gen)
        for _ in range(4):
            opt.zero_grad(set_to_none=True)
            with per_sample_grads(ddp) as g:
                F.mse_loss(ddp(x), y).backward()
            g.clip_(1.0)
            opt.step()
        opt.zero_grad(set_to_none=True)
        try:
            with per_sample_grads(ddp):
                w = ddp.module[2].weight
                (F.mse_loss(ddp(x), y) + (1e-3 * w.square().sum() if rank == 1 else 0.0)).backward()
            raise AssertionError("a penalty on one rank should raise UnseenGradientError")
        except UnseenGradientError as err:
            assert "2.weight" in str(err), str(err)
        out.put((rank, "ok", 1))
    except BaseException:
        out.put((rank, "fail", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.backward_mode("default")
def test_ddp_sync_mode_float32_steps_raise_no_false_alarm(tmp_path, backward_mode):
    spawn(WORLD, _float32_sync_worker, f"file://{tmp_path / 'rendezvous'}", timeout_s=TIMEOUT_S)


@pytest.mark.parametrize("sizes", [[3, 3], [2, 5]], ids=["equal", "unequal"])
def test_ddp_clip_matches_single_process(tmp_path, sizes, backward_mode):
    results = spawn(WORLD, _worker, f"file://{tmp_path / 'rendezvous'}", sizes, backward_mode == "one", timeout_s=TIMEOUT_S)
    assert all(r[2] == 20 for r in results)

