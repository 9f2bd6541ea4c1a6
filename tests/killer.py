"""Callbacks that kill their own process with SIGKILL, or signal it, at a chosen point (kill-and-resume tests).

Injected into a real run with `+callbacks.killer._target_=killer.KillAt extra_targets=[killer.]` and
`PYTHONPATH=tests`.
"""

from __future__ import annotations

import os
import signal
import signal as signal_module

import lightning as L


def die(*_: object) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class KillAt(L.Callback):
    """`point`: "step" (after training step `step`), "fit_start" (before the stage's first step), or
    "checkpoint_write" (while the checkpoint of step `step` is being written: its bytes are in the temp file,
    the rename has not happened)."""

    def __init__(self, stage: str, point: str = "step", step: int = 0) -> None:
        self.stage, self.point, self.step = stage, point, step

    def _here(self, pl_module: L.LightningModule, point: str) -> bool:
        return self.point == point and getattr(pl_module, "metric_prefix", None) == self.stage

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._here(pl_module, "fit_start"):
            die()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        if self._here(pl_module, "step") and trainer.global_step == self.step:
            die()

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if self._here(pl_module, "checkpoint_write") and trainer.global_step == self.step:
            os.fsync = die  # the atomic write fsyncs its temp file just before renaming it into place


class SignalAt(L.Callback):
    """Sends `signal` (a name: SIGINT, SIGTERM, SIGUSR1) to its own process after training step `step` of
    `stage`, as Ctrl-C, a scheduler or SLURM would."""

    def __init__(self, stage: str, step: int, signal: str = "SIGINT") -> None:
        self.stage, self.step, self.signum = stage, step, getattr(signal_module, signal)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        if getattr(pl_module, "metric_prefix", None) == self.stage and trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)
