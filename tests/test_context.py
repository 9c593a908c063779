"""Lifecycle of the per_sample_grads context: what gets hooks, what is recorded,
what is left behind, and every error of the README's error table (except clip_'s, in
test_result.py)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradhooks
from gradhooks import PerSampleGrads, UnsupportedModuleError, per_sample_grads
from tests import reference
from tests.check import check_model
from tests.hygiene import assert_clean, snapshot

TOL = {"rtol": 1e-9, "atol": 1e-12}


class Custom(nn.Module):
    """A user module with its own parameter and no rule: handled by its use."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return x * self.scale


class Unruled(nn.Module):
    """A parameter used through an op with no per-sample rule (a transposed conv)."""

    def __init__(self) -> None:
        super().__init__()
        self.centers = nn.Parameter(torch.randn(1, 1, 1))

    def forward(self, x):
        return F.conv_transpose1d(x.unsqueeze(1), self.centers.to(x.dtype)).squeeze(1)


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 3)).double()


def data(n=6):
    torch.manual_seed(1)
    return torch.randn(n, 4, dtype=torch.float64), torch.randint(0, 3, (n,))


def step(model, x, y, reduction="mean"):
    F.cross_entropy(model(x), y, reduction=reduction).backward()


# -- hygiene ---------------------------------------------------------------------


def test_nothing_left_after_normal_exit():
    model = net()
    before = snapshot(model)
    x, y = data()
    with per_sample_grads(model) as g:
        assert model._forward_hooks, "hooks are on inside the context"
        step(model, x, y)
    assert_clean(model, before)
    assert g["0.weight"].shape == (6, 5, 4)


@pytest.mark.parametrize("materialize", [True, False])
def test_nothing_left_after_exception_inside(materialize):
    model = net()
    before = snapshot(model)
    x, y = data()
    err = KeyError("boom")
    with pytest.raises(KeyError) as info:
        with per_sample_grads(model, materialize=materialize):
            step(model, x, y)
            raise err
    assert info.value is err, "the exception propagates unchanged"
    assert_clean(model, before)


def test_nothing_left_after_error_at_exit():
    model = net()
    before = snapshot(model)
    x, y = data()
    with pytest.raises(RuntimeError):
        with per_sample_grads(model):
            loss = F.cross_entropy(model(x), y) + 1e-2 * model[0].weight.square().sum()
            loss.backward()
    assert_clean(model, before)


def test_nothing_left_after_refusal_on_entry():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))  # training mode
    before = snapshot(model)
    with pytest.raises(UnsupportedModuleError):
        with per_sample_grads(model):
            pass
    assert_clean(model, before)


def test_nothing_left_after_refusal_at_forward():
    model = nn.Sequential(nn.Linear(4, 4), Unruled()).double()
    before = snapshot(model)
    with pytest.raises(UnsupportedModuleError):
        with per_sample_grads(model):
            model(torch.randn(3, 4, dtype=torch.float64))
    assert_clean(model, before)


def test_model_outputs_unchanged_inside():
    model = net()
    x, _ = data()
    want = model(x.clone())
    with per_sample_grads(model):
        got = model(x.clone())
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.backward_mode("default")
def test_hooks_firing_after_exit_do_nothing():
    """Graph built inside, backward outside: the late hooks are inert."""
    model = net()
    x, y = data()
    with per_sample_grads(model) as g:
        loss = F.cross_entropy(model(x), y)
    loss.backward()  # p.grad is filled as usual
    assert model[0].weight.grad is not None
    with pytest.raises(RuntimeError, match="no backward pass ran"):
        g.norms()


# -- what gets hooks -------------------------------------------------------------


def test_frozen_parameters_are_ignored():
    model = net()
    model[0].weight.requires_grad_(False)
    x, y = data()
    with per_sample_grads(model) as g:
        step(model, x, y)
    assert list(g) == ["0.bias", "2.weight", "2.bias"]


def test_strict_names_every_unsupported_module_at_the_first_forward():
    model = nn.Sequential(nn.Linear(4, 4), Unruled(), nn.Sequential(nn.Linear(4, 4), Unruled())).double()
    with pytest.raises(UnsupportedModuleError) as info:
        with per_sample_grads(model):
            model(torch.randn(3, 4, dtype=torch.float64))
    msg = str(info.value)
    assert isinstance(info.value, TypeError)
    assert "'1' (Unruled)" in msg and "'2.1' (Unruled)" in msg and "conv_transpose1d" in msg
    assert "fallback=True" in msg


def test_module_without_rule_is_handled_by_its_use():
    make = lambda: nn.Sequential(nn.Linear(4, 4), Custom(), nn.Sequential(Custom(), nn.Linear(4, 3)))  # noqa: E731
    x, y = data()
    check_model(make, lambda m, a, b: F.cross_entropy(m(a), b), (x, y), "mean")


@pytest.mark.backward_mode("default")
def test_strict_false_skips_with_one_warning():
    model = nn.Sequential(nn.Linear(4, 4), Unruled(), nn.Linear(4, 3)).double()
    x, y = data()
    model[1].centers.grad = torch.full((1, 1, 1), 7.0, dtype=torch.float64)
    with pytest.warns(UserWarning) as record:
        with per_sample_grads(model, strict=False) as g:
            step(model, x, y)
    ours = [w for w in record if "strict=False" in str(w.message)]
    assert len(ours) == 1 and "'1' (Unruled)" in str(ours[0].message)
    assert list(g) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    skipped_grad = model[1].centers.grad.clone()
    g.clip_(0.1)
    torch.testing.assert_close(model[1].centers.grad, skipped_grad, rtol=0, atol=0)
    ref = reference.naive(model, lambda m, x, y: F.cross_entropy(m(x), y), x, y)
    torch.testing.assert_close(g["0.weight"], ref["0.weight"], **TOL)


def test_eval_mode_changes_nothing():
    model = net().eval()
    x, y = data()
    with per_sample_grads(model) as g:
        step(model, x, y)
    ref = reference.naive(model, lambda m, x, y: F.cross_entropy(m(x), y), x, y)
    for k in ref:
        torch.testing.assert_close(g[k], ref[k], **TOL)


# -- what is recorded ------------------------------------------------------------


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_no_grad_forwards_are_not_recorded(mode):
    model = net()
    x, y = data()
    ctx = torch.no_grad if mode == "no_grad" else torch.inference_mode
    with per_sample_grads(model, materialize=False) as g:
        with ctx():
            model(torch.randn(11, 4, dtype=torch.float64))  # another batch size: ignored
        step(model, x, y)
        with ctx():
            model(torch.randn(3, 4, dtype=torch.float64))
    assert g.batch_size == 6  # a recorded batch of 11 or 3 would be a batch-size error
    ref = reference.naive(model, lambda m, x, y: F.cross_entropy(m(x), y), x, y)
    torch.testing.assert_close(g.norms(), reference.norms(ref), **TOL)


def test_two_backward_calls_add_up():
    model = net()
    x, y = data()
    z = torch.randn(6, 3, dtype=torch.float64)
    with per_sample_grads(model) as g:
        out = model(x)
        F.cross_entropy(out, y).backward(retain_graph=True)
        F.mse_loss(out, z).backward()

    def both(m, x, y, z):
        o = m(x)
        return F.cross_entropy(o, y) + F.mse_loss(o, z)

    ref = reference.naive(model, both, x, y, z)
    for k in ref:
        torch.testing.assert_close(g[k], ref[k], **TOL)
        torch.testing.assert_close(g[k].mean(0), dict(model.named_parameters())[k].grad, **TOL)


def test_accumulation_before_the_context_is_kept_apart():
    model = net()
    x, y = data()
    step(model, x[:3], y[:3])  # a micro-batch outside the context
    prior = {k: p.grad.clone() for k, p in model.named_parameters()}
    with per_sample_grads(model) as g:
        step(model, x, y)
    ref = reference.naive(model, lambda m, x, y: F.cross_entropy(m(x), y), x, y)
    for k, p in model.named_parameters():
        torch.testing.assert_close(g[k], ref[k], **TOL)
        torch.testing.assert_close(p.grad, prior[k] + ref[k].mean(0), **TOL)


# -- errors ----------------------------------------------------------------------


def test_invalid_loss_reduction_is_a_value_error_at_the_call():
    with pytest.raises(ValueError, match="'mean' or 'sum'"):
        per_sample_grads(net(), loss_reduction="none")


def test_non_module_is_a_type_error():
    with pytest.raises(TypeError, match="nn.Module"):
        per_sample_grads(lambda x: x)  # type: ignore[arg-type]


def test_same_model_twice_is_refused_on_entry():
    model = net()
    with per_sample_grads(model):
        with pytest.raises(RuntimeError, match="already inside"):
            with per_sample_grads(model):
                pass
        with pytest.raises(RuntimeError, match="already inside"):
            with per_sample_grads(model[0]):
                pass


def test_a_context_object_is_single_use():
    model = net()
    x, y = data()
    ctx = per_sample_grads(model)
    with ctx:
        step(model, x, y)
    with pytest.raises(RuntimeError, match="already entered"):
        with ctx:
            pass


class BroadcastLinear(nn.Module):
    """A Linear applied to a batch-independent tensor, added to the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.shared = nn.Linear(4, 3)
        self.register_buffer("const", torch.ones(1, 4))

    def forward(self, x):
        return self.fc(x) + self.shared(self.const)


def test_batch_independent_output_meets_the_batch():
    """``shared(const)`` does not depend on the batch: its per-sample gradient is
    taken where it is added to the batch, each sample its own share."""
    x, y = data()
    check_model(lambda: BroadcastLinear(), lambda m, a, b: F.cross_entropy(m(a), b), (x, y), "mean")


def test_strict_false_cannot_skip_in_one_backward_mode():
    model = nn.Sequential(nn.Linear(4, 4), Unruled(), nn.Linear(4, 3)).double()
    x, y = data()
    with pytest.raises(UnsupportedModuleError, match="one_backward=True"):
        with per_sample_grads(model, strict=False, one_backward=True):
            step(model, x, y)


def test_partial_batch_is_a_batch_size_error_naming_the_module():
    class Sliced(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x[:2]).sum(0, keepdim=True).expand(x.shape[0], 3)

    model = Sliced().double()
    x, y = data()
    with pytest.raises(ValueError) as info:
        with per_sample_grads(model) as g:
            step(model, x, y)
    msg = str(info.value)
    assert "'fc' (Linear)" in msg and "batch size 6" in msg and "slice of the batch" in msg
    with pytest.raises(RuntimeError, match="raised at exit"):
        g.norms()


def test_root_called_on_two_batch_sizes():
    model = net()
    x, y = data()
    with pytest.raises(ValueError, match="different batch sizes"):
        with per_sample_grads(model):
            step(model, x, y)
            step(model, x[:2], y[:2])


@pytest.mark.parametrize("materialize", [True, False])
@pytest.mark.parametrize(
    "misuse",
    ["functional", "penalty", "other-module-reads"],
)
def test_outside_uses_exact_or_an_error_naming_the_parameter(misuse, materialize):
    torch.manual_seed(0)

    class Reads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 3)

        def forward(self, x):
            h = self.a(x)
            if misuse == "other-module-reads":
                h = h + x @ self.a.weight.T  # the parent reads a's weight
            return self.b(h)

    def loss_fn(m, x, y):
        loss = F.cross_entropy(m(x), y)
        if misuse == "functional":
            loss = loss + F.linear(x, m.a.weight).pow(2).mean()
        if misuse == "penalty":
            loss = loss + 1e-2 * m.a.weight.pow(2).sum()
        return loss

    x, y = data()
    if misuse != "penalty":
        # A use with a per-sample meaning that the tracer sees is handled exactly.
        check_model(Reads, loss_fn, (x, y), "mean", use_vmap=False)
        return
    model = Reads().double()
    with pytest.raises(RuntimeError) as info:
        with per_sample_grads(model, materialize=materialize):
            loss_fn(model, x, y).backward()
    assert "'a.weight'" in str(info.value)
    assert "'b.weight'" not in str(info.value)


@pytest.mark.backward_mode("default")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("materialize", [True, False])
def test_cancelling_bias_gradient_is_no_false_alarm(dtype, materialize):
    """The batch gradient of the bias cancels to ~0; rounding must not be flagged."""
    torch.manual_seed(0)
    model = nn.Linear(30, 1).to(dtype)
    x = torch.randn(64, 30, dtype=dtype)
    x = torch.cat([x, x])  # every sample has a twin whose gradient is opposite

    def loss_fn(m, x):
        out = m(x).squeeze(1)
        sign = torch.cat([torch.ones(64, dtype=dtype), -torch.ones(64, dtype=dtype)])
        return (sign * 1e3 * out).mean()

    with per_sample_grads(model, materialize=materialize) as g:
        loss_fn(model, x).backward()
    assert model.bias.grad.abs().max() < 1e-2  # cancelled
    assert torch.all(g.param_norms()["bias"] > 1.0)


def test_using_g_inside_the_block():
    model = net()
    x, y = data()
    with per_sample_grads(model) as g:
        step(model, x, y)
        for use in (lambda: g.norms(), lambda: g["0.weight"], lambda: g.batch_size, lambda: len(g)):
            with pytest.raises(RuntimeError, match="not exited yet"):
                use()


def test_using_g_after_exception_inside():
    model = net()
    x, y = data()
    with pytest.raises(ZeroDivisionError):
        with per_sample_grads(model) as g:
            step(model, x, y)
            _ = 1 / 0
    with pytest.raises(RuntimeError, match="exited by an exception") as info:
        g.norms()
    assert "ZeroDivisionError" in str(info.value)


def test_using_g_without_backward():
    model = net()
    x, _ = data()
    with per_sample_grads(model) as g:
        model(x)
    with pytest.raises(RuntimeError, match="no backward pass ran"):
        g.clip_(1.0)


def test_zero_grad_inside_the_block_is_explained():
    model = net()
    x, y = data()
    step(model, x, y)
    with pytest.raises(RuntimeError, match="reset inside the context"):
        with per_sample_grads(model):
            model.zero_grad()
            step(model, x, y)


@pytest.mark.backward_mode("default")
def test_autograd_grad_instead_of_backward_is_explained():
    model = net()
    x, y = data()
    with pytest.raises(RuntimeError, match="added nothing to p.grad"):
        with per_sample_grads(model):
            torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))


def test_public_surface():
    assert issubclass(gradhooks.UnsupportedModuleError, TypeError)
    assert issubclass(gradhooks.UnsupportedModuleError, gradhooks.GradhooksError)
    for name in gradhooks.__all__:
        assert hasattr(gradhooks, name)
    ctx = per_sample_grads(net())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with ctx as g:
            pass
    assert isinstance(g, PerSampleGrads)


# -- torch.compile ---------------------------------------------------------------


def test_compiled_wrapper_is_refused_with_the_remedy():
    model = net()
    compiled = torch.compile(model, backend="eager")
    before = snapshot(model)
    with pytest.raises(UnsupportedModuleError, match="_orig_mod"):
        with per_sample_grads(compiled):
            pass
    assert_clean(model, before)


def test_in_place_compiled_submodule_is_exact():
    model = net()
    x, y = data()
    model[0].compile(backend="eager")
    step(model, x, y)  # compiled before the hooks exist
    model.zero_grad()
    with per_sample_grads(model) as g:
        step(model, x, y)
    ref = reference.naive(model, lambda m, x, y: F.cross_entropy(m(x), y), x, y)
    for k in ref:
        torch.testing.assert_close(g[k], ref[k], **TOL)
