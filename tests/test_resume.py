"""Kill -9 a real training run at several points, or stop it with Ctrl-C / SIGTERM / SIGUSR1, rerun the same
command: metrics.json equals the uninterrupted run's (every metric but timings and paths)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
# Two stages, two epochs each, 4 steps an epoch, a mid-epoch checkpoint every 2 steps.
RUN = [
    "debug=smoke",
    "model=vdproj",
    "phase=two_stage",
    "logger=csv",
    "phase.epochs_cap=2",
    "checkpoint.every_n_steps=2",
]
# Values that may differ between an interrupted and an uninterrupted run: timings, paths, how a stage was obtained.
# The run record's paths and command line name the run's own folders.
VOLATILE = {
    "decode_tokens_per_s",
    "ttft_s",
    "tpot_s",
    "weights",
    "reused",
    "resumed",
    "paths",
    "save_dir",
    "overrides",
    "command",
    "timing",
}


def stage(metrics: dict, name: str) -> dict:
    return next(s for s in metrics["stages"] if s["name"] == name)


def run(root: Path, corpus: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "kvcompress.train", *RUN, "data=local", f"data.path={corpus}",
        f"data.cache_dir={corpus.parent / 'cache'}", f"paths.stage_dir={root / 'stages'}",
        f"hydra.run.dir={root / 'run'}", *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def comparable(obj):
    if isinstance(obj, dict):
        return {k: comparable(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [comparable(v) for v in obj]
    return obj


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, corpus) -> dict:
    root = tmp_path_factory.mktemp("uninterrupted")
    done = run(root, corpus)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((root / "run" / "metrics.json").read_text())


def kill_and_resume(tmp_path: Path, corpus: Path, *kill: str) -> dict:
    killed = run(tmp_path, corpus, "+callbacks.killer._target_=killer.KillAt", "extra_targets=[killer.]", *kill)
    assert killed.returncode == -9, f"the run was not killed: {killed.returncode}\n{killed.stderr[-2000:]}"
    assert not (tmp_path / "run" / "metrics.json").exists()
    resumed = run(tmp_path, corpus)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for folder in [p for p in (tmp_path / "stages").iterdir() if p.is_dir()]:  # one copy of the weights, no temp files
        names = sorted(p.name for p in folder.iterdir() if not p.name.startswith("windows_"))  # + per-window records
        assert names == ["done.json", "weights.safetensors"]
        assert not list(folder.rglob("*.tmp"))
    return json.loads((tmp_path / "run" / "metrics.json").read_text())


def test_killed_mid_stage_resumes_to_the_same_metrics(tmp_path, corpus, uninterrupted):
    """Killed after step 3 of stage 1's first epoch; last.ckpt is the mid-epoch one of step 2."""
    resumed = kill_and_resume(tmp_path, corpus, "+callbacks.killer.stage=recon", "+callbacks.killer.step=3")
    assert stage(resumed, "recon")["resumed"] and not stage(resumed, "lm")["resumed"]
    assert comparable(resumed) == comparable(uninterrupted)


@pytest.mark.slow
@pytest.mark.parametrize(
    "kill",
    [
        ["+callbacks.killer.stage=lm", "+callbacks.killer.point=fit_start"],  # between the stages
        ["+callbacks.killer.stage=lm", "+callbacks.killer.step=7"],  # mid stage 2, second epoch
        ["+callbacks.killer.stage=lm", "+callbacks.killer.point=checkpoint_write", "+callbacks.killer.step=6"],
        ["+callbacks.killer.stage=recon", "+callbacks.killer.step=4"],  # right after an epoch's last step
    ],
    ids=["between_stages", "mid_stage_2", "during_checkpoint_write", "end_of_epoch"],
)
def test_killed_anywhere_resumes_to_the_same_metrics(tmp_path, corpus, uninterrupted, kill):
    assert comparable(kill_and_resume(tmp_path, corpus, *kill)) == comparable(uninterrupted)


def signal_and_resume(tmp_path: Path, corpus: Path, name: str, stage_name: str, step: int) -> tuple[dict, int]:
    """The run gets `name` after `step` of `stage_name`; it exits 128 + the signal, says what it saved and how to
    resume. (Periodic checkpoints come every 2 steps: a saved odd step is the signal's own.)"""
    signalled = run(
        tmp_path, corpus, "+callbacks.signal._target_=killer.SignalAt", "extra_targets=[killer.]",
        f"+callbacks.signal.stage={stage_name}",
        f"+callbacks.signal.step={step}", f"+callbacks.signal.signal={name}",
    )  # fmt: skip
    output = signalled.stdout + signalled.stderr
    assert signalled.returncode == 128 + getattr(signal, name), output[-3000:]
    lines = [line for line in output.splitlines() if "resume with: python -m kvcompress.train " in line]
    assert len(lines) == 1 and f"interrupted by {name}: stage {stage_name!r}" in lines[0], output[-3000:]
    assert not (tmp_path / "run" / "metrics.json").exists()
    (last,) = (tmp_path / "stages").glob(f"{stage_name}-*/checkpoints/last.ckpt")
    saved_step = torch.load(last, weights_only=True)["global_step"]
    resumed = run(tmp_path, corpus)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return json.loads((tmp_path / "run" / "metrics.json").read_text()), saved_step


def test_ctrl_c_mid_stage_saves_and_resumes_to_the_same_metrics(tmp_path, corpus, uninterrupted):
    """Ctrl-C after step 2 of 4: the step in hand finishes, last.ckpt of step 3 is written, the rerun resumes."""
    resumed, saved_step = signal_and_resume(tmp_path, corpus, "SIGINT", "recon", 2)
    assert saved_step == 3
    assert stage(resumed, "recon")["resumed"]
    assert comparable(resumed) == comparable(uninterrupted)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "stage_name", "step", "saved_step"),
    [("SIGTERM", "recon", 4, 4), ("SIGUSR1", "lm", 6, 7)],
    ids=["sigterm_at_an_epochs_last_step", "sigusr1_mid_stage_2"],
)
def test_signals_save_and_resume_to_the_same_metrics(
    tmp_path, corpus, uninterrupted, name, stage_name, step, saved_step
):
    """SIGTERM on an epoch's last step waits for its validation's last.ckpt; SLURM's SIGUSR1 mid stage 2."""
    resumed, saved = signal_and_resume(tmp_path, corpus, name, stage_name, step)
    assert saved == saved_step
    assert comparable(resumed) == comparable(uninterrupted)
