"""The Hydra entry point: config composition, smoke runs, bad input, the CLI and multirun."""

import csv
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time
from fnmatch import fnmatchcase
from pathlib import Path

import pytest
import torch
from helpers import train_tokenizer, wandb_offline_run
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException
from omegaconf import open_dict
from safetensors.torch import load_file

from kvcompress.models.weights import load_weights
from kvcompress.run import CONF_DIR, train

EXPERIMENTS = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))
WORDS = "the of a model cache key value attention token layer train data loss head rank".split()


@pytest.fixture
def text_file(tmp_path) -> Path:
    """A small corpus, with a tiny tokenizer trained on it beside it (`tokenizer.json`): no offline data needed."""
    rng = random.Random(0)
    path = tmp_path / "corpus.txt"
    lines = [" ".join(rng.choice(WORDS) for _ in range(40)) + " ." for _ in range(200)]
    path.write_text("\n".join(lines))
    train_tokenizer(lines[:50], tmp_path / "tokenizer.json", vocab_size=300)
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
        [
            "debug=smoke",
            "data=local",
            f"data.path={text_file}",
            f"data.tokenizer={text_file.with_name('tokenizer.json')}",
            f"data.cache_dir={tmp_path / 'cache'}",
            *extra,
        ],
        tmp_path,
    )


RECORD_KEYS = {"config", "overrides", "data", "code", "versions", "device"}


def read_csv(run: Path) -> list[dict]:
    with open(run / "csv" / "metrics.csv") as f:
        return [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def test_smoke_run_writes_metrics_csv_and_wandb(tmp_path, text_file):
    metrics = train(smoke(tmp_path, text_file, "tags=[mytag]"))
    run = tmp_path / "run"
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["val_ppl"] == pytest.approx(metrics["val_ppl"]) and saved["val_ppl"] > 1
    assert set(saved["val_pos_ppl"]) == {"0-16", "16-32"}
    assert saved["cache"]["bytes_per_token"] == 2 * 2 * 64 * 4  # 2 layers x (K + V) x 64 x fp32
    assert saved["decode_tokens_per_s"] > 0 and saved["params"]["total"] > 0
    assert stage(saved, "lm")["trainable_params"] == saved["params"]["total"]
    assert list((run / "wandb").glob("offline-run-*")), "W&B offline run files are missing"
    assert oct((run / "metrics.json").stat().st_mode & 0o777) == oct(0o644)  # world-readable, not mkstemp's 0600

    # The run record: resolved config and overrides, data origin, code, versions, device.
    assert RECORD_KEYS <= set(saved)
    assert saved["config"]["model"]["overrides"]["n_embd"] == 64 and saved["config"]["seed"] == 42
    assert "debug=smoke" in saved["overrides"] and "tags=[mytag]" in saved["overrides"]
    data = saved["data"]
    for split in ("train", "validation"):
        record = data["splits"][split]
        assert record["file"] == str(text_file) and record["split_used"] == "corpus"
        assert record["tokens"] > record["tokens_used"] > 0 and record["windows"] >= record["windows_used"] > 0
    assert data["splits"]["train"]["windows_used"] == 86 and data["train_on_test"] is False
    assert data["tokenizer"] == str(text_file.with_name("tokenizer.json"))
    assert len(saved["code"]["commit"]) == 40 and isinstance(saved["code"]["dirty"], bool)
    assert {"python", "torch", "transformers", "lightning", "hydra-core"} <= set(saved["versions"])
    assert saved["versions"]["torch"] == torch.__version__
    assert saved["device"]["accelerator"] == "cpu" and saved["device"]["torch_threads"] >= 1

    # CSV: eval rows, every metric under a stage (or eval/) prefix, the lr monitor included.
    rows = read_csv(run)
    keys = set().union(*rows) - {"step", "epoch"}
    assert all(k.startswith(("lm/", "eval/")) for k in keys), sorted(keys)
    assert {"lm/lr-AdamW", "lm/val_ppl", "eval/cache/bytes_per_token", "eval/decode_tokens_per_s"} <= keys

    # W&B: the full record as run config, a name from the overrides, tags saying what ran.
    wandb_run = wandb_offline_run(run)
    assert RECORD_KEYS <= set(wandb_run["config"])
    assert wandb_run["config"]["config"]["model"]["attention"] == "standard"
    assert wandb_run["config"]["data"] == saved["data"]
    assert wandb_run["name"].startswith("train:debug=smoke,data=local")
    assert wandb_run["group"] == "train"
    assert {"mytag", "pythia-70m", "standard", "single", "native", "local"} <= set(wandb_run["tags"])
    # The top level is the run record only: no data module defaults beside it (they could contradict the run).
    assert not {"source", "seq_len", "tokenizer", "num_samples", "batch_size"} & set(wandb_run["config"])


def test_steps_run_on_across_stages_and_csv_is_written_when_all_stages_are_reused(tmp_path, text_file):
    overrides = ["model=vdproj", "phase=two_stage"]
    first = train(smoke(tmp_path, text_file, *overrides))
    assert [s["name"] for s in first["stages"]] == ["recon", "lm"]  # run order, not name order
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [s["name"] for s in saved["stages"]] == ["recon", "lm"]
    rows = read_csv(tmp_path / "run")
    recon_steps = [int(r["step"]) for r in rows if any(k.startswith("recon/") for k in r)]
    lm_steps = [int(r["step"]) for r in rows if any(k.startswith("lm/") for k in r)]
    assert max(recon_steps) == stage(first, "recon")["steps"] == 4
    assert min(lm_steps) == 4 and max(lm_steps) == 8  # stage 2 runs on from stage 1's last step
    assert {"recon/lr-AdamW", "lm/lr-AdamW"} <= set().union(*rows)

    shutil.rmtree(tmp_path / "run")
    again = train(smoke(tmp_path, text_file, *overrides))
    assert all(s["reused"] for s in again["stages"])
    rows = read_csv(tmp_path / "run")
    keys = set().union(*rows)
    assert {"recon/reused", "lm/reused", "lm/val_ppl", "eval/cache/reduction"} <= keys
    assert max(int(r["step"]) for r in rows) == 8


def test_logger_none_trains(tmp_path, text_file):
    metrics = train(smoke(tmp_path, text_file, "logger=none"))
    assert metrics["val_ppl"] > 1 and not (tmp_path / "run" / "csv").exists()


def test_second_run_reuses_the_stage(tmp_path, text_file):
    train(smoke(tmp_path, text_file))
    again = train(smoke(tmp_path, text_file))
    assert stage(again, "lm")["reused"]
    retrained = train(smoke(tmp_path, text_file, "phase.reuse=false"))
    assert not stage(retrained, "lm")["reused"]


def test_seq_len_over_position_limit_fails_before_training(tmp_path, text_file):
    cfg = smoke(tmp_path, text_file, "data.seq_len=300", "+model.overrides.max_position_embeddings=256")
    with pytest.raises(ValueError, match="position limit"):
        train(cfg)
    assert not (tmp_path / "stages").exists()


def test_empty_dataset_fails_before_training(tmp_path, text_file):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cfg = smoke(tmp_path, text_file, f"data.path={empty}")
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
    data = json.loads(runs[0].read_text())["data"]  # offline WikiText-2: the record says it trained on test.txt
    assert data["train_on_test"] is True and data["splits"]["train"]["split_used"] == "test"
    assert data["splits"]["validation"]["file"].endswith("wikitext-2/valid.txt")
    summary = (tmp_path / "multirun" / "summary.txt").read_text().splitlines()
    assert summary[0] == "multirun summary:" and all(": ok" in line for line in summary[1:]) and len(summary) == 3


def test_multirun_summary_names_a_failed_job_and_the_sweep_fails(tmp_path, text_file):
    tokenizer = text_file.with_name("tokenizer.json")
    cmd = [
        sys.executable, "-m", "kvcompress.train", "-m", "debug=smoke", "logger=none", "print_config=false",
        "data=local", f"data.path={text_file}", f"data.tokenizer={tokenizer}", "data.seq_len=32,3000",
        f"data.cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={tmp_path / 'multirun'}",
        f"paths.stage_dir={tmp_path / 'stages'}",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(CONF_DIR).parent)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 1, done.stderr[-3000:]
    summary = (tmp_path / "multirun" / "summary.txt").read_text().splitlines()
    assert summary[1].startswith("job 0: ok") and "data.seq_len=32" in summary[1]
    assert summary[2].startswith("job 1: failed") and "max_position_embeddings=2048" in summary[2]
    assert "multirun summary:" in done.stdout
    assert (done.stdout + done.stderr).count("Seed set to 42") == 2  # once a job: Lightning's lines are not doubled
    assert "max_position_embeddings" in (tmp_path / "multirun" / "1" / "train.log").read_text()


def stage(metrics: dict, name: str) -> dict:
    """A stage's record (metrics["stages"] is a list in run order)."""
    return next(s for s in metrics["stages"] if s["name"] == name)


def stage_state(metrics: dict, name: str) -> dict:
    return load_weights(stage(metrics, name)["weights"])


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
    recon, lm = stage(metrics, "recon"), stage(metrics, "lm")
    assert recon["val_recon"] > 0 and lm["val_ppl"] > 1
    assert recon["trainable_params"] == lm["frozen_params"]  # exactly the projections, frozen in stage 2
    assert assert_frozen_between(metrics, "recon", "lm", "*_compress.*") > 0
    assert_frozen_between(metrics, "recon", "lm", "*_restore.*")
    assert metrics["cache"]["reduction"] == pytest.approx(1 - (64 + 40) / 128)  # rank 0.625 * 64 = 40


def test_ka_adapter_phase_smoke(tmp_path, text_file):
    overrides = ["attention=ka_adapter", "phase=ka_adapter", "cache=ka", "eval.caches=[kv,ka_plain]"]
    metrics = train(smoke(tmp_path, text_file, *overrides, "eval.autoregressive.enabled=true"))
    assert "val_ar_ppl" in stage(metrics, "adapter")
    a, b = stage_state(metrics, "base"), stage_state(metrics, "adapter")
    changed = [n for n in a if not torch.equal(a[n], b[n])]
    assert changed and all(".ka_adapter." in n for n in changed)  # the base is bit-identical
    caches = metrics["caches"]
    assert set(caches) == {"ka", "kv", "ka_plain"}
    assert all(c["autoregressive_ppl"] > 1 for c in caches.values())
    assert metrics["parallel_ppl"] > 1 and metrics["autoregressive_ppl"] == caches["ka"]["autoregressive_ppl"]


def test_mka_smoke_trains_base_then_only_the_ka_layer(tmp_path, text_file):
    metrics = train(smoke(tmp_path, text_file, "model=mka", "phase=mka_base_then_frozen_base", "model.init_from=null"))
    mka = stage(metrics, "mka")
    assert mka["trainable_params"] == 2 * 64 + 3 * (64 * 64 + 64)  # LayerNorm(64) + 3 x Linear(64, 64)
    assert "start_val_ppl" in mka
    a, b = stage_state(metrics, "base"), stage_state(metrics, "mka")
    changed = [n for n in a if not torch.equal(a[n], b[n])]
    assert changed and all(".attention.mka." in n for n in changed)
    # The frozen base is scored before the KA layer starts; a zero-init start is the base itself.
    base = stage(metrics, "base")
    assert mka["start_base_val_ppl"] == pytest.approx(base["val_ppl"], rel=1e-5)
    assert mka["start_val_ppl"] == pytest.approx(mka["start_base_val_ppl"], rel=1e-5)
    windows = load_file(str(Path(mka["weights"]).parent / "windows_base.safetensors"))
    assert math.exp(windows["val"].mean().item()) == pytest.approx(base["val_ppl"], rel=1e-5)
    # Report 001's start: a random KA layer on its (silenced, so plain) base, away from it.
    other = train(
        smoke(tmp_path, text_file, "model=mka", "phase=mka_base_then_frozen_base", "model.init_from=null",
              "model.attention_kwargs.zero_init=false")
    )  # fmt: skip
    start = stage(other, "mka")
    assert stage(other, "base")["ka_layers_silenced"] == 1
    assert start["start_base_val_ppl"] == pytest.approx(stage(other, "base")["val_ppl"], rel=1e-5)
    assert start["start_val_ppl"] != pytest.approx(start["start_base_val_ppl"], rel=1e-3)


def test_mka_without_base_weights_fails_before_training(tmp_path, text_file):
    with pytest.raises(ValueError, match="no base weights"):
        train(smoke(tmp_path, text_file, "attention=mka", "phase=mka_frozen_base", "model.init_from=null"))
    with pytest.raises(Exception, match="HF_HUB_OFFLINE"):
        train(smoke(tmp_path, text_file, "model=mka", "phase=frozen_base"))
    assert not (tmp_path / "stages").exists()


def test_cache_that_cannot_serve_the_model_fails_before_training(tmp_path, text_file):
    with pytest.raises(ValueError, match="cannot serve"):
        train(smoke(tmp_path, text_file, "model=vdproj", "cache=ka"))
    with pytest.raises(ValueError, match="cannot serve"):
        train(smoke(tmp_path, text_file, "model=ka", "cache=kv"))
    assert not (tmp_path / "stages").exists()


def test_offline_without_data_fails_fast_with_one_line(tmp_path):
    # A newcomer's first command with neither the offline data nor the Hub: seconds, one line, no traceback.
    env = {k: v for k, v in os.environ.items() if k != "KVCOMPRESS_DATA_DIR"}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(Path(CONF_DIR).parent))
    cmd = [sys.executable, "-m", "kvcompress.train", "print_config=false", f"hydra.run.dir={tmp_path / 'run'}"]
    start = time.monotonic()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    elapsed = time.monotonic() - start
    start = time.monotonic()  # the baseline, under the same machine load: starting Python and importing the entry
    subprocess.run([sys.executable, "-c", "import kvcompress.train"], env=env, check=True, timeout=120)
    imports = time.monotonic() - start
    assert done.returncode == 1
    assert elapsed < imports + 5, (elapsed, imports)  # the lookup itself fails in seconds (the Hub retried ~25 s)
    output = (done.stdout + done.stderr).strip().splitlines()
    errors = [line for line in output if "ERROR" in line]
    assert len(errors) == 1 and "Traceback" not in done.stderr
    assert "KVCOMPRESS_DATA_DIR" in errors[0] and "EleutherAI/pythia-70m" in errors[0]
    log = (tmp_path / "run" / "train.log").read_text()
    assert "KVCOMPRESS_DATA_DIR" in log and "HF_HUB_OFFLINE=1" in log
    assert not (tmp_path / "run" / "wandb").exists() and not (tmp_path / "outputs").exists()
    assert "_target_: kvcompress.data.TokenWindowDataModule" in (tmp_path / "run" / "config_tree.log").read_text()


def test_eval_is_a_structured_config(tmp_path):
    cfg = compose_cfg(["eval.decode.new_tokens=3"], tmp_path)
    assert cfg.eval.decode.new_tokens == 3 and cfg.eval.autoregressive.max_batches == 8  # defaults: EvalConfig
    with pytest.raises(ConfigCompositionException):
        compose_cfg(["eval.decode.new_tokns=3"], tmp_path)  # misspelled key
    with pytest.raises(ConfigCompositionException):
        compose_cfg(["eval.autoregressive.enabled=maybe"], tmp_path)  # wrong type


def test_config_groups_compose(tmp_path):
    cfg = compose_cfg(["model=pythia-160m", "attention=vdproj", "phase=vdproj_two_stage"], tmp_path)
    assert (cfg.model.name, cfg.model.attention, list(cfg.phase.stages)) == ("pythia-160m", "vdproj", ["recon", "lm"])
    alias = compose_cfg(["model=vdproj", "phase=two_stage"], tmp_path)  # the user's spelling
    assert (alias.model.name, alias.model.attention, list(alias.phase.stages)) == (
        "pythia-70m",
        "vdproj",
        ["recon", "lm"],
    )
    assert alias.phase.reuse is True and alias.phase.epochs_cap is None  # shared phase settings, stated once
    mka = compose_cfg(["model=pythia-160m", "attention=mka"], tmp_path)
    assert mka.model.init_from == "EleutherAI/pythia-160m"  # the released Pythia of the same shape
    constant = compose_cfg(["scheduler=constant"], tmp_path)
    assert constant.scheduler._target_ == "transformers.get_constant_schedule_with_warmup"


def test_base_weights_of_another_shape_name_the_smoke_overrides(tmp_path, text_file):
    from kvcompress.models import GPTNeoX, ModelConfig
    from kvcompress.models.hf import save_pretrained

    save_pretrained(GPTNeoX(ModelConfig.from_name("pythia-70m", n_layer=2, n_embd=32, n_head=4)), tmp_path / "base")
    with pytest.raises(ValueError, match="debug=smoke"):
        train(
            smoke(tmp_path, text_file, "attention=mka", "phase=mka_frozen_base", f"model.init_from={tmp_path / 'base'}")
        )
