"""The Hydra entry point: config composition, smoke runs, bad input, the CLI and multirun."""

import json
import os
import random
import re
import subprocess
import sys
from fnmatch import fnmatchcase
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException
from omegaconf import open_dict

from kvcompress.models.weights import load_weights
from kvcompress.train import CONF_DIR, train

EXPERIMENTS = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))
WORDS = "the of a model cache key value attention token layer train data loss head rank".split()


@pytest.fixture
def text_file(tmp_path, data_dir) -> Path:
    """A small corpus; the runs still need the offline tokenizer (`data_dir` skips without it)."""
    rng = random.Random(0)
    path = tmp_path / "corpus.txt"
    lines = [" ".join(rng.choice(WORDS) for _ in range(40)) + " ." for _ in range(200)]
    path.write_text("\n".join(lines))
    return path


def compose_cfg(overrides: list[str], tmp_path: Path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.paths.stage_dir = str(tmp_path / "stages")
    return cfg


def smoke(tmp_path, text_file, *extra: str):
    return compose_cfg(
        ["debug=smoke", "data=local", f"data.path={text_file}", f"data.cache_dir={tmp_path / 'cache'}", *extra],
        tmp_path,
    )


def test_smoke_run_writes_metrics_csv_and_wandb(tmp_path, text_file):
    metrics = train(smoke(tmp_path, text_file))
    run = tmp_path / "run"
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["val_ppl"] == pytest.approx(metrics["val_ppl"]) and saved["val_ppl"] > 1
    assert set(saved["val_pos_ppl"]) == {"0-16", "16-32"}
    assert saved["cache"]["bytes_per_token"] == 2 * 2 * 64 * 4  # 2 layers x (K + V) x 64 x fp32
    assert saved["decode_tokens_per_s"] > 0 and saved["params"]["total"] > 0
    assert saved["stages"]["lm"]["trainable_params"] == saved["params"]["total"]
    assert "lm/val_ppl" in (run / "csv" / "metrics.csv").read_text()
    assert list((run / "wandb").glob("offline-run-*")), "W&B offline run files are missing"


def test_second_run_reuses_the_stage(tmp_path, text_file):
    train(smoke(tmp_path, text_file))
    again = train(smoke(tmp_path, text_file))
    assert again["stages"]["lm"]["reused"]
    retrained = train(smoke(tmp_path, text_file, "phase.reuse=false"))
    assert not retrained["stages"]["lm"]["reused"]


def test_seq_len_over_position_limit_fails_before_training(tmp_path, text_file):
    cfg = smoke(tmp_path, text_file, "data.seq_len=300", "+model.overrides.max_position_embeddings=256")
    with pytest.raises(ValueError, match="position limit"):
        train(cfg)
    assert not (tmp_path / "stages").exists()


def test_empty_dataset_fails_before_training(tmp_path, data_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cfg = compose_cfg(["debug=smoke", "data=local", f"data.path={empty}", f"data.cache_dir={tmp_path}"], tmp_path)
    with pytest.raises(ValueError):
        train(cfg)
    assert not (tmp_path / "stages").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("phase.epochs_cap=-1", "phase.epochs_cap must be an integer >= 1"),
        ("phase.stages.lm.max_epochs=-1", "phase.stages.lm.max_epochs must be an integer >= 1"),
        ("phase.stages.lm.max_epochs=0", "phase.stages.lm.max_epochs must be an integer >= 1"),
        ("phase.stages.lm.lr=0", "phase.stages.lm.lr must be a positive number"),
        ("+optimizer.lr=0.01", "optimizer.lr=0.01 would be ignored"),
        ("seed=abc", "seed must be an integer, got 'abc'"),
    ],
)
def test_bad_settings_fail_before_training_naming_the_setting(tmp_path, text_file, override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        train(smoke(tmp_path, text_file, override))
    assert not (tmp_path / "stages").exists() and not (tmp_path / "cache").exists()  # before any data work


def test_binary_data_file_is_named(tmp_path, data_dir):
    binary = tmp_path / "data.bin"
    binary.write_bytes(bytes(range(256)) * 8)
    cfg = compose_cfg(["debug=smoke", "data=local", f"data.path={binary}", f"data.cache_dir={tmp_path}"], tmp_path)
    with pytest.raises(ValueError, match=rf"data file {re.escape(str(binary))} is not UTF-8 text"):
        train(cfg)


def test_run_folders_differ_for_launches_in_the_same_second(tmp_path):
    cfg = compose_cfg([], tmp_path)
    assert cfg.hydra.run.dir.endswith(f"-{os.getpid()}") and cfg.hydra.sweep.dir.endswith(f"-{os.getpid()}")


def test_unknown_choice_gets_hydras_message(tmp_path):
    with pytest.raises(ConfigCompositionException, match="model"):
        compose_cfg(["model=no_such_model"], tmp_path)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment, tmp_path):
    cfg = compose_cfg([f"experiment={experiment}", "debug=smoke"], tmp_path)
    assert cfg.phase.stages and cfg.model.name


def test_cli_multirun_on_shared_data(tmp_path, data_dir):
    env = {**os.environ, "KVCOMPRESS_DATA_DIR": str(data_dir), "KVCOMPRESS_CACHE_DIR": str(tmp_path / "cache")}
    cmd = [
        sys.executable, "-m", "kvcompress.train", "-m", "debug=smoke", "seed=1,2", "logger=csv",
        f"hydra.sweep.dir={tmp_path / 'multirun'}", f"paths.stage_dir={tmp_path / 'stages'}",
    ]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = sorted((tmp_path / "multirun").glob("*/metrics.json"))
    assert len(runs) == 2
    ppls = [json.loads(p.read_text())["val_ppl"] for p in runs]
    assert ppls[0] != ppls[1]  # different seeds, different runs


def stage_state(metrics: dict, stage: str) -> dict:
    return load_weights(metrics["stages"][stage]["weights"])


def assert_frozen_between(metrics: dict, first: str, second: str, frozen: str) -> int:
    """Parameters matching `frozen` are bit-identical in the best checkpoints of two stages."""
    a, b = stage_state(metrics, first), stage_state(metrics, second)
    names = [n for n in a if fnmatchcase(n, frozen)]
    assert names
    for name in names:
        assert torch.equal(a[name], b[name]), name
    return len(names)


def test_vdproj_two_stage_smoke(tmp_path, text_file):
    metrics = train(smoke(tmp_path, text_file, "model=vdproj", "phase=two_stage"))
    recon, lm = metrics["stages"]["recon"], metrics["stages"]["lm"]
    assert recon["val_recon"] > 0 and lm["val_ppl"] > 1
    assert recon["trainable_params"] == lm["frozen_params"]  # exactly the projections, frozen in stage 2
    assert assert_frozen_between(metrics, "recon", "lm", "*_compress.*") > 0
    assert_frozen_between(metrics, "recon", "lm", "*_restore.*")
    assert metrics["cache"]["reduction"] == pytest.approx(1 - (64 + 40) / 128)  # rank 0.625 * 64 = 40


def test_vdproj_end_to_end_smoke(tmp_path, text_file):
    metrics = train(smoke(tmp_path, text_file, "model=vdproj", "phase=end_to_end"))
    assert metrics["stages"]["e2e"]["val_recon"] > 0 and metrics["val_ppl"] > 1


def test_ka_smoke(tmp_path, text_file):
    metrics = train(smoke(tmp_path, text_file, "model=ka"))
    assert metrics["cache"]["kind"] == "native" and metrics["cache"]["reduction"] == 0.0
    assert metrics["decode_tokens_per_s"] > 0


def test_ka_adapter_phase_smoke(tmp_path, text_file):
    overrides = ["model=ka_adapter", "phase=adapter", "cache=ka", "eval.caches=[kv,ka_plain]"]
    metrics = train(smoke(tmp_path, text_file, *overrides, "eval.autoregressive.enabled=true"))
    assert "val_ar_ppl" in metrics["stages"]["adapter"]
    a, b = stage_state(metrics, "base"), stage_state(metrics, "adapter")
    changed = [n for n in a if not torch.equal(a[n], b[n])]
    assert changed and all(".ka_adapter." in n for n in changed)  # the base is bit-identical
    caches = metrics["caches"]
    assert set(caches) == {"ka", "kv", "ka_plain"}
    assert all(c["autoregressive_ppl"] > 1 for c in caches.values())
    assert metrics["parallel_ppl"] > 1 and metrics["autoregressive_ppl"] == caches["ka"]["autoregressive_ppl"]


def test_mka_smoke_trains_base_then_only_the_ka_layer(tmp_path, text_file):
    metrics = train(smoke(tmp_path, text_file, "model=mka", "phase=base_then_frozen_base", "model.init_from=null"))
    mka = metrics["stages"]["mka"]
    assert mka["trainable_params"] == 2 * 64 + 3 * (64 * 64 + 64)  # LayerNorm(64) + 3 x Linear(64, 64)
    assert "start_val_ppl" in mka
    a, b = stage_state(metrics, "base"), stage_state(metrics, "mka")
    changed = [n for n in a if not torch.equal(a[n], b[n])]
    assert changed and all(".attention.mka." in n for n in changed)


def test_mka_without_base_weights_fails_before_training(tmp_path, text_file):
    with pytest.raises(ValueError, match="no base weights"):
        train(smoke(tmp_path, text_file, "model=mka", "phase=frozen_base", "model.init_from=null"))
    with pytest.raises(Exception, match="HF_HUB_OFFLINE"):
        train(smoke(tmp_path, text_file, "model=mka", "phase=frozen_base"))
    assert not (tmp_path / "stages").exists()


def test_cache_that_cannot_serve_the_model_fails_before_training(tmp_path, text_file):
    with pytest.raises(ValueError, match="cannot serve"):
        train(smoke(tmp_path, text_file, "model=vdproj", "cache=ka"))
    with pytest.raises(ValueError, match="cannot serve"):
        train(smoke(tmp_path, text_file, "model=ka", "cache=kv"))
    assert not (tmp_path / "stages").exists()
