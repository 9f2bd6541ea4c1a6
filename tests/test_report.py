"""`python -m kvcompress.report`: mean ± std over seeds per configuration, CSV, PNGs, failed runs named."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
from test_eval_cli import SMOKE, _run

from kvcompress.evaluation import plots, report

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    root = tmp_path_factory.mktemp("report")
    args = ["-m", *SMOKE, f"data.path={corpus}", "seed=1,2", "data.batch_size=4,8"]
    done = _run(
        "kvcompress.train", [*args, f"hydra.sweep.dir={root / 'm'}", f"paths.stage_dir={root / 's'}"], root, corpus
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "m"


def test_report_aggregates_seeds_per_configuration(sweep: Path) -> None:
    out = sweep / "report"
    assert report.main([str(sweep), "--out", str(out)]) == 0
    runs = report.load_runs([sweep])
    rows = report.aggregate(runs)
    assert len(runs) == 4 and [row.n for row in rows] == [2, 2]  # 2 configurations x 2 seeds
    for row in rows:
        ppls = [r.metrics["val_ppl"] for r in runs if r.label == row.label]
        assert row.mean("val_ppl") == pytest.approx(statistics.fmean(ppls))
        assert row.std("val_ppl") == pytest.approx(statistics.stdev(ppls))
        assert "seed=" not in row.label and "data.batch_size=" in row.label
    table = (out / "report.md").read_text()
    assert f"{rows[0].mean('val_ppl'):.1f} ± {rows[0].std('val_ppl'):.1f}" in table
    with open(out / "report.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["n"] for r in csv_rows] == ["2", "2"]
    one = report.csv_text(report.aggregate(runs[:1])).splitlines()[1].split(",")
    assert one[1] == "1" and "" in one and "nan" not in one  # n=1: the std cells are blank
    assert float(csv_rows[0]["val_ppl_std"]) == pytest.approx(rows[0].std("val_ppl"), rel=1e-5)
    for name in ("position_ppl", "ppl_vs_bytes", "tpot", "training_curves"):
        assert (out / f"{name}.png").read_bytes().startswith(PNG)


def test_a_failed_job_is_skipped_and_named(sweep: Path, tmp_path: Path) -> None:
    failed = tmp_path / "9"
    failed.mkdir()
    (failed / "failure.txt").write_text("ValueError: bad\n")
    runs = report.load_runs([sweep, tmp_path])
    assert len(runs) == 4
    written = report.write_report(runs, tmp_path / "out", failed=report.find_run_folders([tmp_path])[1])
    assert f"Failed runs (no metrics.json): `{failed}`" in written["markdown"].read_text()


def test_pareto_front_keeps_points_not_beaten_on_bytes_and_ppl() -> None:
    points = [(100.0, 50.0), (50.0, 60.0), (80.0, 70.0), (200.0, 40.0), (60.0, 55.0)]
    assert plots.pareto_front(points) == [(50.0, 60.0), (60.0, 55.0), (100.0, 50.0), (200.0, 40.0)]


def test_flatten_names_stages_and_caches() -> None:
    metrics = {"val_ppl": 3.0, "stages": [{"name": "lm", "val_ppl": 4.0}], "caches": {"int8": {"tpot_s": 0.5}}}
    assert report.flatten(json.loads(json.dumps(metrics))) == {
        "val_ppl": 3.0, "stages.lm.val_ppl": 4.0, "caches.int8.tpot_s": 0.5,
    }  # fmt: skip


# --- integrity: groups, diverged seeds, train_on_test, unreadable records, the report as one set -------------------


def hand_runs(root: Path, values: dict[str, list[float]], **kw) -> list[Path]:
    """Hand-built run folders: per configuration name, one run per val PPL (seeds 0, 1, ...)."""
    from test_compare import fake_run

    folders = []
    for name, ppls in values.items():
        for seed, ppl in enumerate(ppls):
            val = np.full(4, math.log(ppl) if math.isfinite(ppl) else ppl)
            folders.append(
                fake_run(
                    root / name / str(seed),
                    val,
                    seed=seed,
                    overrides=[f"model={name}"],
                    config={"model": {"name": name}},
                    val_ppl=ppl,
                    **kw,
                )
            )
    return folders


def test_nan_and_inf_seeds_are_counted_and_flagged(tmp_path: Path) -> None:
    hand_runs(tmp_path, {"x": [100.0, 200.0, math.nan], "y": [math.inf, math.inf], "z": [50.0]})
    rows = {row.label.split()[0]: row for row in report.aggregate(report.load_runs([tmp_path]))}
    x, y, z = rows["model=x"], rows["model=y"], rows["model=z"]
    assert (x.n, x.diverged, x.n_text()) == (3, 1, "3 (1 diverged)")
    assert x.mean("val_ppl") == pytest.approx(150.0)
    assert x.text("val_ppl") == "150.0 ± 70.7 (1 of 3 diverged)"
    assert y.text("val_ppl") == "diverged" and y.n_text() == "2 (2 diverged)"
    assert z.text("val_ppl") == "50.0" and z.text("autoregressive_ppl") == "—"  # not measured
    table = report.markdown(list(rows.values()))
    assert "| `model=y` | 2 (2 diverged) | diverged |" in table
    csv_rows = {r["configuration"]: r for r in csv.DictReader(io.StringIO(report.csv_text(list(rows.values()))))}
    assert csv_rows["model=x"]["diverged"] == "1" and csv_rows["model=x"]["val_ppl_diverged"] == "1"
    assert csv_rows["model=y"]["val_ppl_mean"] == "" and csv_rows["model=z"]["val_ppl_diverged"] == "0"


def test_runs_on_different_data_are_not_pooled(tmp_path: Path) -> None:
    """The same overrides and seeds on two corpora (or tokenizers) are two rows, told apart in their labels."""
    hand_runs(tmp_path / "one", {"x": [100.0, 110.0]})
    hand_runs(tmp_path / "two", {"x": [300.0, 310.0]}, origin="/data/other.txt")
    hand_runs(tmp_path / "three", {"x": [400.0]}, tokenizer="cd" * 32)
    rows = report.aggregate(report.load_runs([tmp_path]))
    assert sorted(row.n for row in rows) == [1, 2, 2]
    assert sorted(row.mean("val_ppl") for row in rows) == [105.0, 305.0, 400.0]
    labels = [row.label for row in rows]
    assert len(set(labels)) == 3 and all(label.startswith("model=x [data: ") for label in labels)
    assert any("other.txt" in label for label in labels)


def test_train_on_test_is_in_every_table_made_from_such_runs(tmp_path: Path) -> None:
    hand_runs(tmp_path / "a", {"x": [100.0, 110.0]}, train_on_test=True)
    hand_runs(tmp_path / "b", {"y": [100.0]})
    written = report.write_report(report.load_runs([tmp_path]), tmp_path / "out")
    table = written["markdown"].read_text()
    assert table.startswith("**train_on_test: these runs trained on a test split**") and "`model=x` (2 of 2)" in table
    with open(written["csv"]) as f:
        flags = {r["configuration"]: r["train_on_test"] for r in csv.DictReader(f)}
    assert flags == {"model=x": "2", "model=y": "0"}
    clean = report.markdown(report.aggregate(report.load_runs([tmp_path / "b"])))
    assert "train_on_test" not in clean


def test_an_unreadable_metrics_json_is_skipped_with_a_warning_naming_it(tmp_path: Path, capsys) -> None:
    good, bad = hand_runs(tmp_path, {"x": [100.0, 110.0]})
    text = (bad / "metrics.json").read_text()
    (bad / "metrics.json").write_text(text[: len(text) // 2])  # truncated
    assert report.main([str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert f"skipping {bad / 'metrics.json'}" in err
    table = (tmp_path / "out" / "report.md").read_text()
    assert "| `model=x` | 1 |" in table and f"Skipped (unreadable metrics.json): `{bad / 'metrics.json'}`" in table


REPORT_SET = ("report.md", "report.csv", "position_ppl.png", "ppl_vs_bytes.png", "tpot.png", "training_curves.png")


def report_set(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in REPORT_SET}


def test_a_failed_report_leaves_the_previous_set_whole(tmp_path: Path, monkeypatch) -> None:
    hand_runs(tmp_path / "runs", {"x": [100.0]})
    out = tmp_path / "runs" / "report"
    report.write_report(report.load_runs([tmp_path / "runs"]), out)
    before = report_set(out)
    hand_runs(tmp_path / "runs", {"y": [120.0]})

    def boom(*args, **kwargs):
        raise RuntimeError("plot failed")

    monkeypatch.setattr(plots, "plot_tpot", boom)  # after the new table and two plots are written
    with pytest.raises(RuntimeError, match="plot failed"):
        report.write_report(report.load_runs([tmp_path / "runs"]), out)
    assert report_set(out) == before and sorted(p.name for p in out.iterdir()) == sorted(REPORT_SET)
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []  # no half-written set left
    with pytest.raises(FileExistsError, match="not a report folder"):
        report.write_report(report.load_runs([tmp_path / "runs"]), tmp_path / "runs" / "x")


KILLED_WRITER = """
import os, signal, sys, time
from pathlib import Path
from kvcompress.evaluation import plots, report

def stall(*args, **kwargs):  # the new table is written; die before the plots
    Path(sys.argv[2]).write_text("writing")
    time.sleep(60)

plots.plot_ppl_vs_bytes = stall
report.write_report(report.load_runs([sys.argv[1]]), Path(sys.argv[1]) / "report")
"""


def test_a_report_killed_mid_write_leaves_the_previous_set_whole(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    runs = tmp_path / "runs"
    hand_runs(runs, {"x": [100.0]})
    out = runs / "report"
    report.write_report(report.load_runs([runs]), out)
    before = report_set(out)
    hand_runs(runs, {"y": [120.0]})
    marker = tmp_path / "marker"
    script = tmp_path / "writer.py"
    script.write_text(KILLED_WRITER)
    proc = subprocess.Popen([sys.executable, str(script), str(runs), str(marker)])
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.exists(), "the writer did not reach the plots"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert report_set(out) == before  # the old table and plots, not the new table
    assert any(p.name.endswith(report.STAGING_SUFFIX) for p in runs.iterdir())  # the killed writer's set
    written = report.write_report(report.load_runs([runs]), out)  # the next report cleans it up
    assert "model=y" in written["markdown"].read_text() and report_set(out) != before
    assert not any(p.name.endswith(report.STAGING_SUFFIX) for p in runs.iterdir())


def test_report_wandb_run_joins_the_sweeps_group_with_its_config_and_tags(sweep: Path, tmp_path: Path) -> None:
    from helpers import wandb_offline_run

    out = tmp_path / "report"
    assert report.main([str(sweep), "--out", str(out), "--wandb"]) == 0
    run = wandb_offline_run(out)
    assert run["group"] == f"train/{sweep.name}"  # the runs' own W&B group (a multirun: task/sweep folder)
    assert run["name"] == f"report:train/{sweep.name} (2 configurations, 4 runs)"
    assert {"report", "pythia-70m", "standard", "local"} <= set(run["tags"])
    assert run["config"]["configurations"] == {"batch_size=4": 2, "batch_size=8": 2}
    assert len(run["config"]["runs"]) == 4 and "debug=smoke" in run["config"]["common_settings"]
