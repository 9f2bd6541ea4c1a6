"""`python -m kvcompress.report`: mean ± std over seeds per configuration, CSV, PNGs, failed runs named."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

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
