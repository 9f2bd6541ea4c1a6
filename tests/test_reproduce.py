"""`make reproduce`: every run of both scales composes, the claims are judged from metrics, resume reuses runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvcompress import reproduce
from kvcompress.reproduce import NOT_COMPARABLE, NOT_REPRODUCED, REPRODUCED, claims, runs


@pytest.mark.parametrize("scale", ["mini", "paper"])
def test_dry_run_composes_every_run_of_every_table(
    scale: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert reproduce.main(["--scale", scale, "--dry-run", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    protocol = reproduce.load_protocol(scale)
    n_runs = sum(len(t["runs"]) for t in protocol["tables"].values()) * len(protocol["seeds"])
    assert f"{n_runs} runs compose" in out
    for table in ("000", "001", "002", "003", "004"):
        assert f"\n{table} " in "\n" + out
    assert not list(tmp_path.iterdir())  # a dry run writes nothing


def test_mini_runs_use_the_trained_tokenizer(tmp_path: Path) -> None:
    specs = reproduce.plan(reproduce.load_protocol("mini"), ["002", "003"], [0], tmp_path, tmp_path / "tok.json")
    by_name = {s.name: s for s in specs}
    assert f"data.tokenizer={tmp_path / 'tok.json'}" in by_name["baseline"].overrides
    assert f"data.tokenizer={tmp_path / 'tok.json'}" in by_name["lego"].overrides
    assert by_name["ka"].folder == tmp_path / "003" / "ka" / "seed0"


def test_unknown_table_and_scale_are_named() -> None:
    with pytest.raises(ValueError, match="--tables: no table '009'"):
        reproduce.plan(reproduce.load_protocol("mini"), ["009"], [0], Path("x"), None)
    with pytest.raises(ValueError, match="--scale 'huge'"):
        reproduce.load_protocol("huge")


def _metrics(val_ppl: float, pos: list[float], **extra: object) -> dict[str, object]:
    buckets = ["0-16", "16-32", "32-64"]
    return {"val_ppl": val_ppl, "val_pos_ppl": dict(zip(buckets, pos, strict=True)), **extra}


def test_claims_are_judged_from_the_seed_means() -> None:
    ka_close = {"baseline": [_metrics(100, [3, 2, 1]), _metrics(102, [3, 2, 1])], "ka": [_metrics(102, [3, 2, 1])]}
    assert claims._claim_003(ka_close)[0] == REPRODUCED
    ka_far = {**ka_close, "ka": [_metrics(110, [3, 2, 1])]}
    verdict, evidence = claims._claim_003(ka_far)
    assert verdict == NOT_REPRODUCED and "+8.9%" in evidence
    assert claims._pos_falls(ka_close)[0] == REPRODUCED
    assert claims._pos_falls({"baseline": [_metrics(1, [3, 4, 1])]})[0] == NOT_REPRODUCED

    order = {  # 2-phase <= end-to-end <= baseline in every bucket, except one
        "two_stage": [_metrics(90, [9, 5, 3])],
        "end_to_end": [_metrics(95, [10, 6, 4])],
        "baseline": [_metrics(99, [11, 7, 3.5])],
    }
    verdict, evidence = claims._claim_004(order)
    assert verdict == NOT_REPRODUCED and "two_stage 90.0 ≤ end_to_end 95.0 ≤ baseline 99.0" in evidence

    caches = {
        "caches": {
            "kv": {"autoregressive_ppl": 100},
            "ka_plain": {"autoregressive_ppl": 900},
            "ka": {"autoregressive_ppl": 300},
        }
    }
    runs = {"ka_adapter": [_metrics(1, [1, 1, 1], **caches)]}
    assert claims._claim_000_gap(runs)[0] == REPRODUCED
    verdict, evidence = claims._claim_000_recovers(runs)
    assert verdict == REPRODUCED and "recovers 75% of the gap" in evidence
    assert claims._claim_000_diverge(runs)[0] == NOT_COMPARABLE  # no CSV log
    assert claims._claim_002_hard({"lego": [{}]})[0] == NOT_COMPARABLE
    lego = {
        "lego": [
            {
                "stages": [
                    {"name": "shallow", "hard_ppl_before": 2000},
                    {"name": "deep", "hard_ppl_after": 700, "shallow_ratio": 0.5},
                ],
                "lego_decode": {"recompute": {"shallow_share": 0.75}},
            }
        ]
    }
    assert claims._claim_002_hard(lego)[0] == REPRODUCED
    assert claims._claim_002_ratio(lego)[0] == REPRODUCED  # the held-out share, not the calibrated 50%


def test_adapter_divergence_is_read_from_the_csv_log(tmp_path: Path) -> None:
    log = tmp_path / "csv" / "version_0"
    log.mkdir(parents=True)
    (log / "metrics.csv").write_text(
        "epoch,step,adapter/val_adapter,adapter/val_ar_ppl,base/val_loss\n0,10,,,5.0\n0,20,0.5,400,\n1,30,0.3,450,\n"
    )
    assert claims.adapter_curve(tmp_path) == [(0.5, 400.0), (0.3, 450.0)]
    runs = {"ka_adapter": [{"_folder": str(tmp_path)}]}
    assert claims._claim_000_diverge(runs)[0] == REPRODUCED


def test_a_finished_run_is_reused_only_with_the_same_overrides(tmp_path: Path) -> None:
    spec = reproduce.RunSpec("003", "ka", 0, ("experiment=report003_ka",), tmp_path / "run")
    spec.folder.mkdir()
    (spec.folder / "metrics.json").write_text("{}")
    assert not runs.finished(spec)  # no record of what trained it
    (spec.folder / runs.RUN_FILE).write_text(json.dumps({"overrides": ["experiment=report003_ka"]}))
    assert runs.finished(spec)
    assert runs.execute(spec, tmp_path / "stages") == ("reused", 0.0)
    changed = reproduce.RunSpec("003", "ka", 0, ("experiment=report003_ka", "data.seq_len=64"), spec.folder)
    assert not runs.finished(changed)
