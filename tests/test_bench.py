"""The benchmark harness: its correctness column, what its timed region contains, the
CLI, its JSON and plot. No timing assertions."""

from __future__ import annotations

import importlib
import json
import os
import warnings
from typing import Any

import pytest
import torch

from gradhooks.bench import main
from gradhooks.bench import measure as measure_mod
from gradhooks.bench.__main__ import _wanted_env
from gradhooks.bench.cli import WRONG, _judge
from gradhooks.bench.configs import CONFIGS, GROUPS, QUICK, select_configs
from gradhooks.bench.correct import compare, correctness, reference
from gradhooks.bench.incumbents import prepare_naive
from gradhooks.bench.measure import run_step, time_config
from gradhooks.bench.methods import CLIPPING, METHODS, Method, Outcome, Runner, quiet_incumbents, select_methods
from gradhooks.bench.plot import COLOURS, TITLE, XLABEL, write_plot
from gradhooks.bench.profile import WRAPPED, profile_modes
from gradhooks.bench.report import ROW_KEYS, _line

# The bench's methods pass one_backward themselves: the conftest's mode changes nothing.
pytestmark = pytest.mark.backward_mode("default")

#: Methods that need nothing beyond torch and must pass everywhere.
CORE = ("plain", "gradhooks", "gradhooks-reuse", "gradhooks-1bw", "gradhooks-ghost", "gradhooks-ghost-1bw",
        "naive", "torch.func")

#: Competitor limitations, not harness bugs: (method, config) -> what their error says.
_BACKPACK = {"transformer": "LayerNorm", "transformer-4x256": "LayerNorm", "gn-cnn": "GroupNorm",
             "hf-gpt2": "Conv1D", "hf-llama": "LlamaRMSNorm"}
KNOWN_UNSUPPORTED = {
    **{(m, c): f"does not support {what}" for m in ("backpack", "backpack-l2") for c, what in _BACKPACK.items()},
    ("opacus-ghost", "hf-gpt2"): "Parameter tying is not supported",
    # GPT-2's position ids are (1, T): Opacus gives wpe a per-sample gradient of batch 1.
    ("opacus", "hf-gpt2"): "Sizes of tensors must match",
    ("opacus-clip", "hf-gpt2"): "stack expects each tensor to be equal size",
}


def _skip_missing(config: str, method: str) -> None:
    if CONFIGS[config].missing():
        pytest.skip(CONFIGS[config].missing())
    if method not in CORE and METHODS[method].missing():
        pytest.skip(f"{method}: {METHODS[method].missing()}")


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_correctness_column(config: str, method: str) -> None:
    _skip_missing(config, method)
    err, how = correctness(config, method)
    if (method, config) in KNOWN_UNSUPPORTED:
        assert err is None and KNOWN_UNSUPPORTED[method, config] in how, how
        pytest.skip(f"{method} on {config}: {how}")
    assert err is not None, how
    assert how in ("float64", "reference")
    assert err < 1e-6


@pytest.mark.parametrize("method", list(METHODS))
def test_every_step_gives_what_its_user_reads(method: str) -> None:
    """Per-sample methods end with every per-sample gradient and the norms; clipping
    methods with the norms and the clipped p.grad (BackPACK's norms-only: the norms)."""
    _skip_missing("sequence", method)
    case = CONFIGS["sequence"].build("small", dtype=torch.float64)
    with warnings.catch_warnings():
        quiet_incumbents()
        runner = METHODS[method].prepare(case, case.n)
        got = runner.outcome(runner.step())
    if method == "plain":
        assert got.batch_grad is not None and got.per_sample is None and got.norms is None
    elif method in CLIPPING:
        assert got.norms is not None and got.per_sample is None
        assert (got.clipped is None) == (method == "backpack-l2")
    else:
        assert got.per_sample is not None and got.norms is not None and got.clipped is None
        assert set(got.per_sample) == {k for k, p in case.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("field", ["per_sample", "norms", "clipped", "batch_grad"])
def test_compare_detects_a_wrong_result(field: str) -> None:
    case = CONFIGS["seed-rows-16x1000x1"].build("small", dtype=torch.float64)
    ref = reference(case)
    got = getattr(ref, field)
    if isinstance(got, dict):
        name = next(iter(got))
        wrong: Any = {k: (v * 1.01 if k == name else v) for k, v in got.items()}
    else:
        wrong = got.clone()
        wrong[-1] *= 1.01
    assert compare(Outcome(**{field: wrong}), ref) > 1e-4


def test_naive_cap_extrapolates() -> None:
    case = CONFIGS["sequence"].build("small")
    runner = prepare_naive(case, 1)
    assert runner.scale == case.n
    assert "extrapolated from 1 of" in runner.note
    per_sample, norms = runner.step()
    assert per_sample["fc1.weight"].shape == (1, *case.model.fc1.weight.shape) and norms.shape == (1,)


class _Freed:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    def __del__(self) -> None:
        self.log.append("result freed")


def test_the_release_is_inside_the_measurement(monkeypatch: pytest.MonkeyPatch) -> None:
    """A training loop pays for freeing a step's tensors: the result is dropped and
    clear() runs between the two clock readings."""
    log: list[str] = []
    model = torch.nn.Linear(2, 2)
    runner = Runner(lambda: _Freed(log), lambda raw: Outcome(), model, extra_clear=[lambda: log.append("clear")])
    real = measure_mod._now

    def clock() -> tuple[float, float, int]:
        log.append("clock")
        return real()

    monkeypatch.setattr(measure_mod, "_now", clock)
    wall, cpu, touched = run_step(runner, "cpu")
    assert log == ["clock", "result freed", "clear", "clock"]
    assert wall >= 0 and cpu >= 0 and touched >= 0


@pytest.mark.parametrize("settle", [True, False])
def test_rounds_settle_each_method_before_its_timed_step(monkeypatch: pytest.MonkeyPatch, settle: bool) -> None:
    order: list[str] = []
    fakes = {}
    for name in ("plain", "a", "b"):
        def prepare(case: Any, cap: int, name: str = name) -> Runner:
            return Runner(lambda: order.append(name), lambda raw: Outcome(), torch.nn.Linear(1, 1))

        fakes[name] = Method(name, "", prepare)
    monkeypatch.setattr(measure_mod, "METHODS", fakes)
    out = time_config(CONFIGS["sequence"].build("small"), list(fakes), repeats=3, warmup=1, cap=1, settle=settle)
    per_round = 2 if settle else 1
    assert [len(out[m].times) for m in fakes] == [3, 3, 3]
    rounds = order[3:]  # after one warm-up step each
    steps = [rounds[i : i + per_round] for i in range(0, len(rounds), per_round)]
    assert all(len(set(s)) == 1 for s in steps), order  # the settling step is the same method's
    assert [s[0] for s in steps] == ["plain", "a", "b", "a", "b", "plain", "b", "plain", "a"]  # rotating start


def test_missing_package_says_how_to_install() -> None:
    method = Method("x", "", lambda case, cap: Runner(lambda: None, lambda raw: Outcome(), torch.nn.Linear(1, 1)),
                    ("gradhooks_no_such_module",))
    assert method.missing() == "pip install gradhooks_no_such_module"
    if importlib.util.find_spec("backpack") is None:
        assert "--no-deps backpack-for-pytorch" in (METHODS["backpack"].missing() or "")
    row = {"method": "x", "status": "not installed", "note": method.missing(), "median_s": None,
           "touched_bytes": None, "peak_bytes": None, "spread": None, "ratio": None, "cpu_ratio": None,
           "mem_ratio": None, "rel_err": None, "err_dtype": None}
    line = _line(row)
    assert "not installed: pip install gradhooks_no_such_module" in line and line.count("not installed") == 1


@pytest.mark.parametrize(
    "err, how, status",
    [(1e-15, "float64", "ok"), (2 * WRONG, "float64", "wrong"), (None, "n/a: BackPACK ...", "n/a"),
     (None, "RuntimeError: boom", "error")],
)
def test_judge_marks_rows_that_fail_their_correctness_check(err: float | None, how: str, status: str) -> None:
    row = {"status": "ok", "note": "", "rel_err": None, "err_dtype": None}
    _judge(row, err, how)
    assert row["status"] == status and (status == "ok") == (row["note"] == "")


def test_selection_and_labels() -> None:
    assert select_configs("seed-rows") == ["seed-rows-1000x100x10", "seed-rows-16x1000x1", "seed-rows-16x5000x1"]
    assert select_configs("hf") == ["hf-gpt2", "hf-llama"]
    assert select_configs("quick") == QUICK and set(QUICK) <= set(CONFIGS) and GROUPS["quick"] == QUICK
    assert select_configs(None) == list(CONFIGS)
    assert select_methods("gradhooks") == ["plain", "gradhooks"]
    labels = [c.label for c in CONFIGS.values()]
    assert len(set(labels)) == len(labels) and all(labels)
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
def test_cli_writes_json_and_plot(tmp_path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, memory: bool) -> None:
    monkeypatch.setenv("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))  # main() warns without it
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    methods = "gradhooks-1bw" if memory else "gradhooks,gradhooks-ghost-1bw,naive"
    configs = "sequence" if memory else "seed-rows-16x1000x1,sequence"  # memory: each method a fresh process
    argv = ["--configs", configs, "--methods", methods, "--repeats", "1", "--warmup", "0", "--scale", "small",
            "--json", str(out), "--plot", str(png), "--memory" if memory else "--no-memory"]  # fmt: skip
    assert main(argv) == 0
    data = json.loads(out.read_text())
    assert set(data) == {"environment", "args", "results"}
    assert data["environment"]["torch"] == torch.__version__
    assert data["environment"]["threads"] == torch.get_num_threads()
    rows = data["results"]
    want = [(c, m) for c in configs.split(",") for m in ["plain", *methods.split(",")]]
    assert [(r["config"], r["method"]) for r in rows] == want
    for r in rows:
        assert set(ROW_KEYS) <= set(r)
        assert r["status"] == "ok", r["note"]
        assert r["label"] == CONFIGS[r["config"]].label
        assert len(r["times_s"]) == 1 and r["median_s"] > 0 and r["cpu_s"] >= 0 and r["touched_bytes"] >= 0
        assert r["rel_err"] < 1e-6
        assert (r["peak_bytes"] is not None) == memory
        if memory:
            assert r["peak_bytes"] >= 0 and r["mem_ratio"] == r["peak_bytes"] / r["result_bytes"]
    assert all(r["ratio"] == 1.0 for r in rows if r["method"] == "plain")
    printed = capsys.readouterr().out
    assert "== sequence (Linear on sequences" in printed and "\ngradhooks" in printed
    if importlib.util.find_spec("matplotlib") is not None:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_reads_for_a_newcomer(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    assert "lower is better" in TITLE and "log scale" in XLABEL
    for panel in ([m for m in METHODS if m not in CLIPPING and m != "plain"], list(CLIPPING)):
        assert len({COLOURS[m] for m in panel}) == len(panel), panel  # one colour per method in a panel
    rows = [{"config": c, "label": CONFIGS[c].label, "method": m, "status": "ok" if m != "backpack" else "n/a",
             "ratio": 1.0 + k} for c in ("cnn", "sequence") for k, m in enumerate(METHODS)]
    assert write_plot(str(tmp_path / "p.png"), rows) is None
    assert (tmp_path / "p.png").stat().st_size > 10_000


def test_profile_phases() -> None:
    for mod, attr, _ in WRAPPED:  # the library functions it times still exist under these names
        assert callable(getattr(importlib.import_module(mod), attr)), (mod, attr)
    text = profile_modes(["sequence"], ["gradhooks", "gradhooks-ghost-1bw"], repeats=1, say=lambda s: None,
                         ops=False, scale="small")
    for phase in ("enter", "backward", "exit", "g[name] + norms()", "norms()", "clip_()", "release",
                  "exit: build per-sample tensors", "clip_() or exit: write p.grad"):
        assert f"\n{phase} " in text, phase
    with pytest.raises(ValueError, match="not a gradhooks method"):
        profile_modes(["sequence"], ["torch.func"], repeats=1, ops=False, scale="small")
