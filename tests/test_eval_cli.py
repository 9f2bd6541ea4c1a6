"""`python -m kvcompress.eval`: a smoke run's checkpoint evaluates to that run's val PPL exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kvcompress.evaluation.windows import load_windows

SMOKE = ["debug=smoke", "logger=csv", "print_config=false", "data=local"]


def _run(module: str, args: list[str], cwd: Path, corpus: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KVCOMPRESS_CACHE_DIR": str(cwd / "cache"), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", module, *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=cwd)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    root = tmp_path_factory.mktemp("eval_cli")
    run = root / "run"
    args = [*SMOKE, f"data.path={corpus}", f"hydra.run.dir={run}", f"paths.stage_dir={root / 'stages'}"]
    done = _run("kvcompress.train", args, root, corpus)
    assert done.returncode == 0, done.stderr[-3000:]
    (root / "train.stderr").write_text(done.stderr)
    return run


def test_an_ordinary_run_ends_without_a_warning_from_our_code(smoke_run: Path) -> None:
    stderr = (smoke_run.parent / "train.stderr").read_text()
    ours = [line for line in stderr.splitlines() if "Warning" in line and ("kvcompress" in line or "hydra" in line)]
    assert not ours and "MultirunSummary" not in stderr and "MissingMandatoryValue" not in stderr, ours


def test_a_run_folder_is_evaluated_without_what_it_may_not_set(smoke_run: Path, corpus: Path) -> None:
    """A real run folder records `logger=csv`, `hydra.run.dir`...: those are left out (named in one line) and the
    run still evaluates to its val PPL; a plain `paths.output_dir=<another run>` planted in it is left out too,
    and that run's metrics.json is untouched (the `+`/`++` forms are refused: tests/test_safety.py)."""
    victim = smoke_run.parent / "victim"
    victim.mkdir()
    (victim / "metrics.json").write_text('{"val_ppl": 12.5}')
    planted = smoke_run.parent / "planted"
    planted.mkdir()
    metrics = json.loads((smoke_run / "metrics.json").read_text())
    metrics["overrides"].append(f"paths.output_dir={victim}")
    (planted / "metrics.json").write_text(json.dumps(metrics))
    out = smoke_run.parent / "eval-planted"
    done = _run("kvcompress.eval", [f"ckpt_path={planted}", f"hydra.run.dir={out}"], smoke_run.parent, corpus)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["val_ppl"] == metrics["val_ppl"]
    (line,) = [line for line in done.stdout.splitlines() if "not taken from the run folder" in line]
    assert f"paths.output_dir={victim}" in line and "logger=csv" in line
    assert (victim / "metrics.json").read_text() == '{"val_ppl": 12.5}'


SAME_SCHEMA = ["val_ppl", "val_loss", "val_acc", "val_pos_ppl", "cache", "caches", "tpot_s", "config", "data", "code"]


@pytest.mark.parametrize("form", ["run folder", "weights file"])
def test_eval_reproduces_the_runs_val_ppl_exactly(smoke_run: Path, corpus: Path, form: str) -> None:
    trained = json.loads((smoke_run / "metrics.json").read_text())
    if form == "run folder":
        args = [f"ckpt_path={smoke_run}"]
    else:  # the model and data come from this command
        args = [f"ckpt_path={trained['stages'][-1]['weights']}", *SMOKE, f"data.path={corpus}"]
    out = smoke_run.parent / f"eval-{form.replace(' ', '_')}"
    done = _run("kvcompress.eval", [*args, f"hydra.run.dir={out}", "logger=csv"], smoke_run.parent, corpus)
    assert done.returncode == 0, done.stderr[-3000:]
    evaluated = json.loads((out / "metrics.json").read_text())
    for key in ("val_ppl", "val_loss", "val_acc", "val_pos_ppl"):
        assert evaluated[key] == trained[key], key
    assert evaluated["ckpt_path"].endswith(args[0].split("=", 1)[1])
    assert all(key in evaluated for key in SAME_SCHEMA)
    assert evaluated["cache"]["bytes_per_token"] == trained["cache"]["bytes_per_token"]
    # Per-window records: the same windows and losses as the training run's final validation.
    mine, theirs = load_windows(out), load_windows(smoke_run)
    assert mine.keys() == theirs.keys() and len(mine["ids"]) == 10
    for name in ("ids", "val", "bucket:0-16", "bucket:16-32"):
        np.testing.assert_array_equal(mine[name], theirs[name])
    assert evaluated["windows"]["window_ids_sha256"] == trained["data"]["splits"]["validation"]["window_ids_sha256"]
    assert list((out / "csv").glob("**/metrics.csv")) or list(out.glob("**/metrics.csv"))  # logged like training


def test_a_bad_ckpt_path_fails_naming_it(tmp_path: Path, corpus: Path) -> None:
    (tmp_path / "notes.txt").write_text("not weights")
    for bad in [tmp_path / "missing.ckpt", tmp_path / "notes.txt", tmp_path]:
        done = _run("kvcompress.eval", [f"ckpt_path={bad}", f"hydra.run.dir={tmp_path / 'out'}"], tmp_path, corpus)
        assert done.returncode != 0
        assert "ckpt_path=" in done.stderr + done.stdout
        assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_analysis_notebook_runs_on_a_multirun(tmp_path: Path, corpus: Path) -> None:
    import nbformat
    from nbclient import NotebookClient

    sweep = tmp_path / "multirun"
    args = [
        "-m",
        *SMOKE,
        f"data.path={corpus}",
        "seed=1,2",
        f"hydra.sweep.dir={sweep}",
        f"paths.stage_dir={tmp_path / 's'}",
    ]
    assert _run("kvcompress.train", args, tmp_path, corpus).returncode == 0
    notebook = nbformat.read(Path(__file__).parent.parent / "notebooks" / "analysis.ipynb", as_version=4)
    os.environ["KVC_RESULTS_DIR"] = str(sweep)
    try:
        NotebookClient(
            notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
        ).execute()
    finally:
        del os.environ["KVC_RESULTS_DIR"]
    text = json.dumps(notebook)
    assert "2 runs under" in text and "| configuration | n |" in text and "image/png" in text
