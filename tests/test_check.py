"""gradhooks.check_rule and gradhooks.check_attribution: they pass on correct
rules and models (the built-in rules, user rules, whole models), and each
kind of wrong math is reported by name, with the size of the error."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gradhooks
from gradhooks import Call, CheckError, Rule, check_attribution, check_rule
from gradhooks.rules.fallback import FallbackRule
from tests.hygiene import assert_clean, snapshot


class Scale(nn.Module):
    """``y = x * w``, ``x: (N, *, d)``."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(d))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.w


def _xg(calls: Sequence[Call]) -> Tensor:
    """``(N, d)``: ``sum_t x_nt * g_nt`` over the calls (the right answer)."""
    return sum((c.input * c.grad).reshape(c.grad.shape[0], -1, c.grad.shape[-1]).sum(1) for c in calls)  # type: ignore[return-value]


class ScaleRule(Rule):
    def per_sample(self, module: nn.Module, calls: Sequence[Call], names: Sequence[str]) -> dict[str, Tensor]:
        return {"w": _xg(calls)}


class GramRule(ScaleRule):
    """Its own exact norms: ``sum_{t,u} <x_t g_t, x_u g_u>``, cross terms of calls included."""

    def squared_norms(self, module: nn.Module, calls: Sequence[Call], names: Sequence[str]) -> dict[str, Tensor]:
        xg = torch.cat([(c.input * c.grad).reshape(c.grad.shape[0], -1, c.grad.shape[-1]) for c in calls], 1)
        return {"w": torch.einsum("ntd,nud->n", xg, xg)}


class ReshapeBug(ScaleRule):
    def per_sample(self, module: nn.Module, calls: Sequence[Call], names: Sequence[str]) -> dict[str, Tensor]:
        n, d = calls[0].grad.shape[0], calls[0].grad.shape[-1]
        return {"w": sum((c.input * c.grad).reshape(-1, n, d).sum(0) for c in calls)}  # type: ignore[dict-item]


class Half(ScaleRule):
    def per_sample(self, module: nn.Module, calls: Sequence[Call], names: Sequence[str]) -> dict[str, Tensor]:
        return {"w": _xg(calls) / 2}


class FirstCallOnly(ScaleRule):
    def per_sample(self, module: nn.Module, calls: Sequence[Call], names: Sequence[str]) -> dict[str, Tensor]:
        return {"w": _xg(calls[:1])}


class BadNorms(ScaleRule):
    def squared_norms(self, module: nn.Module, calls: Sequence[Call], names: Sequence[str]) -> dict[str, Tensor]:
        return {"w": 2 * _xg(calls).square().sum(1)}


class Overwrites(ScaleRule):
    """``weighted_sum_into`` must add into ``out``; this one overwrites it."""

    def weighted_sum_into(self, module, calls, names, weights, out) -> None:
        out["w"].copy_(torch.einsum("n,nd->d", weights.to(out["w"].dtype), _xg(calls)))


class BadDots(ScaleRule):
    def dots(self, module, calls, names, others) -> dict[str, Tensor]:
        return {"w": _xg(calls).abs() @ others["w"]}


class BadProbe(ScaleRule):
    def probe(self, module, calls, names, vectors) -> dict[str, Tensor]:
        return {"w": torch.zeros(vectors["w"].shape[0] and 4, vectors["w"].shape[1], dtype=torch.float64)}


class NoMagnitude(ScaleRule):
    def magnitudes(self, module, calls, names) -> dict[str, Tensor]:
        return {"w": torch.tensor(0.0)}


class InPlace(ScaleRule):
    def per_sample(self, module: nn.Module, calls: Sequence[Call], names: Sequence[str]) -> dict[str, Tensor]:
        calls[0].grad.mul_(1.0)
        return {"w": _xg(calls)}


class Raises(ScaleRule):
    def per_sample(self, module: nn.Module, calls: Sequence[Call], names: Sequence[str]) -> dict[str, Tensor]:
        return {"w": calls[7].input}


def _seq(n: int = 5) -> Tensor:
    return torch.randn(n, 3, 4)


@pytest.fixture
def registered():
    """Register a rule for ``Scale`` for one test (the instance)."""
    made: list[type[nn.Module]] = []

    def register(rule: Rule, module_type: type[nn.Module] = Scale) -> Rule:
        gradhooks.register_rule(module_type, rule=rule)
        made.append(module_type)
        return rule

    yield register
    for t in made:
        gradhooks.unregister_rule(t)


# -- check_rule passes on right rules ------------------------------------------------


@pytest.mark.parametrize("rule_cls", [ScaleRule, GramRule], ids=["per_sample-only", "own-norms"])
@pytest.mark.parametrize("x", [_seq(), torch.randn(6, 4)], ids=["seq", "flat"])
def test_right_user_rule_passes_in_every_form(registered, rule_cls, x):
    module = Scale()
    assert check_rule(rule_cls, module, x)  # the class: checked directly
    instance = registered(rule_cls())
    assert check_rule(instance, module, x)  # registered: also through per_sample_grads
    assert check_rule(Scale, module, x)
    assert check_rule(None, module, x)
    assert module.w.grad is None


BUILTINS = [
    ("linear-2d", lambda: nn.Linear(4, 3), lambda: torch.randn(5, 4)),
    ("linear-seq", lambda: nn.Linear(4, 3), lambda: torch.randn(5, 3, 4)),
    ("conv2d", lambda: nn.Conv2d(2, 3, 3, padding=1, stride=2), lambda: torch.randn(4, 2, 6, 6)),
    ("embedding", lambda: nn.Embedding(10, 3, padding_idx=0), lambda: torch.randint(0, 10, (5, 7))),
    ("layernorm", lambda: nn.LayerNorm(4), lambda: torch.randn(5, 3, 4)),
    ("groupnorm", lambda: nn.GroupNorm(2, 4), lambda: torch.randn(5, 4, 3)),
    ("lstm", lambda: nn.LSTM(4, 3, batch_first=True), lambda: torch.randn(5, 6, 4)),
]


@pytest.mark.parametrize("make, make_x", [c[1:] for c in BUILTINS], ids=[c[0] for c in BUILTINS])
def test_builtin_rules_pass(make, make_x):
    torch.manual_seed(0)
    assert check_rule(type(make()), make(), make_x())


def test_multihead_attention_with_keyword_inputs():
    torch.manual_seed(0)
    x = torch.randn(4, 5, 6)
    assert check_rule(None, nn.MultiheadAttention(6, 2, batch_first=True), (x, x, x), kwargs={"need_weights": False})


class Affine(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(4))
        self.shift = nn.Parameter(torch.randn(()))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x * self.scale + self.shift)


def test_fallback_rule_passes():
    assert check_rule(FallbackRule("'affine' (Affine)"), Affine(), _seq())


# -- check_rule names each kind of wrong math ----------------------------------------

WRONG = [
    (ReshapeBug, ["per_sample('w')", "batch sum is right"]),
    (Half, ["per_sample('w')", "batch sum off by 50%"]),
    (FirstCallOnly, ["per_sample('w')"]),
    (BadNorms, ["squared_norms('w')", "100%"]),
    (Overwrites, ["weighted_sum_into('w')"]),
    (BadDots, ["dots('w')"]),
    (BadProbe, ["probe('w')"]),
    (NoMagnitude, ["magnitudes('w')"]),
    (InPlace, ["modified its recorded inputs or output gradients in place"]),
    (Raises, ["the rule raised IndexError"]),
]


@pytest.mark.parametrize("rule_cls, words", WRONG, ids=[c[0].__name__ for c in WRONG])
def test_wrong_rule_is_named_with_the_quantity(rule_cls, words):
    torch.manual_seed(0)
    with pytest.raises(CheckError) as info:
        check_rule(rule_cls, Scale(), _seq())
    msg = str(info.value)
    assert f"check_rule({rule_cls.__name__} on Scale)" in msg
    for w in words:
        assert w in msg, (w, msg)
    if rule_cls in (BadNorms, Overwrites, BadDots, BadProbe, NoMagnitude):
        assert "per_sample(" not in msg  # only the broken method is blamed
    assert check_rule(rule_cls, Scale(), _seq(), raise_exception=False) is False


def test_calls_must_add_up():
    """A rule that reads only the first call passes with one call, not with two."""
    assert check_rule(FirstCallOnly, Scale(), _seq(), calls=1)
    with pytest.raises(CheckError):
        check_rule(FirstCallOnly, Scale(), _seq(), calls=2)


def test_registered_wrong_rule_fails_through_the_context_too(registered):
    registered(ReshapeBug())
    with pytest.raises(CheckError) as info:
        check_rule(Scale, Scale(), _seq())
    msg = str(info.value)
    assert "through per_sample_grads(materialize=False): 'w'" in msg
    assert "through per_sample_grads(materialize=True): 'w': per-sample gradients differ" in msg


@pytest.mark.parametrize("call, error, match", [
    (lambda: check_rule(None, Scale(), _seq()), ValueError, "no rule is registered for Scale"),
    (lambda: check_rule(Affine, Affine(), _seq()), ValueError, "no rule is registered for Affine"),
    (lambda: check_rule(ScaleRule, Scale(), _seq(1)), ValueError, "at least 2 samples"),
    (lambda: check_rule(ScaleRule, Scale(), _seq(), calls=0), ValueError, "calls must be a positive int"),
    (lambda: check_rule(object(), Scale(), _seq()), TypeError, "gradhooks.Rule"),
    (lambda: check_rule(ScaleRule, nn.Tanh(), _seq()), ValueError, "no trainable parameters"),
], ids=["no-rule", "no-rule-for-type", "one-sample", "calls=0", "not-a-rule", "no-parameters"])
def test_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_check_rule_leaves_the_module_alone():
    module = Scale()
    before, weights = snapshot(module), module.w.detach().clone()
    check_rule(ScaleRule, module, _seq())
    with pytest.raises(CheckError):
        check_rule(Half, module, _seq())
    assert_clean(module, before)
    assert module.w.grad is None and module.w.dtype == torch.float32
    torch.testing.assert_close(module.w.detach(), weights, rtol=0, atol=0)


# -- check_attribution ---------------------------------------------------------------


class TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(13, 8)
        self.wpe = nn.Embedding(16, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, idx: Tensor) -> Tensor:
        h = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        h = self.norm(h + self.attn(h, h, h, need_weights=False)[0])
        return self.head(h).mean(1)


MODELS = [
    ("mlp", lambda: nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)), lambda n: torch.randn(n, 5)),
    ("cnn", lambda: nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)), lambda n: torch.randn(n, 1, 6, 6)),
    ("transformer", TinyTransformer, lambda n: torch.randint(0, 13, (n, 6))),
    ("lstm", lambda: nn.Sequential(nn.LSTM(5, 4, batch_first=True)), lambda n: torch.randn(n, 3, 5)),
]


def _loss(y: Tensor):
    def loss(out):
        if isinstance(out, tuple):  # the LSTM's (output, (h, c))
            out = out[0][:, -1, :3]
        return F.cross_entropy(out, y, reduction="none")

    return loss


@pytest.mark.parametrize("mode", ["default", "thorough", "in-place"])
@pytest.mark.parametrize("make, make_x", [c[1:] for c in MODELS], ids=[c[0] for c in MODELS])
def test_attribution_passes_on_right_models(make, make_x, mode):
    torch.manual_seed(0)
    x, y = make_x(5), torch.randint(0, 3, (5,))
    kw = {"thorough": mode == "thorough", "dtype": None if mode == "in-place" else torch.float64}
    assert check_attribution(make(), x, _loss(y), **kw)


def test_attribution_with_fallback_units():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), Affine(), nn.Linear(4, 3))
    y = torch.randint(0, 3, (5,))
    with pytest.warns(gradhooks.FallbackWarning):
        assert check_attribution(model, torch.randn(5, 4), _loss(y), fallback=True, thorough=True)


class Rolled(nn.Linear):
    """A Linear subclass (its own forward is Linear's) given a module-level rule whose
    per-sample rows are rolled by one sample: the batch sum is right."""


class RolledRule(Rule):
    def per_sample(self, module: nn.Module, calls: Sequence[Call], names: Sequence[str]) -> dict[str, Tensor]:
        out = {}
        for k in names:
            g = sum(c.grad for c in calls)
            per = torch.einsum("no,ni->noi", g, calls[0].input) if k == "weight" else g
            out[k] = per.roll(1, 0)
        return out


@pytest.mark.parametrize("thorough", [False, True])
def test_attribution_catches_rows_of_the_wrong_sample(registered, thorough):
    registered(RolledRule(), Rolled)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), Rolled(4, 3))
    y = torch.randint(0, 3, (6,))
    with pytest.raises(CheckError) as info:
        check_attribution(model, torch.randn(6, 5), _loss(y), thorough=thorough)
    msg = str(info.value)
    assert "'2.weight'" in msg and "'2.bias'" in msg and "'0.weight'" not in msg, msg
    if thorough:
        assert "per-sample gradients differ from the naive loop" in msg and "batch sum is right" in msg
    assert check_attribution(model, torch.randn(6, 5), _loss(y), raise_exception=False) is False


def test_in_place_check_restores_p_grad_and_leaves_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    before = snapshot(model)
    weights = [p.detach().clone() for p in model.parameters()]
    assert check_attribution(model, torch.randn(6, 5), _loss(torch.randint(0, 3, (6,))), dtype=None, thorough=True)
    assert_clean(model, before)
    for p, w in zip(model.parameters(), weights, strict=True):
        torch.testing.assert_close(p.grad, torch.full_like(p, 0.5), rtol=0, atol=0)
        torch.testing.assert_close(p.detach(), w, rtol=0, atol=0)


@pytest.mark.parametrize("loss, kw, error, match", [
    (lambda out: out.sum(), {}, ValueError, r"shape \(N,\)"),
    (lambda out: out[:3, 0], {}, ValueError, "3 losses for a batch of 6"),
    (lambda out: out[:, 0], {"loss_reduction": "mean"}, TypeError, "chosen by the check"),
    (lambda out: out[:, 0], {"one_backward": True}, TypeError, "chosen by the check"),
], ids=["scalar-loss", "short-loss", "loss_reduction", "one_backward"])
def test_attribution_bad_arguments(loss, kw, error, match):
    model = nn.Sequential(nn.Linear(5, 3))
    with pytest.raises(error, match=match):
        check_attribution(model, torch.randn(6, 5), loss, **kw)


def test_builtin_rule_with_rows_rolled_is_caught(monkeypatch):
    """The per-op path of check_rule can fail: Linear's rule with each sample given
    the previous sample's rows (batch sum unchanged)."""
    from gradhooks.rules.linear import LinearRule

    right = LinearRule.per_sample

    def rolled(self, module, calls, names):
        return {k: v.roll(1, 0) for k, v in right(self, module, calls, names).items()}

    def rolled_into(self, module, calls, names, out, accumulate):
        for k, v in rolled(self, module, calls, names).items():
            out[k].add_(v) if accumulate.get(k) else out[k].copy_(v)

    monkeypatch.setattr(LinearRule, "per_sample", rolled)
    monkeypatch.setattr(LinearRule, "per_sample_into", rolled_into)
    with pytest.raises(CheckError) as info:
        check_rule(nn.Linear, nn.Linear(4, 3), torch.randn(5, 3, 4))
    msg = str(info.value)
    assert "materialize=True): 'weight': per-sample gradients differ" in msg and "batch sum is right" in msg, msg


class KeyBiasAttention(nn.Module):
    """Self-attention with separate q/k/v Linears: the key bias's gradient is exactly
    zero in exact arithmetic (softmax ignores a constant per query), float32 noise here."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.inp = nn.Linear(8, d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        att = torch.softmax(self.q(h) @ self.k(h).transpose(1, 2) / h.shape[-1] ** 0.5, -1)
        return self.head((att @ self.v(h)).mean(1))


@pytest.mark.parametrize("seed", range(3))
def test_float32_cancelling_gradient_is_no_false_alarm(seed):
    """Measured relative to its own size the key bias is 100% noise; relative to the
    model's scale it is rounding (without that floor this fails for every seed)."""
    torch.manual_seed(seed)
    model, x, y = KeyBiasAttention(), torch.randn(16, 24, 8), torch.randint(0, 3, (16,))
    assert check_attribution(model, x, _loss(y), dtype=None)
