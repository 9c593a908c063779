"""The benchmark harness: its correctness column, the CLI and its JSON. No timing assertions."""

from __future__ import annotations

import json
import os

import pytest
import torch

from gradhooks.bench import main
from gradhooks.bench.__main__ import _wanted_env
from gradhooks.bench.configs import CONFIGS, select_configs
from gradhooks.bench.measure import _compare, _reference, correctness
from gradhooks.bench.methods import METHODS, Outcome, prepare_naive, select_methods
from gradhooks.bench.report import ROW_KEYS

#: Methods that need nothing beyond torch and must pass everywhere.
CORE = ("plain", "gradhooks", "gradhooks-reuse", "gradhooks-ghost", "naive", "torch.func")

#: Competitor limitations, not harness bugs: (method, config) -> the error they raise.
KNOWN_UNSUPPORTED = {
    ("backpack", "transformer"): "does not support LayerNorm",
    ("backpack-l2", "transformer"): "does not support LayerNorm",
}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_correctness_column(config: str, method: str) -> None:
    if method not in CORE and METHODS[method].missing():
        pytest.skip(METHODS[method].missing())
    err, how = correctness(config, method)
    if err is None and (method, config) in KNOWN_UNSUPPORTED:
        assert KNOWN_UNSUPPORTED[method, config] in how
        pytest.skip(f"{method} on {config}: {how}")
    assert err is not None, how
    assert how in ("float64", "reference")
    assert err < 1e-6


@pytest.mark.parametrize("field", ["per_sample", "norms", "clipped", "batch_grad"])
def test_compare_detects_a_wrong_result(field: str) -> None:
    case = CONFIGS["seed-rows-16x1000x1"].build("small", dtype=torch.float64)
    ref = _reference(case)
    got = getattr(ref, field)
    if isinstance(got, dict):
        name = next(iter(got))
        wrong = {k: (v * 1.01 if k == name else v) for k, v in got.items()}
    else:
        wrong = got.clone()
        wrong[-1] *= 1.01
    assert _compare(Outcome(**{field: wrong}), ref) > 1e-4


def test_naive_cap_extrapolates() -> None:
    case = CONFIGS["sequence"].build("small")
    runner = prepare_naive(case, 1)
    assert runner.scale == case.n
    assert "extrapolated from 1 of" in runner.note
    assert runner.step()["fc1.weight"].shape == (1, *case.model.fc1.weight.shape)


def test_selection() -> None:
    assert select_configs("seed-rows") == ["seed-rows-1000x100x10", "seed-rows-16x1000x1", "seed-rows-16x5000x1"]
    assert select_configs(None) == list(CONFIGS)
    assert select_methods("gradhooks") == ["plain", "gradhooks"]
    with pytest.raises(ValueError, match="unknown config"):
        select_configs("mnist")
    with pytest.raises(ValueError, match="unknown method"):
        select_methods("jax")


@pytest.mark.parametrize(
    "argv, env, want",
    [
        ([], {}, {"OMP_WAIT_POLICY": "PASSIVE"}),
        ([], {"OMP_WAIT_POLICY": "ACTIVE"}, {}),
        (["--thp"], {"OMP_WAIT_POLICY": "PASSIVE"}, {"THP_MEM_ALLOC_ENABLE": "1"}),
        (["--thp"], {"OMP_WAIT_POLICY": "PASSIVE", "THP_MEM_ALLOC_ENABLE": "1"}, {}),
    ],
    ids=["omp-unset", "omp-kept", "thp", "thp-set"],
)
def test_environment_before_torch(monkeypatch: pytest.MonkeyPatch, argv: list[str], env: dict, want: dict) -> None:
    for k in ("OMP_WAIT_POLICY", "THP_MEM_ALLOC_ENABLE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert _wanted_env(argv) == want


@pytest.mark.parametrize("memory", [False, True], ids=["no-memory", "memory"])
def test_cli_writes_json(tmp_path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, memory: bool) -> None:
    monkeypatch.setenv("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))  # main() warns without it
    out = tmp_path / "bench.json"
    argv = ["--configs", "seed-rows-16x1000x1,sequence", "--methods", "gradhooks,gradhooks-ghost,naive",
            "--repeats", "1", "--warmup", "0", "--scale", "small", "--json", str(out)]  # fmt: skip
    argv.append("--memory" if memory else "--no-memory")
    if memory:  # one config, one method: each is a fresh process
        argv[1], argv[3] = "sequence", "gradhooks"
    assert main(argv) == 0
    data = json.loads(out.read_text())
    assert set(data) == {"environment", "args", "results"}
    assert data["environment"]["torch"] == torch.__version__
    assert data["environment"]["threads"] == torch.get_num_threads()
    rows = data["results"]
    configs = ["sequence"] if memory else ["seed-rows-16x1000x1", "sequence"]
    methods = ["plain", "gradhooks"] if memory else ["plain", "gradhooks", "gradhooks-ghost", "naive"]
    assert [(r["config"], r["method"]) for r in rows] == [(c, m) for c in configs for m in methods]
    for r in rows:
        assert set(ROW_KEYS) <= set(r)
        assert r["status"] == "ok", r["note"]
        assert len(r["times_s"]) == 1 and r["median_s"] > 0
        assert r["rel_err"] < 1e-6
        assert (r["peak_bytes"] is not None) == memory
        if memory:
            assert r["peak_bytes"] >= 0 and r["mem_ratio"] == r["peak_bytes"] / r["result_bytes"]
    assert all(r["ratio"] == 1.0 for r in rows if r["method"] == "plain")
    printed = capsys.readouterr().out
    assert "== sequence" in printed and "\ngradhooks " in printed

