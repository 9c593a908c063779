"""Every error the library raises is a GradhooksError (and the built-in type the
situation calls for), so ``except gradhooks.GradhooksError`` catches all of ours."""

from __future__ import annotations

import pathlib
import re

import pytest
import torch
from torch import nn

import gradhooks
from gradhooks import GradhooksError, per_sample_grads

PACKAGE = pathlib.Path(gradhooks.__file__).parent
BUILTIN_RAISE = re.compile(r"raise (ValueError|TypeError|KeyError|RuntimeError|IndexError|AssertionError)\(")


def test_no_bare_builtin_raise_in_the_library():
    # The benchmark's command line is a tool, not the library: argparse-style errors there.
    offenders = [
        f"{path.relative_to(PACKAGE)}:{i}"
        for path in PACKAGE.rglob("*.py") if "bench" not in path.parts
        for i, line in enumerate(path.read_text().splitlines(), 1) if BUILTIN_RAISE.search(line)
    ]
    assert offenders == [], offenders


def _model() -> nn.Module:
    return nn.Linear(3, 2)


@pytest.mark.parametrize("call, builtin", [
    (lambda: per_sample_grads(_model(), loss_reduction="avg"), ValueError),
    (lambda: per_sample_grads("not a model"), TypeError),  # type: ignore[arg-type]
    (lambda: per_sample_grads(_model(), materialize=1), TypeError),  # type: ignore[arg-type]
    (lambda: gradhooks.register_rule(int), TypeError),  # type: ignore[arg-type]
    (lambda: gradhooks.unregister_rule(nn.Tanh), KeyError),
], ids=["loss_reduction", "model", "flag", "register-non-module", "unregister-unknown"])
def test_argument_errors_are_ours_and_builtin(call, builtin):
    with pytest.raises(GradhooksError) as info:
        call()
    assert isinstance(info.value, builtin)


def test_unknown_key_lists_close_names():
    model = nn.Sequential(nn.Linear(3, 2))
    with per_sample_grads(model, loss_reduction="sum") as g:
        model(torch.randn(4, 3)).sum().backward()
    with pytest.raises(GradhooksError) as info:
        g["0.weights"]
    assert isinstance(info.value, KeyError) and "0.weight" in str(info.value)
