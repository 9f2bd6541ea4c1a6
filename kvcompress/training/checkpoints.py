"""What keeps a stage folder trustworthy: atomic checkpoint writes, no pickle code on load, paths relative to
the folder, checkpoints after every validation and every N steps / M minutes, and a lock against a second
process training the same stage.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import signal
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from kvcompress.models.weights import BadWeightsError, check_finite, load_checkpoint
from kvcompress.utils import atomic_write

log = logging.getLogger(__name__)

BEST, LAST = "best", "last"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints are written beside their target and renamed into place (a kill never leaves half a file),
    and read with `weights_only=True` (a planted checkpoint cannot run code)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        atomic_write(path, lambda f: torch.save(checkpoint, f), mode="wb")

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict:
        return load_checkpoint(path)


class RelativeCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose saved state names files relative to its folder, so a moved or copied stage folder
    resumes from its own files (Lightning's stores absolute paths and drops the best-score state when they
    differ)."""

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
            state[key] = self._relative(state[key])
        state["best_k_models"] = {self._relative(k): v for k, v in state["best_k_models"].items()}
        state["dirpath"] = "."
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
            state[key] = self._absolute(state.get(key, ""))
        state["best_k_models"] = {self._absolute(k): v for k, v in state.get("best_k_models", {}).items()}
        state["dirpath"] = self.dirpath
        super().load_state_dict(state)

    def _relative(self, path: str) -> str:
        return os.path.relpath(path, self.dirpath) if path else ""

    def _absolute(self, path: str) -> str:
        if not path:
            return ""
        if self.dirpath is None:
            raise ValueError("RelativeCheckpoint needs a dirpath to resolve its saved paths")
        return str(Path(self.dirpath) / path)


class StepCheckpoint(RelativeCheckpoint):
    """Writes `last.ckpt` every N training steps or M minutes inside an epoch (long epochs are not lost).

    The last batch of an epoch is left to the end-of-validation save, so a checkpoint never falls between
    the last training step and its validation."""

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            super().on_train_batch_end(trainer, *args, **kwargs)


def stage_checkpoints(
    folder: Path, monitor: str, every_n_train_steps: int | None = None, every_minutes: float | None = None
) -> tuple[RelativeCheckpoint, list[L.Callback]]:
    """The best-checkpoint callback and all checkpoint callbacks of a stage, in the order Lightning runs them:
    `best.ckpt` when the monitor improves, then `last.ckpt` after every validation (so it holds the
    updated best and early-stopping state), and optionally `last.ckpt` every N steps or M minutes."""
    common: dict[str, Any] = dict(
        dirpath=folder, save_top_k=1, enable_version_counter=False, auto_insert_metric_name=False
    )
    best = RelativeCheckpoint(filename=BEST, monitor=monitor, mode="min", **common)
    callbacks: list[L.Callback] = [best, RelativeCheckpoint(filename=LAST, monitor=None, **common)]
    if every_n_train_steps:
        callbacks.append(StepCheckpoint(filename=LAST, monitor=None, every_n_train_steps=every_n_train_steps, **common))
    elif every_minutes:
        interval = timedelta(minutes=every_minutes)
        callbacks.append(StepCheckpoint(filename=LAST, monitor=None, train_time_interval=interval, **common))
    return best, callbacks


def damaged_checkpoints(folder: Path) -> list[str]:
    """Why each `*.ckpt` under `folder` cannot be trusted (unreadable, not a checkpoint, non-finite weights)."""
    problems = []
    for path in sorted(folder.glob("*.ckpt")):
        try:
            check_finite(load_checkpoint(path)["state_dict"], path)
        except BadWeightsError as err:
            problems.append(str(err))
    return problems


class StageLockedError(RuntimeError):
    """Another live process holds the stage folder's lock."""


def lock_path(folder: Path) -> Path:
    """A stage folder's lock file: `.<folder name>.lock` beside it."""
    return folder.parent / f".{folder.name}.lock"


class StageLock:
    """An exclusive `fcntl` lock on `.<folder name>.lock` beside the stage folder, holding the owner's pid (the last
    owner's once released: its mtime is the stage's last use); beside, so that a retrained stage folder can replace
    the finished one by a rename under it. The kernel drops it when the owner dies (kill -9 included), so a stale
    lock never blocks a rerun."""

    def __init__(self, folder: Path, stage: str) -> None:
        self.path = lock_path(folder)
        self.stage = stage
        self._fd: int | None = None

    def __enter__(self) -> StageLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            owner = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            if err.errno in (errno.EAGAIN, errno.EACCES):
                raise StageLockedError(
                    f"stage {self.stage!r} is being trained by another process (pid {owner}; lock {self.path}). "
                    "Wait for it to finish, then rerun: the finished stage will be reused."
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class ResumableEarlyStopping(EarlyStopping):
    """EarlyStopping that stays stopped across a resume: Lightning restores its counters but not
    `trainer.should_stop`, so a run killed after it stopped would otherwise train one more epoch."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.wait_count >= self.patience:
            trainer.should_stop = True


# SIGINT (Ctrl-C), SIGTERM (schedulers, `kill`), SIGUSR1 (SLURM's signal before preemption or the time limit,
# `#SBATCH --signal=USR1@120`; Lightning's SLURMEnvironment requeue signal).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class StageInterrupted(BaseException):
    """A stage stopped on a signal after saving its state (not an Exception: nothing may swallow it as a
    failure). `saved` is the file a rerun resumes from (None when the stage had not started)."""

    def __init__(self, signum: int, stage: str, saved: Path | None, step: int) -> None:
        self.signum, self.stage, self.saved, self.step = signum, stage, saved, step
        name = signal.Signals(signum).name
        what = f"saved {saved}" if saved is not None else "nothing to save yet"
        super().__init__(f"{name}: stage {stage!r} stopped at step {step}, {what}")


class SaveOnSignal(L.Callback):
    """On SIGINT, SIGTERM or SIGUSR1 during a fit, the training step in hand finishes, `last.ckpt` is written
    through the stage's checkpoint IO (atomically) and the fit stops with `StageInterrupted`; the rerun resumes
    from it exactly. A signal during an epoch's last step or its validation waits for the end-of-validation
    `last.ckpt` and stops before the next epoch. A second Ctrl-C stops at once, without saving.

    Use `with callback.installed(): trainer.fit(...)`: the handlers go in at `on_train_start` (after
    Lightning's, which would stop a validation half done) and the previous ones come back after the fit."""

    def __init__(self, last: Path, stage: str) -> None:
        self.last, self.stage = Path(last), stage
        self.signum: int | None = None

    @contextlib.contextmanager
    def installed(self) -> Iterator[SaveOnSignal]:
        main = threading.current_thread() is threading.main_thread()
        previous = {s: signal.getsignal(s) for s in STOP_SIGNALS} if main else {}
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                signal.signal(signum, self._received)

    def _received(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C: stop now
            log.warning(
                "%s: stage %s stops after this training step and saves last.ckpt (Ctrl-C again: stop without saving)",
                signal.Signals(signum).name,
                self.stage,
            )

    def _asked(self, trainer: L.Trainer) -> bool:
        asked = self.signum is not None
        if trainer.world_size > 1:  # every rank stops at the same step (one may have got the signal)
            asked = bool(trainer.strategy.reduce_boolean_decision(asked, all=False))
            if asked and self.signum is None:
                self.signum = signal.SIGTERM  # another rank's signal
        return asked

    def _stop(self, trainer: L.Trainer, saved: Path | None) -> None:
        raise StageInterrupted(self.signum or signal.SIGTERM, self.stage, saved, trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if not self._asked(trainer) or trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return  # the last step of an epoch: its validation writes last.ckpt, the next epoch start stops
        trainer.save_checkpoint(self.last)
        self._stop(trainer, self.last)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._asked(trainer):
            self._stop(trainer, self.last if self.last.is_file() else None)
