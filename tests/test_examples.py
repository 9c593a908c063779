"""The examples run in --quick mode (in-process: main(argv)) and print sane figures."""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str) -> ModuleType:
    pytest.importorskip("sklearn", reason="the examples use scikit-learn's digits (the 'test' extra installs it)")
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dp_sgd_digits_quick(capsys):
    result = load("dp_sgd_digits").main(["--quick"])
    out = capsys.readouterr().out
    rows = [tuple(map(float, m.groups())) for m in re.finditer(r"^\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.na]+)$", out, re.M)]
    assert [r[0] for r in rows] == [1.0, 2.0, 3.0], out
    _, plain, private, eps = rows[-1]
    assert plain > 0.8 and private > 0.3, out  # chance is 0.1
    assert (plain, private) == (round(result["plain_acc"], 3), round(result["dp_acc"], 3))
    assert f"DP-SGD {private:.3f} at epsilon=" in out
    if importlib.util.find_spec("opacus") is None:
        assert math.isnan(eps) and "no privacy accounting" in out
        return
    from gradhooks.privacy import epsilon

    epsilons = [r[3] for r in rows]
    assert 0 < epsilons[0] < epsilons[1] < epsilons[2] < 10
    steps = 3 * round(1437 / 256)  # PoissonBatchSampler: round(1 / q) steps per epoch
    want = epsilon(noise_multiplier=3.0, sample_rate=256 / 1437, steps=steps, delta=1e-5)
    assert eps == round(want, 2)


def test_dp_compare_digits_quick(capsys):
    """The comparison table runs; the DP rows share one accountant's epsilon (same q, sigma, steps)."""
    pytest.importorskip("opacus")
    result = load("dp_compare_digits").main(["--quick", "--epochs", "1", "--models", "mlp"])
    out = capsys.readouterr().out
    assert "| mlp | gradhooks DPSGD |" in out and "| mlp | Opacus hooks |" in out, out
    ours, theirs = result[("mlp", "gradhooks DPSGD")], result[("mlp", "Opacus hooks")]
    assert ours["epsilon"] == pytest.approx(theirs["epsilon"], rel=1e-12) and 0 < ours["epsilon"] < 10
    assert ours["acc"] > 0.2 and result[("mlp", "non-private")]["acc"] > 0.5, out  # chance is 0.1


def test_find_mislabeled_quick(capsys, tmp_path):
    png = tmp_path / "norms.png"
    result = load("find_mislabeled").main(["--quick", "--out", str(png)])
    out = capsys.readouterr().out
    assert "144 labels flipped" in out and "random pick: 0.100" in out
    found = re.search(r"gradient norm, whole model\s+([\d.]+)", out)
    assert found is not None, out
    precision = float(found.group(1))
    assert precision == round(result["precision_at_k"], 3) and precision > 0.3, out  # baseline 0.10
    if importlib.util.find_spec("matplotlib") is None:
        assert "no plot" in out
    else:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "name, expect",
    [
        ("quickstart", r"max \|gradhooks - naive loop\| = ([\d.e+-]+)"),
        ("custom_rule", r"max \|gradhooks - naive loop\| = ([\d.e+-]+)"),
    ],
)
def test_small_examples_run(name, expect):
    """Each in a fresh process (custom_rule registers a rule at import)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    done = subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py")], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    found = re.search(expect, done.stdout)
    assert found, done.stdout
    assert float(found.group(1)) < 1e-5
    if name == "custom_rule":
        assert "wrong rule caught" in done.stdout
