"""`python -m kvcompress.report compare`: paired ratios over shared windows from run folders, and its refusals.

Hand-built run folders (a metrics.json and a windows.safetensors, as a run writes them) with known per-window
losses, so the truth is known: an A/A comparison, a planted effect, runs on other windows or other data."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvcompress.evaluation import compare as cmp
from kvcompress.evaluation import report
from kvcompress.evaluation.windows import write_windows

N_WINDOWS = 300


def fake_run(
    folder: Path,
    val: np.ndarray,
    *,
    seed: int = 0,
    ids: np.ndarray | None = None,
    origin: str = "/data/corpus.txt",
    overrides: Sequence[str] = ("model=tiny",),
    config: dict[str, Any] | None = None,
    tokenizer: str = "ab" * 32,
    train_on_test: bool = False,
    val_ppl: float | None = None,
    windows: bool = True,
) -> Path:
    """A run folder as a training run leaves it: metrics.json (record and numbers) and windows.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = np.arange(len(val)) if ids is None else ids
    full_config = {
        "task_name": "train",
        "seed": seed,
        "model": {"name": "tiny", "attention": "standard"},
        "data": {"source": "local", "path": origin, "seq_len": 32, "seed": seed, "eval_seed": 0, "batch_size": 8},
        "paths": {"output_dir": str(folder)},
        **(config or {}),
    }
    split = {"origin": origin, "split_used": "test" if train_on_test else "corpus"}
    metrics = {
        "val_ppl": math.exp(float(np.mean(val))) if val_ppl is None else val_ppl,
        "val_pos_ppl": {"0-16": math.exp(float(np.mean(val))) * 1.1},
        "overrides": [*overrides, f"seed={seed}"],
        "config": full_config,
        "data": {
            "splits": {"train": split, "validation": {**split, "split_used": "valid"}},
            "tokenizer_sha256": tokenizer,
            "train_on_test": train_on_test,
        },
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))
    if windows:
        write_windows(folder, {"ids": ids, "val": val, "bucket:0-16": val + 0.1}, {"seed": str(seed)})
    return folder


def simulated_seeds(rng: np.random.Generator, difficulty: np.ndarray, n_seeds: int, shift: float = 0.0) -> list:
    """Per-window losses of `n_seeds` trained models: the windows' difficulty (sd 0.5 nats, as measured on the
    mini scale), a seed's offset (sd 0.005 nats: the pilot's seeds differ by ~0.5-1% in PPL) and window noise."""
    return [difficulty + shift + rng.normal(0, 0.005) + rng.normal(0, 0.05, len(difficulty)) for _ in range(n_seeds)]


@pytest.fixture
def difficulty() -> np.ndarray:
    return np.random.default_rng(0).normal(5.0, 0.5, N_WINDOWS)


def runs_of(root: Path, name: str, losses: list, **kw: Any) -> list[Path]:
    return [fake_run(root / name / str(i), val, seed=i, **kw) for i, val in enumerate(losses)]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    assert report.main(["compare", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_over_a_includes_one(tmp_path: Path, difficulty: np.ndarray, capsys: pytest.CaptureFixture[str]) -> None:
    """One configuration, two seeds a side: the hierarchical bootstrap's interval includes 1."""
    rng = np.random.default_rng(1)
    a = runs_of(tmp_path, "a", simulated_seeds(rng, difficulty, 2))
    b = runs_of(tmp_path, "b", simulated_seeds(rng, difficulty, 2))
    out = run_cli(capsys, str(tmp_path / "a"), "--", *map(str, b))  # a multirun folder, or run folders
    assert {"ratio", "ci", "n_windows", "n_seeds", "method"} <= set(out)
    assert out["n_windows"] == N_WINDOWS and out["n_seeds"] == [2, 2] and out["method"] == "bootstrap"
    lo, hi = out["ci"]
    assert lo < 1 < hi and lo < out["ratio"] < hi
    assert out["seeds"] == {"A": [0, 1], "B": [0, 1]} and out["runs"]["A"] == list(map(str, a))


def test_a_planted_effect_is_detected(tmp_path: Path, difficulty: np.ndarray, capsys) -> None:
    """B's losses are A's plus 0.02 nats on every window (PPL x 1.02) with noise: the interval excludes 1 by either
    method. Unpaired, the windows' spread (0.5 nats over 300 windows: a standard error of ~0.04) would hide it."""
    rng = np.random.default_rng(2)
    a = simulated_seeds(rng, difficulty, 2)
    b = simulated_seeds(rng, difficulty, 2, shift=0.02)
    runs_of(tmp_path, "a", a)
    runs_of(tmp_path, "b", b)
    truth = math.exp(float(np.mean(b) - np.mean(a)))
    for method in ("bootstrap", "t"):
        out = run_cli(capsys, str(tmp_path / "a"), "--", str(tmp_path / "b"), "--method", method)
        assert out["ratio"] == pytest.approx(truth, rel=1e-12)
        assert 1 < out["ci"][0] < out["ratio"] < out["ci"][1] < math.exp(0.04)
    bucket = run_cli(capsys, str(tmp_path / "a"), "--", str(tmp_path / "b"), "--metric", "bucket:0-16")
    assert bucket["ratio"] == pytest.approx(truth, rel=1e-12) and bucket["metric"] == "bucket:0-16"
    # B / A = 1 / (A / B): the sides swap exactly.
    back = run_cli(capsys, str(tmp_path / "b"), "--", str(tmp_path / "a"), "--method", "t")
    assert back["ratio"] == pytest.approx(1 / truth, rel=1e-12)
    text_args = ["compare", str(tmp_path / "a"), "--", str(tmp_path / "b"), "--level", "0.9"]
    assert report.main(text_args) == 0
    assert "val_ppl: B/A = " in capsys.readouterr().out


def test_runs_on_different_windows_are_refused_even_when_mixed_is_allowed(tmp_path: Path, difficulty) -> None:
    fake_run(tmp_path / "a", difficulty)
    fake_run(tmp_path / "b", difficulty, ids=np.arange(N_WINDOWS) + 1)
    fake_run(tmp_path / "a2", difficulty, ids=np.arange(N_WINDOWS) + 1, seed=1)
    for a, b in (("a", "b"), ("a a2", "a")):
        argv = [*(str(tmp_path / x) for x in a.split()), "--", str(tmp_path / b), "--allow-mixed"]
        assert "different windows" in _refused(argv)


def _refused(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        report.main(["compare", *argv])
    message = str(exit_info.value.code)
    assert message.startswith("compare: refused: ") and "\n" not in message
    return message


def test_runs_on_different_data_are_refused_unless_mixed_is_allowed(tmp_path: Path, difficulty, capsys) -> None:
    fake_run(tmp_path / "a", difficulty)
    cases = {
        "origin": dict(origin="/data/other.txt"),
        "tokenizer": dict(tokenizer="cd" * 32),
        "seq_len": dict(config={"data": {"source": "local", "path": "/data/corpus.txt", "seq_len": 64}}),
    }
    for name, kw in cases.items():
        fake_run(tmp_path / name, difficulty + 0.01, **kw)
        message = _refused([str(tmp_path / "a"), "--", str(tmp_path / name)])
        assert "different data" in message and "--allow-mixed" in message, message
        mixed = run_cli(capsys, str(tmp_path / "a"), "--", str(tmp_path / name), "--allow-mixed")
        assert mixed["ratio"] == pytest.approx(math.exp(0.01))
    # Training-only data settings (the batch size) and what is compared (model, attention...) may differ.
    fake_run(tmp_path / "batch", difficulty, config={"data": {**_data(), "batch_size": 16}, "model": {"name": "ka"}})
    assert run_cli(capsys, str(tmp_path / "a"), "--", str(tmp_path / "batch"))["ratio"] == pytest.approx(1.0)


def _data() -> dict[str, Any]:
    return {"source": "local", "path": "/data/corpus.txt", "seq_len": 32, "seed": 0, "eval_seed": 0, "batch_size": 8}


def test_a_side_that_mixes_configurations_is_refused(tmp_path: Path, difficulty) -> None:
    fake_run(tmp_path / "a" / "0", difficulty, seed=0)
    fake_run(tmp_path / "a" / "1", difficulty, seed=1, config={"model": {"name": "tiny", "attention": "ka"}})
    fake_run(tmp_path / "b", difficulty)
    message = _refused([str(tmp_path / "a"), "--", str(tmp_path / "b")])
    assert "side A mixes configurations" in message and "model.attention: 'standard' vs 'ka'" in message


def test_diverged_missing_and_unreadable_runs_are_refused(tmp_path: Path, difficulty) -> None:
    fake_run(tmp_path / "a", difficulty)
    bad = difficulty.copy()
    bad[3] = np.inf
    fake_run(tmp_path / "inf", bad, val_ppl=math.inf)
    assert "NaN/inf" in _refused([str(tmp_path / "a"), "--", str(tmp_path / "inf")])
    fake_run(tmp_path / "old", difficulty, windows=False)
    assert "no windows.safetensors" in _refused([str(tmp_path / "a"), "--", str(tmp_path / "old")])
    assert "no per-window 'cache:int8'" in _refused(
        [str(tmp_path / "a"), "--", str(tmp_path / "a"), "--metric", "cache:int8"]
    )
    (tmp_path / "a" / "windows.safetensors").write_bytes(b"\x00" * 10)
    assert "unreadable per-window records" in _refused([str(tmp_path / "a"), "--", str(tmp_path / "inf")])
    with pytest.raises(SystemExit):
        report.main(["compare", str(tmp_path / "a")])  # no `--`: a usage error


def test_compare_api_orders_seeds_and_returns_a_comparison(tmp_path: Path, difficulty) -> None:
    rng = np.random.default_rng(3)
    losses = simulated_seeds(rng, difficulty, 3)
    for i in (2, 0, 1):
        fake_run(tmp_path / "a" / f"job{i}", losses[i], seed=10 - i)
    result, info = cmp.compare([tmp_path / "a"], [tmp_path / "a" / "job0"], method="t")
    assert info["seeds"]["A"] == [8, 9, 10] and result.n_seeds == (3, 1)
    assert result.ratio == pytest.approx(math.exp(float(losses[0].mean() - np.mean(losses))), rel=1e-12)
