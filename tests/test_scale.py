"""Beyond one process: DDP through Lightning (2 CPU processes, gloo), the submitit launchers, Optuna sweeps."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from kvcompress.run import CONF_DIR


def train_cli(
    root: Path, corpus: Path, *overrides: str, multirun: bool = False, returncode: int = 0
) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "kvcompress.train", *(["-m"] if multirun else []), "debug=smoke", "logger=csv",
        "data=local", f"data.path={corpus}", f"data.cache_dir={corpus.parent / 'cache'}",
        f"paths.stage_dir={root / 'stages'}", f"hydra.run.dir={root / 'run'}", f"hydra.sweep.dir={root / 'sweep'}",
        *overrides,
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=root)
    assert done.returncode == returncode, done.stderr[-4000:]
    return done


def metrics(root: Path) -> dict:
    return json.loads((root / "run" / "metrics.json").read_text())


def compose_hydra(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def test_scale_out_configs_compose():
    ddp = compose_hydra(["trainer=ddp"]).trainer
    assert ddp.strategy == "ddp" and ddp.use_distributed_sampler is False
    fsdp = compose_hydra(["trainer=fsdp"]).trainer
    assert fsdp.strategy._target_.endswith("FSDPStrategy") and fsdp.strategy.state_dict_type == "full"
    slurm = compose_hydra(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=60"])
    launcher = slurm.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.partition == "gpu" and launcher.timeout_min == 60
    assert compose_hydra(["hydra/launcher=local"]).hydra.launcher._target_.endswith("LocalLauncher")
    search = compose_hydra(["hparams_search=vdproj_optuna"])
    assert search.hydra.sweeper._target_.endswith("OptunaSweeper") and search.cache_budget == 0.8
    assert search.model.attention == "vdproj" and "model.attention_kwargs.rank" in search.hydra.sweeper.params


def test_over_budget_cache_scores_inf():
    from omegaconf import OmegaConf

    from kvcompress.run import objective

    cache = {"bytes_per_token": 900.0, "kv_bytes_per_token": 1000.0}
    assert objective(OmegaConf.create({"cache_budget": 0.8}), {"val_ppl": 5.0, "cache": cache}) == float("inf")
    assert objective(OmegaConf.create({"cache_budget": 0.95}), {"val_ppl": 5.0, "cache": cache}) == 5.0
    assert objective(OmegaConf.create({}), {"val_ppl": 5.0, "cache": cache}) == 5.0


def test_epoch_order_shards_add_up_to_one_process_batches():
    from kvcompress.data.datamodule import EpochOrder

    one = EpochOrder(10, seed=3, shuffle=True)
    one.set_epoch(2)
    shards = [EpochOrder(10, seed=3, shuffle=True, rank=r, num_replicas=2) for r in range(2)]
    for s in shards:
        s.set_epoch(2)
    orders = [s.order() for s in shards]
    assert [len(o) for o in orders] == [5, 5]
    whole = one.order()
    for i in range(0, 10, 4):  # global batch i of 4 = the ranks' batches i of 2
        assert sorted(whole[i : i + 4]) == sorted(orders[0][i // 2 : i // 2 + 2] + orders[1][i // 2 : i // 2 + 2])
    odd = [EpochOrder(5, 0, False, r, 2).order() for r in range(2)]
    assert odd == [[0, 2, 4], [1, 3, 0]]  # padded like DistributedSampler


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process_with_the_same_global_batch(tmp_path, corpus):
    """2 CPU processes x batch 8 vs 1 process x batch 16: same windows per step, same val windows."""
    (tmp_path / "ddp").mkdir(), (tmp_path / "one").mkdir()
    learn = ["phase.epochs_cap=2", "phase.stages.lm.lr=3e-3"]  # enough steps for the weights to move
    train_cli(tmp_path / "ddp", corpus, "trainer=ddp", "data.batch_size=8", *learn)
    train_cli(tmp_path / "one", corpus, "trainer=cpu", "data.batch_size=16", *learn)
    ddp, one = metrics(tmp_path / "ddp"), metrics(tmp_path / "one")
    assert one["val_ppl"] < 20_000 and one["val_acc"] > 0.01  # it learned (untrained: ~47,600 and 0)
    for key in ("val_loss", "val_ppl", "val_acc"):
        assert ddp[key] == pytest.approx(one[key], rel=1e-5), key
    for bucket, ppl in one["val_pos_ppl"].items():
        assert ddp["val_pos_ppl"][bucket] == pytest.approx(ppl, rel=1e-5)
    # Per-window records gathered over the ranks: every window once, as one process scores it.
    from kvcompress.evaluation.windows import load_windows

    records = [load_windows(tmp_path / name / "run") for name in ("ddp", "one")]
    assert (
        records[0].keys() == records[1].keys()
        and len(records[0]["ids"]) == ddp["data"]["splits"]["validation"]["windows_used"]
    )
    for name in records[1]:
        np.testing.assert_allclose(records[0][name], records[1][name], rtol=1e-5, err_msg=name)
    # Only rank 0 wrote: one metrics.json, one stage folder with one done.json.
    assert [p.name for p in (tmp_path / "ddp" / "stages").iterdir() if p.is_dir()][0].startswith("lm-")
    assert len(list((tmp_path / "ddp" / "stages").rglob("done.json"))) == 1


@pytest.mark.slow
@pytest.mark.parametrize(
    "method",
    [
        ["model=vdproj", "phase=two_stage"],
        ["model=ka_adapter", "phase=adapter", "cache=ka", "eval.autoregressive.enabled=true"],
        ["model=mka", "phase=base_then_frozen_base", "model.init_from=null"],
        ["model=lego", "phase=lego", "eval.extra={}"],  # mining and calibration see all data on every rank
    ],
    ids=["vdproj_two_stage", "ka_adapter", "mka", "lego"],
)
def test_ddp_runs_each_method_phases_and_reuses_them(tmp_path, corpus, method):
    train_cli(tmp_path, corpus, "trainer=ddp", *method)
    first = metrics(tmp_path)
    train_cli(tmp_path, corpus, "trainer=ddp", *method)  # every stage reused: validation only, on both ranks
    again = metrics(tmp_path)
    assert all(s["reused"] for s in again["stages"])
    assert again["val_ppl"] == pytest.approx(first["val_ppl"], rel=1e-6)


@pytest.mark.slow
def test_submitit_local_runs_a_two_job_multirun(tmp_path, corpus):
    train_cli(tmp_path, corpus, "hydra/launcher=local", "seed=1,2", multirun=True)
    ppls = [json.loads((tmp_path / "sweep" / str(i) / "metrics.json").read_text())["val_ppl"] for i in (0, 1)]
    assert ppls[0] != ppls[1]


@pytest.mark.slow
def test_optuna_three_trial_smoke_search(tmp_path, corpus):
    train_cli(tmp_path, corpus, "hparams_search=vdproj_optuna", "hydra.sweeper.n_trials=3")
    results = (tmp_path / "sweep" / "optimization_results.yaml").read_text()
    assert "best_params" in results and "best_value" in results
    assert len(list((tmp_path / "sweep").glob("*/metrics.json"))) == 3


def assert_first_job_failed_alone(sweep: Path) -> None:
    """Job 0 failed (its train.log says why, the summary names it); job 1 still ran to its metrics.json."""
    assert not (sweep / "0" / "metrics.json").exists()
    assert "max_position_embeddings" in (sweep / "0" / "train.log").read_text()
    assert json.loads((sweep / "1" / "metrics.json").read_text())["val_ppl"] > 1
    summary = (sweep / "summary.txt").read_text()
    assert "job 0: failed" in summary and "job 1: ok" in summary


def test_a_failing_job_does_not_stop_or_poison_the_next(tmp_path, corpus):
    train_cli(tmp_path, corpus, "data.seq_len=3000,32", multirun=True, returncode=1)
    assert_first_job_failed_alone(tmp_path / "sweep")


@pytest.mark.slow
def test_a_failing_job_does_not_stop_a_submitit_sweep(tmp_path, corpus):
    train_cli(tmp_path, corpus, "hydra/launcher=local", "data.seq_len=3000,32", multirun=True, returncode=1)
    assert_first_job_failed_alone(tmp_path / "sweep")
