"""Callbacks: position-wise perplexity, autoregressive perplexity, the run's time estimate."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any, cast

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger

from kvcompress.config import require_int
from kvcompress.evaluation import metrics
from kvcompress.evaluation.windows import window_losses
from kvcompress.models import GPTNeoX

log = logging.getLogger(__name__)

DEFAULT_BUCKETS = ((0, 16), (16, 32), (32, 64), (64, 96), (96, 128))


def bucket_name(lo: int, hi: int) -> str:
    return f"{lo}-{hi}"


def trainer_datamodule(trainer: L.Trainer) -> L.LightningDataModule | None:
    """The trainer's datamodule (None without one)."""
    return trainer.datamodule  # type: ignore[attr-defined]  # set by Lightning's data connector, undeclared on Trainer


def trainer_callbacks(trainer: L.Trainer) -> list[L.Callback]:
    """The trainer's callbacks."""
    return trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning's callback connector, undeclared


def gather(pl_module: L.LightningModule, tensor: torch.Tensor) -> torch.Tensor:
    """`all_gather` of one tensor: a tensor (Lightning annotates it with the union of every input kind)."""
    return cast(torch.Tensor, pl_module.all_gather(tensor))


class PositionwisePPL(L.Callback):
    """Validation PPL per bucket of positions, from the per-token losses that validation steps return.

    Logs `<stage>/val_pos_ppl/<lo>-<hi>` for each bucket, and a W&B table when W&B is a logger.
    Buckets that fall outside the sequence are skipped.

    After each validation, `windows` holds the per-window mean losses of that validation (the records of
    `kvcompress.evaluation.windows`: `ids`, `val`, `bucket:<lo>-<hi>`), gathered over ranks under DDP (a window
    that DDP's padding scored twice is kept once). The ids are the windows' numbers in their split
    (`TokenWindowDataset.indices`); with another kind of validation loader, their order of appearance.
    """

    def __init__(self, buckets: Sequence[Sequence[int]] = DEFAULT_BUCKETS) -> None:
        self.buckets = [(int(lo), int(hi)) for lo, hi in buckets]
        for lo, hi in self.buckets:
            if not 0 <= lo < hi:
                raise ValueError(f"bad position bucket [{lo}, {hi})")
        self.last: dict[str, float] = {}
        self.windows: dict[str, np.ndarray] = {}
        self._sums: torch.Tensor | None = None
        self._counts: torch.Tensor | None = None
        self._rows: list[dict[str, torch.Tensor]] = []
        self._ids: list[torch.Tensor] = []
        self._window_ids: np.ndarray | None = None  # the loader's windows, in the order it serves them
        self._batch_size = 0

    def logged_metrics(self) -> list[str]:
        """What it logs (without the stage prefix), e.g. for a stage's `monitor`."""
        return [f"val_pos_ppl/{bucket_name(lo, hi)}" for lo, hi in self.buckets]

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sums = torch.zeros(len(self.buckets), dtype=torch.float64, device=pl_module.device)
        self._counts = torch.zeros(len(self.buckets), dtype=torch.float64, device=pl_module.device)
        self._rows, self._ids, self._window_ids = [], [], None

    def _totals(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._sums is None or self._counts is None:
            raise RuntimeError("PositionwisePPL: a validation batch ended before the validation epoch started")
        return self._sums, self._counts

    def _batch_ids(self, trainer: L.Trainer, batch_idx: int, n: int) -> torch.Tensor:
        """The ids of the `n` windows of validation batch `batch_idx` (this rank's share under DDP)."""
        if self._window_ids is None:
            loader = trainer.val_dataloaders
            loader = loader[0] if isinstance(loader, list | tuple) else loader
            order = getattr(getattr(loader, "epoch_order", None), "order", None)
            indices = getattr(getattr(loader, "dataset", None), "indices", None)
            self._window_ids = (
                np.asarray(indices)[order()] if order is not None and indices is not None else np.empty(0, np.int64)
            )
            self._batch_size = int(getattr(loader, "batch_size", 0) or 0)
        start = batch_idx * self._batch_size
        if len(self._window_ids) >= start + n and self._batch_size:
            return torch.from_numpy(self._window_ids[start : start + n].astype(np.int64))
        seen = sum(len(i) for i in self._ids)  # no window numbers: the order of appearance
        return torch.arange(seen, seen + n, dtype=torch.int64)

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int, *args: Any
    ) -> None:
        losses = outputs["token_losses"]  # (B, T)
        T = losses.shape[1]
        sums, counts = self._totals()
        for i, (lo, hi) in enumerate(self.buckets):
            if lo < T:
                chunk = losses[:, lo:hi]
                sums[i] += chunk.double().sum()
                counts[i] += chunk.numel()
        self._rows.append(window_losses(losses, self.buckets))
        self._ids.append(self._batch_ids(trainer, batch_idx, losses.shape[0]))

    def _gather_windows(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, np.ndarray]:
        if not self._rows:
            return {}
        ids = torch.cat(self._ids).to(pl_module.device)
        columns = {name: torch.cat([row[name] for row in self._rows]) for name in self._rows[0]}
        if trainer.world_size > 1:  # every rank holds as many windows (DDP pads the shares to equal length)
            ids = gather(pl_module, ids).flatten()
            columns = {name: gather(pl_module, values).flatten() for name, values in columns.items()}
        ids_np = ids.cpu().numpy()
        _, first = np.unique(ids_np, return_index=True)  # sorted by id, each window once
        return {"ids": ids_np[first], **{name: v.cpu().numpy()[first] for name, v in columns.items()}}

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sums, counts = self._totals()
        if trainer.world_size > 1:
            sums, counts = gather(pl_module, sums).sum(0), gather(pl_module, counts).sum(0)
        self.windows = self._gather_windows(trainer, pl_module)
        prefix = getattr(pl_module, "metric_prefix", "lm")
        self.last = {}
        for i, (lo, hi) in enumerate(self.buckets):
            if counts[i] > 0:
                ppl = float(torch.exp(sums[i] / counts[i]))
                self.last[bucket_name(lo, hi)] = ppl
                pl_module.log(f"{prefix}/val_pos_ppl/{bucket_name(lo, hi)}", ppl)
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table(
                    key=f"{prefix}/val_pos_ppl_table",
                    columns=["positions", "ppl"],
                    data=[[name, ppl] for name, ppl in self.last.items()],
                    step=trainer.global_step,
                )


class AutoregressivePPL(L.Callback):
    """At each validation end, PPL of the first `max_batches` validation batches decoded token by token
    with `cache` (logged as `<stage>/val_ar_ppl`): the number a lossy cache is really judged by."""

    def __init__(self, cache: str = "native", max_batches: int = 4) -> None:
        require_int(max_batches, "AutoregressivePPL max_batches", minimum=1)
        self.cache = cache
        self.max_batches = max_batches

    def logged_metrics(self) -> list[str]:
        return ["val_ar_ppl"]

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        datamodule, net = trainer_datamodule(trainer), getattr(pl_module, "net", None)
        if datamodule is None or not isinstance(net, GPTNeoX):
            raise TypeError("AutoregressivePPL needs a trainer with a datamodule and a module whose `net` is a GPTNeoX")
        losses = []
        for i, batch in enumerate(datamodule.val_dataloader()):  # this rank's share under DDP
            if i >= self.max_batches:
                break
            losses.append(metrics.autoregressive_token_losses(net, batch.to(pl_module.device), self.cache))
        local = torch.cat(losses).double()
        total = gather(pl_module, local.sum()).sum()  # summed over ranks (a no-op on one process)
        count = gather(pl_module, torch.tensor(float(local.numel()), device=local.device)).sum()
        prefix = getattr(pl_module, "metric_prefix", "lm")
        pl_module.log(f"{prefix}/val_ar_ppl", float(torch.exp(total / count)))


def duration(seconds: float) -> str:
    """`42 s`, `6.1 min`, `3.2 h`."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class RunEstimate(L.Callback):
    """What a stage will cost, from its real counts and its first measured steps.

    At the start of the stage's fit: one line with its steps an epoch, max epochs and validation batches. After
    `warmup` steps, `measure` steps are timed; then one line with the step time and the estimated time of the
    rest of the stage and of the run's later stages (`later`: their names and max epochs, at this stage's steps an
    epoch and step time), an upper bound (early stopping may end a stage sooner). The progress bar shows the
    run's remaining minutes (`run_eta_min`) from then on. Validation batches are timed too, in any validation
    of this trainer. `timing` is the record (metrics.json `stages[i].timing`)."""

    def __init__(self, stage: str, later: Sequence[tuple[str, int]] = (), warmup: int = 2, measure: int = 5) -> None:
        self.stage, self.later = stage, [(str(n), int(e)) for n, e in later]
        self.warmup, self.measure = warmup, measure
        self.timing: dict[str, Any] = {}
        self._steps = 0  # steps of this fit
        self._t0 = self._cpu0 = 0.0
        self._val_t0 = 0.0
        self._val_batches = 0

    @staticmethod
    def _val_batches_per_validation(trainer: L.Trainer) -> int:
        datamodule = trainer_datamodule(trainer)
        n = len(datamodule.val_dataloader()) if datamodule is not None else 0
        limit = trainer.limit_val_batches
        if isinstance(limit, int):
            return min(n, limit)
        return int(n * float(limit)) if limit is not None else n

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        steps, epochs = int(trainer.num_training_batches), int(trainer.max_epochs or 1)
        total = steps * epochs if trainer.max_steps < 0 else min(steps * epochs, trainer.max_steps)
        val = self._val_batches_per_validation(trainer)
        self.timing.update(steps_per_epoch=steps, max_epochs=epochs, val_batches=val, max_steps=total)
        self._steps, self._start_step = 0, trainer.global_step
        done = f", {self._start_step} done" if self._start_step else ""
        later = "; then " + ", ".join(f"{n} (up to {e} epochs)" for n, e in self.later) if self.later else ""
        log.info(
            "stage %s: %d steps an epoch, up to %d epochs (%d steps%s), %d validation batches an epoch%s",
            self.stage, steps, epochs, total, done, val, later,
        )  # fmt: skip

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        self._steps += 1
        if self._steps == self.warmup:
            self._t0, self._cpu0 = time.perf_counter(), time.process_time()
        elif self._steps == self.warmup + self.measure:
            step_s = (time.perf_counter() - self._t0) / self.measure
            step_cpu_s = (time.process_time() - self._cpu0) / self.measure  # all threads: less sensitive to load
            self.timing.update(step_s=step_s, step_cpu_s=step_cpu_s, measured_steps=self.measure)
            self._report()
        if "step_s" in self.timing and trainer.progress_bar_callback is not None:
            pl_module.log("run_eta_min", self.remaining(trainer.global_step) / 60, prog_bar=True, logger=False)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val_t0, self._val_batches = time.perf_counter(), 0

    def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self._val_batches += 1

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._val_batches and "val_batch_s" not in self.timing:
            self.timing["val_batch_s"] = (time.perf_counter() - self._val_t0) / self._val_batches

    def _validation_s(self) -> float:
        return self.timing.get("val_batches", 0) * self.timing.get("val_batch_s", math.nan)

    def remaining(self, step: int) -> float:
        """Seconds left in this stage after `step` plus the later stages (validations counted once timed)."""
        t = self.timing
        steps_left = max(t["max_steps"] - step, 0)
        epochs_left = math.ceil(steps_left / max(t["steps_per_epoch"], 1))
        val = self._validation_s() if "val_batch_s" in t else 0.0
        later = sum(e * (t["steps_per_epoch"] * t["step_s"] + val) for _, e in self.later)
        return steps_left * t["step_s"] + epochs_left * val + later

    def _report(self) -> None:
        t = self.timing
        val = self._validation_s()
        stage_s = t["max_steps"] * t["step_s"] + t["max_epochs"] * (0.0 if math.isnan(val) else val)
        later = sum(e * (t["steps_per_epoch"] * t["step_s"] + (0.0 if math.isnan(val) else val)) for _, e in self.later)
        timed = f", {t['val_batch_s']:.2f} s a validation batch" if "val_batch_s" in t else ""
        untimed = " (validations not timed yet)" if "val_batch_s" not in t else ""
        rest = f"; the later stages up to {duration(later)} at this step time" if self.later else ""
        log.info(
            "stage %s: %.2f s a step%s (%d steps measured): the stage takes up to %s%s%s",
            self.stage, t["step_s"], timed, self.measure, duration(stage_s), untimed, rest,
        )  # fmt: skip
