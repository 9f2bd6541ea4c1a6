"""`make reproduce`: every run of both scales composes; each claim rule gives "reproduced" on the report's own numbers,
"inconclusive" when the paired CI straddles its threshold and "not reproduced" when it lies on the wrong side;
REPRODUCTION.md prints the deviations; resume reuses runs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvcompress import reproduce
from kvcompress.reproduce import INCONCLUSIVE, NOT_COMPARABLE, NOT_REPRODUCED, REPRODUCED, claims, runs, writer


@pytest.fixture(autouse=True)
def fewer_resamples(monkeypatch: pytest.MonkeyPatch) -> None:
    """The claims' bootstrap with 400 resamples (2,000 in REPRODUCTION.md): the verdicts below are far from a
    boundary the resampling could move."""
    monkeypatch.setattr(claims, "RESAMPLES", 400)


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


@pytest.mark.parametrize("scale", ["mini", "paper"])
def test_every_table_declares_its_deviations_and_thresholds_name_claims(scale: str) -> None:
    protocol = reproduce.load_protocol(scale)
    for table, entry in protocol["tables"].items():
        assert writer.flat(entry.get("deviations")), f"{scale} {table}: no deviations declared"
        ids = {c.id for c in writer.ALL_TABLES[table].claims}
        assert set(entry.get("thresholds") or {}) <= ids, f"{scale} {table}: a threshold names no claim"


def test_mini_protocol_follows_the_reports_where_they_differ(tmp_path: Path) -> None:
    specs = reproduce.plan(reproduce.load_protocol("mini"), ["003", "004", "001"], [0], tmp_path, None)
    config = {(s.table, s.name): reproduce.protocol.compose(s, tmp_path / "stages") for s in specs}
    b003, b004 = config["003", "baseline"], config["004", "baseline"]
    assert (b003.data.batch_size, b003.phase.stages.lm.patience, b003.phase.stages.lm.max_epochs) == (32, 3, 10)
    assert (b004.data.batch_size, b004.phase.stages.lm.patience, b004.phase.stages.lm.max_epochs) == (8, 1, 30)
    assert config["004", "two_stage"].phase.stages.lm.patience == 3  # report 004's logs
    assert config["004", "end_to_end"].phase.stages.e2e.patience == 3
    assert config["001", "mka"].model.attention_kwargs.zero_init is False  # report 001's start
    assert b003.data.eval_seed == b004.data.eval_seed and b003.data.num_val_windows == 1000


def test_the_context_check_joins_every_run(tmp_path: Path) -> None:
    specs = reproduce.plan(reproduce.load_protocol("mini"), ["003", "002"], [0], tmp_path, None)
    assert all("eval.context_check.enabled=true" in s.overrides for s in specs)


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


# --- per-window runs built from the reports' numbers ---------------------------------------------------------------

N, SEEDS = 300, 2
BUCKETS = ["0-16", "16-32", "32-64", "64-96", "96-128"]
TEXT = np.random.default_rng(99).normal(0.0, 0.5, N)
TEXT -= TEXT.mean()  # the windows' own difficulty, shared by every row: pairing cancels it


def losses(ppl: float, seed: int, key: str, noise: float = 0.01) -> np.ndarray:
    """Per-window mean losses whose mean is exactly log(ppl): the report's number, with small per-seed noise."""
    rng = np.random.default_rng([seed, sum(map(ord, key)), int(ppl * 1000) % 100_000])
    e = rng.normal(0.0, noise, N)
    return math.log(ppl) + TEXT + e - e.mean()


def records(seed: int, val: float, buckets: list[float] | None = None, noise: float = 0.01, **more: float):
    """A windows.safetensors-like dict: `val`, `bucket:*` and any `more` (`cache_kv=...` for `cache:kv`)."""
    out: dict[str, np.ndarray] = {"ids": np.arange(N), "val": losses(val, seed, "val", noise)}
    for name, ppl in zip(BUCKETS, buckets or [], strict=False):
        out[f"bucket:{name}"] = losses(ppl, seed, name, noise)
    for key, ppl in more.items():
        out[key.replace("_", ":", 1).replace("ctx:", "context:")] = losses(ppl, seed, key, noise)
    return out


def context(full: float = 100.0, factor: float = 1.2) -> dict[str, float]:
    return {"ctx_full": full, "ctx_last16": full * factor}


def seeds(make) -> list[dict[str, Any]]:
    return [make(s) for s in range(SEEDS)]


def judge(table: str, claim_id: str, runs: claims.Runs) -> claims.Judgement:
    claim = next(c for c in claims.TABLES[table].claims if c.id == claim_id)
    return claim.judge(runs)


FALLING = [159.0, 120.0, 100.0, 92.0, 89.0]


def runs_003(ka: float = 449.3, noise: float = 0.01, ctx: float = 1.2) -> claims.Runs:
    return {
        "baseline": seeds(lambda s: {"_windows": records(s, 442.2, FALLING, **context(factor=ctx))}),
        "ka": seeds(lambda s: {"_windows": records(s, ka, FALLING, noise)}),
    }


def test_claim_003_within_2_percent_by_tost() -> None:
    reproduced = judge("003", "ka_within", runs_003())
    assert reproduced.verdict == REPRODUCED and "1.016 (449.3 / 442.2" in reproduced.report
    assert "TOST" in reproduced.threshold and "[0.980, 1.020]" in reproduced.threshold
    assert reproduced.ours.startswith("KA / standard 1.016 [")
    assert judge("003", "ka_within", runs_003(ka=442.2 * 1.02, noise=0.3)).verdict == INCONCLUSIVE
    assert judge("003", "ka_within", runs_003(ka=442.2 * 1.06)).verdict == NOT_REPRODUCED
    # A protocol's own threshold replaces the default and is named as its source.
    claim = claims.TABLES["003"].claims[0]
    wide = claim.judge(runs_003(ka=442.2 * 1.06), {"ka_within": {"value": 0.1, "why": "a test"}})
    assert wide.verdict == REPRODUCED and "protocol: a test" in wide.threshold


def test_position_claim_needs_a_model_that_uses_context() -> None:
    assert judge("003", "falls_with_position", runs_003()).verdict == REPRODUCED
    flat = judge("003", "falls_with_position", runs_003(ctx=1.0))
    assert flat.verdict == INCONCLUSIVE and "does not use context past 16 tokens" in flat.note
    rising = runs_003()
    rising["ka"] = seeds(lambda s: {"_windows": records(s, 449.3, FALLING[::-1])})
    assert judge("003", "falls_with_position", rising).verdict == NOT_REPRODUCED
    level = runs_003()
    level["ka"] = seeds(lambda s: {"_windows": records(s, 449.3, [100.0] * 5, noise=0.3)})
    assert judge("003", "falls_with_position", level).verdict == INCONCLUSIVE
    assert judge("003", "falls_with_position", {"baseline": [{"_windows": {}}]}).verdict == NOT_COMPARABLE


def test_runs_on_different_windows_are_not_paired() -> None:
    other = runs_003()
    other["ka"][1]["_windows"]["ids"] = np.arange(N) + 5
    verdict = judge("003", "ka_within", other)
    assert verdict.verdict == NOT_COMPARABLE and "different windows" in verdict.note


VDPROJ_BASE, VDPROJ_E2E, VDPROJ_2P = claims.VDPROJ_BASE, claims.VDPROJ_E2E, claims.VDPROJ_2P


def runs_004(two_stage: float = 415.1, final_2p: list[float] | None = None, noise: float = 0.01) -> claims.Runs:
    def run(val: float, stage: str, final: list[float], ctx: bool = False):
        return seeds(
            lambda s: {
                "_windows": records(s, val, **(context() if ctx else {})),
                "_stages": {stage: {"windows_final": records(s, 600.0, final, noise)}},
            }
        )

    return {
        "baseline": run(442.0, "lm", VDPROJ_BASE, ctx=True),
        "end_to_end": run(428.7, "e2e", VDPROJ_E2E),
        "two_stage": run(two_stage, "lm", final_2p or VDPROJ_2P),
    }


def test_claims_004_on_the_matching_checkpoints() -> None:
    order = judge("004", "val_order", runs_004())  # the report's own numbers (the old rule said "not reproduced")
    assert order.verdict == REPRODUCED and "0.968 (415.1 / 428.7)" in order.report
    assert "2-phase / end-to-end: 0.968 [" in order.ours and "end-to-end / baseline: 0.970 [" in order.ours
    assert judge("004", "val_order", runs_004(two_stage=428.7, noise=0.3)).verdict == INCONCLUSIVE
    assert judge("004", "val_order", runs_004(two_stage=460.0)).verdict == NOT_REPRODUCED
    buckets = judge("004", "two_phase_every_bucket", runs_004())
    assert buckets.verdict == REPRODUCED and "final-epoch" in buckets.ours and "in each of 5" in buckets.threshold
    one_tie = [VDPROJ_E2E[0], *VDPROJ_2P[1:]]
    assert judge("004", "two_phase_every_bucket", runs_004(final_2p=one_tie, noise=0.3)).verdict == INCONCLUSIVE
    one_worse = [*VDPROJ_2P[:4], 600.0]
    assert judge("004", "two_phase_every_bucket", runs_004(final_2p=one_worse)).verdict == NOT_REPRODUCED
    assert judge("004", "falls_with_position", runs_004()).verdict == REPRODUCED  # on the final-epoch weights


def runs_000(kv: float = 109.0, plain: float = 1240.3, ka: float = 439.2, noise: float = 0.01) -> claims.Runs:
    caches = {"cache_kv": kv, "cache_ka_plain": plain, "cache_ka": ka}
    return {"ka_adapter": seeds(lambda s: {"_windows": records(s, 100.0, FALLING, noise, **caches, **context())})}


def test_claims_000_pair_the_caches_within_a_run() -> None:
    gap = judge("000", "ka_plain_far_worse", runs_000())
    assert gap.verdict == REPRODUCED and "11.379 (1240.3 / 109)" in gap.report and "protocol default" in gap.threshold
    assert judge("000", "ka_plain_far_worse", runs_000(plain=218.0, noise=0.3)).verdict == INCONCLUSIVE
    assert judge("000", "ka_plain_far_worse", runs_000(plain=130.0)).verdict == NOT_REPRODUCED
    assert judge("000", "adapter_recovers", runs_000()).verdict == REPRODUCED
    assert judge("000", "adapter_recovers", runs_000(ka=109.0, noise=0.3)).verdict == INCONCLUSIVE
    assert judge("000", "adapter_recovers", runs_000(ka=1500.0)).verdict == NOT_REPRODUCED
    assert judge("000", "adapter_diverges", runs_000()).verdict == NOT_COMPARABLE  # no CSV log
    assert judge("000", "falls_with_position", runs_000()).verdict == REPRODUCED


def test_adapter_divergence_is_read_from_the_csv_log(tmp_path: Path) -> None:
    folders = []
    for seed, second in enumerate((450, 380)):
        log = tmp_path / f"seed{seed}" / "csv" / "version_0"
        log.mkdir(parents=True)
        (log / "metrics.csv").write_text(
            "epoch,step,adapter/val_adapter,adapter/val_ar_ppl,base/val_loss\n"
            f"0,10,,,5.0\n0,20,0.5,400,\n1,30,0.3,{second},\n"
        )
        folders.append(tmp_path / f"seed{seed}")
    assert claims.adapter_curve(folders[0]) == [(0.5, 400.0), (0.3, 450.0)]
    one = {"ka_adapter": [{"_folder": str(folders[0])}]}
    assert judge("000", "adapter_diverges", one).verdict == REPRODUCED
    both = {"ka_adapter": [{"_folder": str(f)} for f in folders]}
    assert judge("000", "adapter_diverges", both).verdict == INCONCLUSIVE  # one seed each way
    assert judge("000", "adapter_diverges", {"ka_adapter": both["ka_adapter"][1:]}).verdict == NOT_REPRODUCED


def runs_001(mka: list[float] | None = None, noise: float = 0.01) -> claims.Runs:
    mka = mka or claims.MKA
    return {
        "mka": seeds(
            lambda s: {
                "_windows": records(s, 32.9, mka, noise, **context()),
                "_stages": {"mka": {"windows_base": records(s, 26.6, claims.MKA_BASE)}},
            }
        )
    }


def test_claims_001_pair_mka_with_its_frozen_base() -> None:
    worse = judge("001", "mka_worse", runs_001())
    assert worse.verdict == REPRODUCED and "1.237 (32.9 / 26.6)" in worse.report and "in each of 6" in worse.threshold
    tie = [claims.MKA_BASE[0], *claims.MKA[1:]]
    assert judge("001", "mka_worse", runs_001(mka=tie, noise=0.3)).verdict == INCONCLUSIVE
    better = [*claims.MKA[:4], 15.0]
    assert judge("001", "mka_worse", runs_001(mka=better)).verdict == NOT_REPRODUCED
    assert judge("001", "falls_with_position", runs_001()).verdict == REPRODUCED  # base and MKA rows


def runs_002(before: float = 2763.69, after: float = 668.08, shallow: float = 0.704, noise: float = 0.05):
    def seed(s: int) -> dict[str, Any]:
        rng = np.random.default_rng(s)
        hard = rng.random((N, 32)) < 0.5
        take = np.zeros((N, 32), dtype=np.uint8)
        take[:, : round(32 * shallow)] = 1  # the same share in every window
        before_t = math.log(before) + rng.normal(0, noise, (N, 32))
        after_t = math.log(after) + rng.normal(0, noise, (N, 32))
        return {
            "stages": [{"name": "deep", "threshold_from": "mining", "shallow_ratio": shallow}],
            "_windows": records(s, 829.78, [900.0, 780.0], **context()),
            "_stages": {
                "shallow": {"hard_examples": {"val_hard": hard.astype(np.uint8), "val_loss_before": before_t}},
                "deep": {"calibration": {"ids": np.arange(N), "val_loss_deep": after_t, "val_take_shallow": take}},
            },
        }

    return {"lego": seeds(seed)}


def test_claims_002_pair_hard_tokens_before_and_after() -> None:
    drop = judge("002", "hard_ppl_drops", runs_002())
    assert drop.verdict == REPRODUCED and "0.242 (668.08 / 2763.69)" in drop.report
    assert "hard-token PPL after / before: 0.24" in drop.ours
    assert judge("002", "hard_ppl_drops", runs_002(after=2763.69 / 2, noise=3.0)).verdict == INCONCLUSIVE
    assert judge("002", "hard_ppl_drops", runs_002(after=2500.0)).verdict == NOT_REPRODUCED
    share = judge("002", "shallow_above_target", runs_002())
    assert share.verdict == REPRODUCED and "shallow share on validation 71.9%" in share.ours  # 23 of 32 tokens
    assert judge("002", "shallow_above_target", runs_002(shallow=0.3)).verdict == NOT_REPRODUCED
    calibrated_after = runs_002()
    for seed in calibrated_after["lego"]:
        seed["stages"][0]["threshold_from"] = "deep"
    assert judge("002", "shallow_above_target", calibrated_after).verdict == NOT_COMPARABLE
    assert judge("002", "falls_with_position", runs_002()).verdict == REPRODUCED


def test_straddling_share_is_inconclusive() -> None:
    runs = runs_002()
    for seed in runs["lego"]:  # half the windows all shallow, half all deep: a mean of 50%, wide
        take = np.zeros((N, 32), dtype=np.uint8)
        take[: N // 2] = 1
        seed["_stages"]["deep"]["calibration"]["val_take_shallow"] = take
    assert judge("002", "shallow_above_target", runs).verdict == INCONCLUSIVE


# --- REPRODUCTION.md ---------------------------------------------------------------------------------------------


def test_reproduction_prints_each_claims_fields_and_the_deviations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    protocol = reproduce.load_protocol("mini")
    specs = reproduce.plan(protocol, ["003"], [0, 1], tmp_path, None)
    synthetic = runs_003()
    for spec in specs:
        spec.folder.mkdir(parents=True)
        metrics = {"val_ppl": 442.2 if spec.name == "baseline" else 449.3, "stages": []}
        (spec.folder / "metrics.json").write_text(json.dumps(metrics))
        (spec.folder / runs.RUN_FILE).write_text(json.dumps({"overrides": list(spec.overrides), "seconds": 60}))
    by_folder = {str(s.folder): synthetic[s.name][s.seed]["_windows"] for s in specs}
    monkeypatch.setattr(writer, "run_windows", lambda folder: by_folder[str(folder)])
    monkeypatch.setattr(writer, "table_plots", lambda *a: {})
    path = writer.write_reproduction(tmp_path, protocol, specs, {s: ("reused", 0.0) for s in specs}, None, 1.0)
    text = path.read_text()
    assert "| KA-Attention is within ~2% of standard attention (val PPL) | **reproduced** | KA / standard 1.016" in text
    assert "protocol: the report calls +1.6% 'comparable'" in text  # the threshold's source, from the protocol
    assert "Deviations from the report (this protocol):" in text
    for deviation in writer.flat(protocol["tables"]["003"]["deviations"]):
        assert f"- {deviation}" in text
    assert "Changed versus the previous protocol" in text and "hierarchical paired bootstrap" in text


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


def test_an_interrupted_run_is_stopped_once_and_given_time_to_save(tmp_path: Path) -> None:
    """`stop` passes one Ctrl-C to the run and waits while it saves (subprocess.call would kill it after 0.25 s)."""
    import subprocess
    import sys

    saved, ready = tmp_path / "saved", tmp_path / "ready"
    child = (
        "import signal, sys, time, pathlib\n"
        "def save(*_):\n"
        "    signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C would stop it unsaved\n"
        f"    time.sleep(1.0); pathlib.Path({str(saved)!r}).write_text('last.ckpt'); sys.exit(130)\n"
        "signal.signal(signal.SIGINT, save)\n"
        f"pathlib.Path({str(ready)!r}).touch()\n"
        "time.sleep(60)\n"
    )
    run = subprocess.Popen([sys.executable, "-c", child], start_new_session=True)
    while not ready.exists():
        assert run.poll() is None
    assert runs.stop(run, grace_s=30) == 130
    assert saved.read_text() == "last.ckpt"


def test_a_run_that_ignores_its_ctrl_c_is_killed_after_the_grace_period(tmp_path: Path) -> None:
    import subprocess
    import sys

    ready = tmp_path / "ready"
    child = (
        "import signal, time, pathlib\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        f"pathlib.Path({str(ready)!r}).touch()\ntime.sleep(60)\n"
    )
    run = subprocess.Popen([sys.executable, "-c", child], start_new_session=True)
    while not ready.exists():
        assert run.poll() is None
    assert runs.stop(run, grace_s=0.5) == -9


def test_an_interrupted_reproduce_says_how_to_resume_in_one_line(tmp_path, monkeypatch, capsys) -> None:
    from kvcompress.reproduce import cli

    def interrupted(*args: Any) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_all", interrupted)
    assert cli.main(["--tables", "003", "--out", str(tmp_path / "out")]) == 130
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "the same command resumes" in err and "Traceback" not in err
