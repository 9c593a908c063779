"""gradhooks.privacy.DPSGD: every logical batch's p.grad against the naive loop plus a
replica of the noise draws; Poisson sampling with empty batches; micro-batches (one
noise draw, one accountant step); calibration and epsilon against Opacus; the loop's
refusals; frozen parameters; checkpoints through torch.load(weights_only=True)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradhooks import GradhooksError, NonFiniteNormError
from gradhooks.privacy import DPSGD, DPUsageError, PrivacyBudgetError, UncoveredParameterError
from tests.dp_reference import N_DATA, dataset, group_norm_cnn, loss_of, make, net, replay, run_and_capture

pytestmark = pytest.mark.backward_mode("one")  # DPSGD chooses one_backward=True itself

TOL = {"rtol": 1e-9, "atol": 1e-12}


@pytest.mark.parametrize("factory", [net, group_norm_cnn], ids=["mlp", "groupnorm-cnn"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("micro", [None, 2], ids=["whole", "micro2"])
def test_every_step_matches_the_naive_loop(micro, reduction, factory):
    model = factory()
    x, y = dataset()
    dp, opt = make(model, max_physical_batch_size=micro, loss_reduction=reduction)
    got, sizes = run_and_capture(dp, opt, model, x, y, epochs=2, reduction=reduction)
    want, ref = replay(factory(), x, y, L=6.0, sigma=0.9, style={"kind": "flat", "C": 0.5}, epochs=2)
    assert len(got) == len(want) == dp.steps == 2 * dp.steps_per_epoch  # one optimizer step per logical batch
    for g_step, (w_step, _) in zip(got, want, strict=True):
        for k in w_step:
            torch.testing.assert_close(g_step[k], w_step[k], **TOL)
    if micro is not None:
        assert max(sizes) <= micro and sum(sizes) == sum(n for _, n in want)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p, dict(ref.named_parameters())[k], **TOL)


def test_empty_batches_are_noise_alone_and_frozen_weights_never_move():
    """q = 0.02 on 40 examples: many batches are empty; each is still one noisy step,
    never yielded; a frozen layer stays exactly as it was (also with momentum)."""
    model = net()
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    x, y = dataset()
    dp, opt = make(model, expected_batch_size=0.8)
    got, sizes = run_and_capture(dp, opt, model, x, y, epochs=1)
    ref_model = net()
    ref_model[0].weight.requires_grad_(False)
    want, _ = replay(ref_model, x, y, L=0.8, sigma=0.9, style={"kind": "flat", "C": 0.5})
    assert len(got) == len(want) == dp.steps == 50
    assert sum(1 for _, n in want if n == 0) > 10 and 0 not in sizes
    for g_step, (w_step, _) in zip(got, want, strict=True):
        assert set(g_step) == set(w_step) == {"0.bias", "2.weight", "2.bias"}
        for k in w_step:
            torch.testing.assert_close(g_step[k], w_step[k], **TOL)
    assert torch.equal(model[0].weight, frozen) and model[0].weight.grad is None


def test_calibrated_noise_and_epsilon_are_opacus():
    accountants = pytest.importorskip("opacus.accountants")
    from opacus.accountants.utils import get_noise_multiplier

    model = net()
    x, y = dataset()
    dp, _ = make(model, noise_multiplier=None, target_epsilon=4.0, epochs=2)
    q = 6.0 / N_DATA
    assert dp.noise_multiplier == get_noise_multiplier(target_epsilon=4.0, target_delta=1e-5, sample_rate=q, steps=2 * round(1 / q))
    assert dp.epsilon() == 0.0
    for idx in dp.batches():  # the rest of the plan: 2 epochs
        with dp.step():
            loss_of("sum")(model, x[idx], y[idx]).backward()
    theirs = accountants.RDPAccountant()
    for _ in range(dp.steps):
        theirs.step(noise_multiplier=dp.noise_multiplier, sample_rate=q)
    assert dp.steps == 14 and dp.epsilon() == theirs.get_epsilon(delta=1e-5) <= 4.0
    with pytest.raises(PrivacyBudgetError, match="calibrated for target_epsilon=4"):
        next(iter(dp.batches(epochs=1)))
    assert dp.steps == 14


def test_noise_multiplier_zero_is_clipping_only_with_infinite_epsilon():
    model = net()
    x, y = dataset()
    dp, opt = make(model, noise_multiplier=0.0)
    got, _ = run_and_capture(dp, opt, model, x, y)
    want, _ = replay(net(), x, y, L=6.0, sigma=0.0, style={"kind": "flat", "C": 0.5})
    for k in want[0][0]:
        torch.testing.assert_close(got[0][k], want[0][0][k], **TOL)
    assert dp.epsilon() == math.inf


def _loop(dp, model, x, y, misuse):
    for i, idx in enumerate(dp.batches(epochs=1)):
        if misuse == "skip" and i == 1:
            continue
        if misuse == "zero_grad" and i == 1:
            dp.optimizer.zero_grad()
        with dp.step():
            loss_of("sum")(model, x[idx], y[idx]).backward()
        if misuse == "step":
            dp.optimizer.step()


@pytest.mark.parametrize("misuse,match", [
    ("skip", "was not used in `with dp.step"),
    ("step", r"optimizer.step\(\) was called by hand"),
    ("zero_grad", "changed between two micro-batches"),
])
def test_the_loop_refuses_misuse_and_leaves_nothing_unnoised(misuse, match):
    model = net()
    x, y = dataset()
    dp, _ = make(model, max_physical_batch_size=2)
    with pytest.raises(DPUsageError, match=match) as info:
        _loop(dp, model, x, y, misuse)
    assert isinstance(info.value, GradhooksError)
    assert all(p.grad is None for p in model.parameters())
    assert dp.steps >= 1  # the abandoned batch was sampled: accounted
    with pytest.raises(DPUsageError, match="inside `for idx in dp.batches"):
        with dp.step():
            pass


def test_an_exception_in_the_step_discards_the_batch():
    model = net()
    x, y = dataset()
    dp, opt = make(model, max_physical_batch_size=2)
    before = [p.detach().clone() for p in model.parameters()]
    batches = dp.batches(epochs=1)
    next(batches)
    with pytest.raises(KeyError):
        with dp.step():
            raise KeyError("user code")
    assert all(p.grad is None for p in model.parameters()) and dp.steps == 1
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    batches.close()


def test_non_finite_norm_discards_the_batch():
    model = net()
    x, y = dataset()
    x = x.clone()
    x[:, 0] = float("nan")
    dp, _ = make(model)
    with pytest.raises(NonFiniteNormError, match="logical batch is discarded"):
        _loop(dp, model, x, y, None)
    assert all(p.grad is None for p in model.parameters())


def test_optimizer_with_a_foreign_parameter_is_refused():
    model = net()
    extra = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = torch.optim.SGD([*model.parameters(), extra], lr=0.1)
    dp = DPSGD(model, opt, dataset_size=N_DATA, expected_batch_size=6.0, delta=1e-5, max_norm=1.0, noise_multiplier=1.0)
    with pytest.raises(UncoveredParameterError, match="neither clipped nor noised"):
        next(iter(dp.batches(epochs=1)))


BAD = [
    ({"max_norm": None}, "exactly one of max_norm"),
    ({"noise_multiplier": None}, "exactly one of noise_multiplier"),
    ({"target_epsilon": 3.0}, "exactly one of noise_multiplier"),
    ({"noise_multiplier": None, "target_epsilon": 3.0}, "needs epochs"),
    ({"expected_batch_size": 50.0}, "exceeds dataset_size"),
    ({"delta": 0.0}, "delta"),
    ({"max_physical_batch_size": 0}, "max_physical_batch_size"),
    ({"loss_reduction": "none"}, "loss_reduction"),
    ({"noise_multiplier": -1.0}, "noise_multiplier"),
]


@pytest.mark.parametrize("change,match", BAD, ids=[m for _, m in BAD])
def test_argument_errors(change, match):
    with pytest.raises(ValueError, match=match):
        make(net(), **change)


def test_batches_without_a_plan_needs_epochs():
    dp, _ = make(net())
    with pytest.raises(ValueError, match="pass epochs"):
        next(iter(dp.batches()))


@pytest.mark.parametrize("micro", [None, 3])
def test_checkpoint_resumes_the_same_run(tmp_path, micro):
    """1 epoch, save (weights_only load), resume in fresh objects, 1 more epoch == 2 straight."""
    x, y = dataset()
    straight = net()
    dp, opt = make(straight, max_physical_batch_size=micro, epochs=2)
    run_and_capture(dp, opt, straight, x, y, epochs=2)
    first = net()
    dp1, opt1 = make(first, max_physical_batch_size=micro, epochs=2)
    run_and_capture(dp1, opt1, first, x, y, epochs=1)
    torch.save({"dp": dp1.state_dict(), "model": first.state_dict(), "opt": opt1.state_dict()}, tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed = net()
    resumed.load_state_dict(state["model"])
    dp2, opt2 = make(resumed, max_physical_batch_size=micro, epochs=2, sample_generator=torch.Generator(),
                     noise_generator=torch.Generator())
    opt2.load_state_dict(state["opt"])
    dp2.load_state_dict(state["dp"])
    assert dp2.steps == dp.steps_per_epoch
    for idx in dp2.batches():  # the rest of the plan
        with dp2.step():
            loss_of("sum")(resumed, x[idx], y[idx]).backward()
    assert dp2.steps == dp.steps
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    if pytest.importorskip("opacus.accountants"):
        assert dp2.epsilon() == dp.epsilon()
    with pytest.raises(ValueError, match="noise_multiplier"):
        make(net(), noise_multiplier=1.5)[0].load_state_dict(state["dp"])


def test_lora_with_peft():
    """Only the LoRA factors train; the frozen base weights never move; every step exact."""
    peft = pytest.importorskip("peft")

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(6, 16), nn.Linear(16, 3)

        def forward(self, x):
            return self.fc2(torch.tanh(self.fc1(x)))

    def lora_model():
        torch.manual_seed(0)
        m = peft.get_peft_model(MLP().double(), peft.LoraConfig(r=2, target_modules=["fc1", "fc2"], lora_dropout=0.0))
        with torch.no_grad():  # LoRA B starts at zero: make the factors generic
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.normal_(generator=torch.Generator().manual_seed(len(n)))
        return m

    model = lora_model()
    base = {k: p.detach().clone() for k, p in model.named_parameters() if not p.requires_grad}
    x, y = dataset()
    dp, opt = make(model, max_physical_batch_size=4)
    got, _ = run_and_capture(dp, opt, model, x, y)
    want, _ = replay(lora_model(), x, y, L=6.0, sigma=0.9, style={"kind": "flat", "C": 0.5})
    assert set(got[0]) == {k for k, p in model.named_parameters() if p.requires_grad} and all("lora_" in k for k in got[0])
    for g_step, (w_step, _) in zip(got, want, strict=True):
        for k in w_step:
            torch.testing.assert_close(g_step[k], w_step[k], **TOL)
    for k, p in model.named_parameters():
        if k in base:
            assert torch.equal(p, base[k])


# -- DDP: two gloo processes against one process ------------------------------

DDP_CASES = [
    pytest.param(6.0, 2, {"kind": "flat", "C": 0.5}, id="micro2"),
    pytest.param(1.5, None, {"kind": "flat", "C": 0.5}, id="small-batches"),  # a rank often has none
    pytest.param(6.0, 3, {"kind": "adaptive", "C": 0.5, "q": 0.5, "lr": 0.2, "count_std": 1.0}, id="adaptive"),
]


def _style(spec):
    from gradhooks.privacy import AdaptiveClipping

    if spec["kind"] == "adaptive":
        return {"clipping": AdaptiveClipping(spec["C"], target_quantile=spec["q"], learning_rate=spec["lr"],
                                             count_noise_std=spec["count_std"]), "max_norm": None}
    return {"max_norm": spec["C"]}


def _ddp_worker(rank, init, cases, out):
    import os
    import sys
    import traceback

    import torch.distributed as dist

    try:
        sys.path.insert(0, os.getcwd())
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
        from torch.nn.parallel import DistributedDataParallel as DDP

        x, y = dataset()
        results = []
        for L, micro, spec in cases:
            ddp = DDP(net())
            dp, _ = make(ddp, expected_batch_size=L, max_physical_batch_size=micro, **_style(spec),
                         sample_generator=torch.Generator().manual_seed(5 + 100 * rank),  # rank 0's state is used
                         noise_generator=torch.Generator().manual_seed(7 + 100 * rank))  # only rank 0 draws
            seen = 0
            for idx in dp.batches(epochs=1):
                seen += len(idx)
                with dp.step():
                    loss_of("sum")(ddp, x[idx], y[idx]).backward()
            results.append(([p.detach().tolist() for p in ddp.module.parameters()], dp.steps, seen))  # lists: no shared memory
        out.put((rank, "ok", results))
    except BaseException:
        out.put((rank, "fail", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_ddp_matches_one_process(tmp_path):
    from tests.spawn import spawn

    cases = [p.values for p in DDP_CASES]
    got = {r: (status, res) for r, status, res in spawn(2, _ddp_worker, f"file://{tmp_path / 'rdv'}", cases, timeout_s=180)}
    x, y = dataset()
    for i, (L, _, spec) in enumerate(cases):
        want, ref = replay(net(), x, y, L=L, sigma=0.9, style=dict(spec))
        params0, steps0, seen0 = got[0][1][i]
        params1, steps1, seen1 = got[1][1][i]
        assert steps0 == steps1 == len(want)
        assert seen0 + seen1 == sum(n for _, n in want)  # the union of the shards is the Poisson batch
        for a, b, r in zip(params0, params1, ref.parameters(), strict=True):
            assert a == b  # every rank holds the same model
            torch.testing.assert_close(torch.tensor(a, dtype=torch.float64), r.detach(), **TOL)
        if L == 1.5:
            assert any(n % 2 == 1 and n < 2 for _, n in want)  # some step had a rank with no example


def test_the_step_result_is_released_when_the_next_step_begins():
    """g (norms for diagnostics) stays valid after its step, and its captures are freed
    when the next step begins, so two steps' captures never coexist."""
    from gradhooks import ContextStateError

    model = net()
    x, y = dataset()
    dp, _ = make(model, max_physical_batch_size=2)
    results = []
    for idx in dp.batches(epochs=1):
        if results:
            assert results[-1][0].norms().shape == (results[-1][1],)
        with dp.step() as g:
            loss_of("sum")(model, x[idx], y[idx]).backward()
        results.append((g, len(idx)))
        if len(results) == 3:
            break
    with pytest.raises(ContextStateError, match="released this result"):
        results[0][0].norms()
    assert results[-1][0].norms().shape == (results[-1][1],)
