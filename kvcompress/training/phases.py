"""Multi-phase training as data: a list of stages, each its own Lightning fit.

A stage names what trains (parameter-name patterns; everything else is frozen and left out of the
optimizer), its losses and weights, lr, epochs, early stopping and data. Each stage gets a folder
keyed by a hash of its config and of everything it starts from, so a later run with the same inputs
reuses the finished stage, and a killed run resumes the interrupted stage from `last.ckpt`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import json
import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import lightning as L
import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from kvcompress.models import GPTNeoX
from kvcompress.models.weights import load_weights, save_weights
from kvcompress.training.callbacks import PositionwisePPL, RunEstimate
from kvcompress.training.checkpoints import (
    LAST,
    AtomicCheckpointIO,
    ResumableEarlyStopping,
    SaveOnSignal,
    StageInterrupted,
    StageLock,
    damaged_checkpoints,
    stage_checkpoints,
)
from kvcompress.training.module import LMModule
from kvcompress.utils import atomic_write_json, file_sha256, remove_stale_temp_files, stable_hash

log = logging.getLogger(__name__)

WEIGHTS, DONE, CHECKPOINTS = "weights.safetensors", "done.json", "checkpoints"


class StageHook(Protocol):
    """Runs between stages (a stage's `before` / `after`); returns metrics that join the stage's record.

    A hook with settings is a class whose constructor checks them (so bad settings fail before any training),
    and which may check the model too with a `check(net)` method."""

    def __call__(
        self, *, runner: PhaseRunner, stage: Stage, net: GPTNeoX, datamodule: L.LightningDataModule
    ) -> Mapping[str, Any]: ...


@dataclass
class Stage:
    name: str
    train: list[str] = field(default_factory=lambda: ["*"])  # fnmatch patterns over parameter names
    freeze: list[str] = field(default_factory=list)  # patterns frozen even when `train` matches
    losses: dict[str, Any] = field(default_factory=lambda: {"lm": 1.0})
    lr: float = 3e-4
    max_epochs: int = 10
    patience: int | None = 1  # early-stopping patience in validations; None disables it
    monitor: str = "val_loss"
    data: dict[str, Any] = field(default_factory=dict)  # overrides of the run's data config
    init: str = "previous"  # "previous" (the weights in hand) or a checkpoint path
    before: list[StageHook] = field(default_factory=list)  # run before the fit (not when reused)
    after: list[StageHook] = field(default_factory=list)  # run after the fit or the reuse (e.g. mining)
    callbacks: list[Any] = field(default_factory=list)  # this stage's own callbacks (factories)
    validate_before: bool = False  # also record the metrics of the starting weights (`start_val_*`)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"stage name must be non-empty without '/': {self.name!r}")
        where = f"phase.stages.{self.name}"
        require_int(self.max_epochs, f"{where}.max_epochs", minimum=1)
        if isinstance(self.lr, bool) or not isinstance(self.lr, int | float) or not 0 < self.lr < float("inf"):
            raise ValueError(f"{where}.lr must be a positive number, got {self.lr!r}")
        if self.patience is not None:
            require_int(self.patience, f"{where}.patience", minimum=0)
        self.train, self.freeze = list(self.train), list(self.freeze)
        self.losses, self.data = dict(self.losses), dict(self.data)

    def key_fields(self) -> dict[str, Any]:
        fields = asdict(self)
        for name in ("before", "after", "callbacks"):
            fields[name] = [describe(f) for f in getattr(self, name)]
        return fields


def require_int(value: Any, setting: str, minimum: int) -> None:
    """Raise a ValueError naming `setting` unless `value` is an integer >= minimum."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{setting} must be an integer >= {minimum}, got {value!r}")


def describe(fn: Any) -> str:
    """A process-independent name for a hook or callback factory (a repr would hold a memory address): a function's
    name, a partial's function and arguments, a hook object's class and settings."""
    if isinstance(fn, functools.partial):
        return f"{describe(fn.func)}(*{fn.args!r}, **{dict(sorted(fn.keywords.items()))!r})"
    if hasattr(fn, "__qualname__"):  # a function or a class
        return f"{getattr(fn, '__module__', '?')}.{fn.__qualname__}"
    settings = dict(sorted(vars(fn).items())) if hasattr(fn, "__dict__") else {}
    return f"{describe(type(fn))}(**{settings!r})"


def set_trainable(net: torch.nn.Module, stage: Stage) -> tuple[int, int]:
    """Freeze all parameters except those `stage.train` matches (minus `stage.freeze`).

    Every pattern must match at least one parameter. Returns (trainable, frozen) counts.
    """
    names = [name for name, _ in net.named_parameters()]
    for pattern in stage.train + stage.freeze:
        if not fnmatch.filter(names, pattern):
            raise ValueError(f"stage {stage.name!r}: pattern {pattern!r} matches no parameter (e.g. {names[:3]}...)")
    trainable = frozen = 0
    for name, param in net.named_parameters():
        train = any(fnmatch.fnmatchcase(name, p) for p in stage.train)
        train = train and not any(fnmatch.fnmatchcase(name, p) for p in stage.freeze)
        param.requires_grad_(train)
        trainable += param.numel() if train else 0
        frozen += 0 if train else param.numel()
    if trainable == 0:
        raise ValueError(f"stage {stage.name!r} trains no parameter")
    return trainable, frozen


def load_net_weights(net: GPTNeoX, path: str | Path) -> None:
    """Load model weights from a safetensors file or a Lightning checkpoint, safely (no code runs)."""
    net.load_state_dict(load_weights(path), strict=True)


@dataclass
class StageResult:
    name: str
    key: str
    reused: bool
    resumed: bool
    trainable_params: int
    frozen_params: int
    weights: str  # the stage's final (best) weights, a safetensors file in its folder
    metrics: dict[str, Any]
    timing: dict[str, Any] = field(default_factory=dict)  # steps, epochs, measured step time (`RunEstimate`)


class PhaseRunner:
    """Runs stages in order on one `net`, under one set of loggers.

    `make_datamodule(overrides)` builds the data for a stage; `make_trainer(stage, callbacks, max_epochs)`
    builds its Trainer (with `loggers`); `make_module(net, stage)` builds its LightningModule.
    `fingerprint` is everything outside the stage that changes its result (model, data, trainer,
    optimizer, seed); it goes into every stage key.

    A stage folder holds `checkpoints/{best,last}.ckpt` while it trains and, once finished, `weights.safetensors`
    and `done.json` (relative paths and the weights' sha256); the checkpoints go once `done.json` is written
    (unless `keep_checkpoints`). Reuse verifies the hash and recomputes the metrics from the weights; anything
    damaged is reported by name and the stage restarts from its last good state. A signal during a fit saves
    `last.ckpt` and stops the run (`SaveOnSignal`).
    """

    def __init__(
        self,
        net: GPTNeoX,
        stages: Sequence[Stage],
        make_datamodule: Callable[[Mapping[str, Any]], L.LightningDataModule],
        make_trainer: Callable[[Stage, list[L.Callback], int], L.Trainer],
        make_module: Callable[[GPTNeoX, Stage], LMModule],
        stage_root: str | Path,
        fingerprint: Mapping[str, Any],
        reuse: bool = True,
        extra_callbacks: Callable[[], list[L.Callback]] = list,
        loggers: Sequence[Logger] = (),
        epochs_cap: int | None = None,
        checkpoint_every_n_steps: int | None = None,
        checkpoint_every_minutes: float | None = None,
        keep_checkpoints: bool = False,
    ) -> None:
        if not stages:
            raise ValueError("a phase needs at least one stage")
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique: {names}")
        if epochs_cap is not None:
            require_int(epochs_cap, "phase.epochs_cap", minimum=1)
        for name, value in (("every_n_steps", checkpoint_every_n_steps), ("every_minutes", checkpoint_every_minutes)):
            if value is not None and not value > 0:
                raise ValueError(f"checkpoint.{name} must be null or > 0, got {value!r}")
        self.net = net
        self.stages = list(stages)
        self.make_datamodule = make_datamodule
        self.make_trainer = make_trainer
        self.make_module = make_module
        self.stage_root = Path(stage_root)
        self.fingerprint = dict(fingerprint)
        self.reuse = reuse
        self.extra_callbacks = extra_callbacks
        self.loggers = list(loggers)
        self.epochs_cap = epochs_cap
        self.checkpoint_every_n_steps = checkpoint_every_n_steps
        self.checkpoint_every_minutes = checkpoint_every_minutes
        self.keep_checkpoints = keep_checkpoints
        self.results: list[StageResult] = []
        self.folder: Path | None = None  # the running stage's folder (hooks may keep their own files there)
        self.step = 0  # the logging step: runs on from one stage to the next

    @property
    def is_writer(self) -> bool:
        """Rank 0 (or the only process) owns the stage folders."""
        return rank_zero_only.rank == 0

    def stage_key(self, stage: Stage, parent_key: str) -> str:
        return stable_hash({"stage": stage.key_fields(), "parent": parent_key, "fingerprint": self.fingerprint})

    def validate_before_training(self) -> None:
        """Check every stage's patterns on the net up front, so bad config fails before any fit."""
        for stage in self.stages:
            set_trainable(self.net, stage)
            if stage.init != "previous" and not Path(stage.init).is_file():
                raise FileNotFoundError(f"stage {stage.name!r}: init checkpoint {stage.init} does not exist")

    def run(self) -> list[StageResult]:
        self.validate_before_training()
        parent_key = "init"
        for stage in self.stages:
            result = self.run_stage(stage, parent_key)
            self.results.append(result)
            parent_key = result.key
        return self.results

    def run_stage(self, stage: Stage, parent_key: str) -> StageResult:
        key = self.stage_key(stage, parent_key)
        folder = (self.stage_root / f"{stage.name}-{key}").resolve()
        self.folder = folder
        # Under DDP every rank runs this; only rank 0 locks and writes, the others read the same files.
        with StageLock(folder, stage.name) if self.is_writer else contextlib.nullcontext():
            stale = remove_stale_temp_files(folder) if self.is_writer else []
            if stale:
                log.warning("stage %s: removed temp files of an interrupted write: %s", stage.name, stale)
            if stage.init != "previous":
                load_net_weights(self.net, stage.init)
            trainable, frozen = set_trainable(self.net, stage)
            datamodule = self.make_datamodule(stage.data)
            if not self.reuse:
                if self.is_writer and clear_folder(folder):
                    log.info("stage %s: phase.reuse=false, retraining (cleared %s)", stage.name, folder)
            else:
                done = self._verified_done(stage, folder)
                if done is not None:
                    return self._reuse(stage, key, folder, done, datamodule, trainable, frozen)
            return self._train(stage, key, folder, datamodule, trainable, frozen)

    def _train(
        self, stage: Stage, key: str, folder: Path, datamodule: L.LightningDataModule, trainable: int, frozen: int
    ) -> StageResult:
        ckpt_dir = folder / CHECKPOINTS
        resume_from = self._resume_point(stage, ckpt_dir)
        if resume_from is None and self.is_writer:
            clear_folder(folder)
        before = self._run_hooks(stage.before, stage, datamodule)
        monitor = f"{stage.name}/{stage.monitor}"
        best, checkpoints = stage_checkpoints(
            ckpt_dir, monitor, self.checkpoint_every_n_steps, self.checkpoint_every_minutes
        )
        stop = SaveOnSignal(ckpt_dir / f"{LAST}.ckpt", stage.name)
        later = self.stages[self.stages.index(stage) + 1 :]
        estimate = RunEstimate(stage.name, [(s.name, self._max_epochs(s)) for s in later])
        callbacks: list[L.Callback] = [*checkpoints, stop, estimate, *self._validation_callbacks(stage)]
        if stage.patience is not None:
            callbacks.append(ResumableEarlyStopping(monitor=monitor, mode="min", patience=stage.patience))
        max_epochs = self._max_epochs(stage)
        trainer = self._make_trainer(stage, callbacks, max_epochs)
        module = self.make_module(self.net, stage)
        self._log({f"{stage.name}/trainable_params": trainable, f"{stage.name}/frozen_params": frozen})
        start_file = folder / "start.json"
        start: dict[str, Any] = {}
        if stage.validate_before:  # the starting weights' metrics, kept for a resumed run
            if resume_from is not None and start_file.is_file():
                start = json.loads(start_file.read_text())
            else:
                start = {f"start_{k}": v for k, v in self._validate(trainer, module, datamodule, stage).items()}
                if self.is_writer:
                    atomic_write_json(start_file, start)
        with stop.installed():
            trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)

        if best.best_model_path:
            load_net_weights(self.net, best.best_model_path)
        else:  # e.g. fast_dev_run writes no checkpoint: keep the weights in hand
            log.warning("stage %s: no checkpoint was written; continuing with the final weights", stage.name)
        metrics = {**start, **self._validate(trainer, module, datamodule, stage), "epochs": trainer.current_epoch}
        metrics["steps"] = trainer.global_step
        self.step = log_step(trainer)
        hooked = {**before, **self._run_hooks(stage.after, stage, datamodule)}
        metrics.update(hooked)
        self._log({f"{stage.name}/{k}": v for k, v in hooked.items() if isinstance(v, int | float)})
        weights = folder / WEIGHTS
        resumed = resume_from is not None
        result = StageResult(stage.name, key, False, resumed, trainable, frozen, str(weights), metrics, estimate.timing)
        if self.is_writer:
            save_weights(self.net.state_dict(), weights)
            if best.best_model_path:
                done = {**asdict(result), "weights": WEIGHTS, "weights_sha256": file_sha256(weights)}
                atomic_write_json(folder / DONE, done)
                self._drop_checkpoints(folder)
        if stop.signum is not None:  # the signal came at the end of the fit: the stage is finished, stop here
            raise StageInterrupted(stop.signum, stage.name, folder / DONE, trainer.global_step)
        return result

    def _max_epochs(self, stage: Stage) -> int:
        return stage.max_epochs if self.epochs_cap is None else min(stage.max_epochs, self.epochs_cap)

    def _drop_checkpoints(self, folder: Path) -> None:
        """A finished stage keeps one copy of its weights: resuming needed the checkpoints only until done.json."""
        if not self.keep_checkpoints and (folder / CHECKPOINTS).is_dir():
            shutil.rmtree(folder / CHECKPOINTS)

    def _resume_point(self, stage: Stage, ckpt_dir: Path) -> str | None:
        """`last.ckpt` when it and every other checkpoint of the stage are sound; else None (restart the stage)."""
        last = ckpt_dir / f"{LAST}.ckpt"
        if not last.is_file():
            return None
        problems = damaged_checkpoints(ckpt_dir)
        if problems:
            log.warning(
                "stage %s: damaged checkpoint(s), restarting the stage from its start: %s", stage.name, problems
            )
            return None
        log.info("stage %s: resuming from %s", stage.name, last)
        return str(last)

    def _verified_done(self, stage: Stage, folder: Path) -> dict[str, Any] | None:
        """The finished stage's record when its weights are intact; None when there is none or it is damaged."""
        done_file = folder / DONE
        if not done_file.exists():
            return None
        try:
            done = json.loads(done_file.read_text())
            weights = folder / done["weights"]
            if Path(done["weights"]).is_absolute() or weights.resolve().parent != folder:
                raise ValueError(f"it names {done['weights']!r}, outside its folder")
            if file_sha256(weights) != done["weights_sha256"]:
                raise ValueError(f"{weights} does not match its recorded sha256")
            load_net_weights(self.net, weights)
            if self.is_writer:
                self._drop_checkpoints(folder)  # left by a run stopped between done.json and their removal
            return done
        except Exception as err:  # noqa: BLE001 - missing, corrupt, tampered: retrain
            log.warning("stage %s: finished stage %s cannot be trusted (%s); retraining it", stage.name, done_file, err)
            if self.is_writer:
                clear_folder(folder)
            return None

    def _reuse(
        self,
        stage: Stage,
        key: str,
        folder: Path,
        done: dict[str, Any],
        datamodule: L.LightningDataModule,
        trainable: int,
        frozen: int,
    ) -> StageResult:
        """The finished stage's weights are loaded; its metrics are recomputed from them (one validation)."""
        log.info("stage %s: reusing finished stage %s", stage.name, folder)
        trainer = self._make_trainer(stage, self._validation_callbacks(stage), 1)
        module = self.make_module(self.net, stage)
        recorded = done.get("metrics", {})
        metrics = {k: v for k, v in recorded.items() if k.startswith("start_") or k in ("epochs", "steps")}
        metrics.update(self._validate(trainer, module, datamodule, stage))
        old, new = recorded.get("val_loss"), metrics.get("val_loss")
        if isinstance(old, float) and isinstance(new, float) and abs(old - new) > 1e-5 * max(1.0, abs(old)):
            log.warning("stage %s: recomputed val_loss %.6f differs from the recorded %.6f", stage.name, new, old)
        metrics.update(self._run_hooks(stage.after, stage, datamodule))  # later stages may depend on them
        scalars = {f"{stage.name}/{k}": v for k, v in metrics.items() if isinstance(v, int | float)}
        self._log({**scalars, f"{stage.name}/reused": 1})
        self.step += int(metrics.get("steps", 0))
        return StageResult(stage.name, key, True, False, trainable, frozen, str(folder / WEIGHTS), metrics)

    def _make_trainer(self, stage: Stage, callbacks: list[L.Callback], max_epochs: int) -> L.Trainer:
        trainer = self.make_trainer(stage, callbacks, max_epochs)
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()  # atomic writes, weights_only reads
        set_log_step(trainer, self.step)  # a resumed fit restores its own (same) value from last.ckpt
        return trainer

    def _validation_callbacks(self, stage: Stage) -> list[L.Callback]:
        return validation_callbacks(self.extra_callbacks(), stage)

    def _run_hooks(self, hooks: Sequence[StageHook], stage: Stage, datamodule: L.LightningDataModule) -> dict[str, Any]:
        """Runs the hooks; the metrics each returns join the stage's record."""
        metrics: dict[str, Any] = {}
        for hook in hooks:
            out = hook(runner=self, stage=stage, net=self.net, datamodule=datamodule)
            if not isinstance(out, Mapping):
                what = type(out).__name__
                raise TypeError(f"stage {stage.name!r}: hook {describe(hook)} returned {what}, not a dict of metrics")
            metrics.update(out)
        return metrics

    def _log(self, metrics: Mapping[str, float]) -> None:
        for logger in self.loggers:
            logger.log_metrics(dict(metrics), step=self.step)

    def _validate(self, trainer: L.Trainer, module: LMModule, datamodule, stage: Stage) -> dict[str, Any]:
        return validate(trainer, module, datamodule, stage)


def validation_callbacks(extra: Sequence[L.Callback], stage: Stage) -> list[L.Callback]:
    """A stage's validation callbacks: the run's, the stage's own, and position-wise PPL."""
    callbacks: list[L.Callback] = [*extra, *(make() for make in stage.callbacks)]
    if not any(isinstance(cb, PositionwisePPL) for cb in callbacks):
        callbacks.append(PositionwisePPL())
    return callbacks


def validate(trainer: L.Trainer, module: LMModule, datamodule: L.LightningDataModule, stage: Stage) -> dict[str, Any]:
    """Validate the weights in hand; returns `val_*` metrics without the stage prefix."""
    positions = next(cb for cb in trainer.callbacks if isinstance(cb, PositionwisePPL))
    (raw,) = trainer.validate(module, datamodule=datamodule, verbose=False)
    prefix = f"{stage.name}/"
    metrics: dict[str, Any] = {
        k[len(prefix) :]: float(v) for k, v in raw.items() if k.startswith(prefix) and "val_pos_ppl/" not in k
    }
    metrics["val_pos_ppl"] = dict(positions.last)
    return metrics


def set_log_step(trainer: L.Trainer, step: int) -> None:
    """Start the trainer's logging step at `step`. Lightning logs every metric at this counter (it is not the
    optimizer's `global_step`, which schedules use); it has no public setter."""
    trainer.fit_loop.epoch_loop._batches_that_stepped = step


def log_step(trainer: L.Trainer) -> int:
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


def clear_folder(folder: Path) -> bool:
    """Remove everything in a stage folder but its lock; True if anything was there."""
    if not folder.is_dir():
        return False
    entries = [p for p in folder.iterdir() if p.name != ".lock"]
    for p in entries:
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    return bool(entries)
