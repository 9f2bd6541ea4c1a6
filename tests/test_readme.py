"""Every `python -m kvcompress.train` command of the README runs in its smoke form (`debug=smoke`).

A sweep (`-m a=x,y`, or an experiment's `hydra.sweeper.params`) runs each of its command-line jobs and
the first job of a config sweep (the others are composed). Commands that need other processes, a GPU or a
cluster (DDP, FSDP, submitit launchers, Optuna) are composed here; `tests/test_scale.py` runs them.
The data is a small local corpus with a tiny tokenizer, so this runs on any machine; `<pythia dir>`
placeholders become a Hugging Face folder of the smoke shape (`PYTHIA_DIR`).
"""

from __future__ import annotations

import itertools
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import train_tokenizer
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from kvcompress.run import CONF_DIR, train

REPO = Path(__file__).resolve().parent.parent
COMMAND = re.compile(r"python -m kvcompress\.train\b([^`\n#]*)")
# Run in their own processes (tests/test_scale.py): composed here.
ELSEWHERE = ("trainer=ddp", "trainer=fsdp", "hydra/launcher=", "hparams_search=")
WORDS = "the of a model cache key value attention token layer train data loss head rank".split()


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text().replace("\\\n", " ")  # join continued lines
    found = [m.group(1).strip() for m in COMMAND.finditer(text)]
    return list(dict.fromkeys(c for c in found if "--help" not in c))


def jobs(command: str) -> list[list[str]]:
    """The command-line jobs of a command: `-m a=x,y b=z` -> [[a=x, b=z], [a=y, b=z]]."""
    tokens = [t for t in shlex.split(re.sub(r"<[^>]*>", "PYTHIA_DIR", command)) if t != "-m"]
    choices = []
    for token in tokens:
        key, _, value = token.partition("=")
        sweep = "," in value and "[" not in value
        choices.append([f"{key}={v}" for v in value.split(",")] if sweep else [token])
    return [list(job) for job in itertools.product(*choices)]


COMMANDS = readme_commands()


def test_the_readme_has_its_main_commands():
    assert "experiment=quickstart" in COMMANDS[0]  # the first training command
    for expected in ["", "debug=smoke", "model=vdproj phase=two_stage", "-m experiment=report004_rank_sweep"]:
        assert expected in COMMANDS


@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory) -> dict[str, str]:
    import random

    from kvcompress.models import GPTNeoX, ModelConfig
    from kvcompress.models.hf import save_pretrained

    root = tmp_path_factory.mktemp("readme")
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(40)) + " ." for _ in range(200)]
    (root / "corpus.txt").write_text("\n".join(lines))
    smoke_shape = dict(n_layer=2, n_embd=64, n_head=4, intermediate_size=128)  # conf/debug/smoke.yaml
    save_pretrained(GPTNeoX(ModelConfig.from_name("pythia-70m", **smoke_shape)), root / "pythia-smoke")
    return {
        "root": str(root),
        "corpus": str(root / "corpus.txt"),
        "tokenizer": train_tokenizer(lines[:50], root / "tokenizer.json", vocab_size=300),
        "pythia": str(root / "pythia-smoke"),
    }


def smoke_cfg(job: list[str], data: dict[str, str], run_dir: Path):
    job = [t.replace("PYTHIA_DIR", data["pythia"]) for t in job]
    overrides = [
        *job,
        "debug=smoke",
        "data=local",
        f"data.path={data['corpus']}",
        f"data.tokenizer={data['tokenizer']}",
        f"data.cache_dir={data['root']}/cache",
    ]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
        cfg.paths.stage_dir = f"{data['root']}/stages"
    return cfg


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c or "(default)")
def test_readme_command_runs_in_smoke_form(command, smoke_data, tmp_path):
    for i, job in enumerate(jobs(command)):
        cfg = smoke_cfg(job, smoke_data, tmp_path / f"job{i}")
        if any(t.startswith(ELSEWHERE) for t in job):
            assert cfg.phase.stages and cfg.model.name
            continue
        sweep = dict(cfg.hydra.sweeper.params or {})
        for key, values in sweep.items():  # an experiment's own sweep: compose every value, run the first
            for value in str(values).split(",")[1:]:
                smoke_cfg([*job, f"{key}={value.strip()}"], smoke_data, tmp_path / "unused")
            cfg = smoke_cfg([*job, f"{key}={str(values).split(',')[0].strip()}"], smoke_data, tmp_path / f"job{i}")
        metrics = train(cfg)
        assert metrics["val_ppl"] > 1 and metrics["stages"], job


def test_help_lists_the_groups_and_the_main_commands():
    done = subprocess.run(
        [sys.executable, "-m", "kvcompress.train", "--help"], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    for text in ["attention: ka, ka_adapter, mka, standard, vdproj", "experiment=quickstart", "debug=smoke"]:
        assert text in done.stdout
