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
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import lightning as L
import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from kvcompress.config import require_int
from kvcompress.evaluation.windows import write_windows
from kvcompress.models import GPTNeoX
from kvcompress.models.weights import load_weights, save_weights
from kvcompress.training.callbacks import PositionwisePPL, RunEstimate, trainer_callbacks
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
FINAL_WINDOWS = "windows_final.safetensors"  # per-window losses of a stage's last-epoch weights (before the best)
START_WINDOWS = "windows_start.safetensors"  # ... and of its starting weights, when it validates first


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
    # A step budget: each epoch trains at most ceil(max_steps / max_epochs) batches (Lightning's limit_train_batches),
    # e.g. max_steps batches with max_epochs=1, fewer if an epoch is shorter (0: validation only); None: whole epochs.
    max_steps: int | None = None
    patience: int | None = 1  # early-stopping patience in validations; None disables it
    monitor: str = "val_loss"
    data: dict[str, Any] = field(default_factory=dict)  # overrides of the run's data config
    init: str = "previous"  # "previous" (the weights in hand) or a checkpoint path
    before: list[StageHook] = field(default_factory=list)  # run before the fit (not when reused)
    after: list[StageHook] = field(default_factory=list)  # run after the fit or the reuse (e.g. mining)
    callbacks: list[Any] = field(default_factory=list)  # this stage's own callbacks (factories)
    # also record the metrics of the starting weights (`start_val_*`; per window in `windows_start.safetensors`)
    validate_before: bool = False

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"stage name must be non-empty without '/': {self.name!r}")
        where = f"phase.stages.{self.name}"
        require_int(self.max_epochs, f"{where}.max_epochs", minimum=1)
        if self.max_steps is not None:
            require_int(self.max_steps, f"{where}.max_steps", minimum=0)
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
    damaged is reported by name and the stage restarts from its last good state. A finished stage is never
    destroyed by a retrain (`reuse=False`, or a damaged one): the retrain runs in a sibling folder that replaces it
    only once finished. `inputs` (content hashes of the data, tokenizer and `init_from`) go into every key, so
    another file at the same path trains a new stage. A signal during a fit saves `last.ckpt` and stops the run
    (`SaveOnSignal`).
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
        inputs: Mapping[str, Any] | None = None,
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
        self.inputs = dict(inputs or {})  # content hashes of the files that shape the result (data, tokenizer, ...)
        self._init_sha256: dict[str, str] = {}  # a stage's own `init` checkpoint: hashed once
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
        self.windows: dict[str, Any] = {}  # per-window losses of the latest validation (the last stage's final one)

    @property
    def is_writer(self) -> bool:
        """Rank 0 (or the only process) owns the stage folders."""
        return rank_zero_only.rank == 0  # type: ignore[attr-defined]  # Lightning sets `rank` on the decorator

    def stage_key(self, stage: Stage, parent_key: str) -> str:
        """The stage's folder key: its config, its parent's key, the run's fingerprint and the contents of the files
        that shape it (a changed data file, tokenizer or starting checkpoint gives a new stage)."""
        contents = {"inputs": content_only(self.inputs), "init": self._init_hash(stage)}
        return stable_hash(
            {"stage": stage.key_fields(), "parent": parent_key, "fingerprint": self.fingerprint, **contents}
        )

    def config_key(self, stage: Stage, parent_config_key: str) -> str:
        """The key without file contents: stages with the same config but other contents share it."""
        return stable_hash({"stage": stage.key_fields(), "parent": parent_config_key, "fingerprint": self.fingerprint})

    def _init_hash(self, stage: Stage) -> str | None:
        if stage.init == "previous":
            return None
        if stage.init not in self._init_sha256:
            self._init_sha256[stage.init] = file_sha256(stage.init)
        return self._init_sha256[stage.init]

    def validate_before_training(self) -> None:
        """Check every stage's patterns on the net up front, so bad config fails before any fit."""
        for stage in self.stages:
            set_trainable(self.net, stage)
            if stage.init != "previous" and not Path(stage.init).is_file():
                raise FileNotFoundError(f"stage {stage.name!r}: init checkpoint {stage.init} does not exist")

    def run(self) -> list[StageResult]:
        self.validate_before_training()
        parent_key = parent_config = "init"
        for stage in self.stages:
            result = self.run_stage(stage, parent_key, parent_config)
            self.results.append(result)
            parent_key, parent_config = result.key, self.config_key(stage, parent_config)
        return self.results

    def run_stage(self, stage: Stage, parent_key: str, parent_config: str = "init") -> StageResult:
        key, config_key = self.stage_key(stage, parent_key), self.config_key(stage, parent_config)
        folder = (self.stage_root / f"{stage.name}-{key}").resolve()
        self.folder = folder
        # Under DDP every rank runs this; only rank 0 locks and writes, the others read the same files.
        with StageLock(folder, stage.name) if self.is_writer else contextlib.nullcontext():
            if self.is_writer:
                finish_interrupted_swap(folder)
            stale = remove_stale_temp_files(folder) if self.is_writer else []
            if stale:
                log.warning("stage %s: removed temp files of an interrupted write: %s", stage.name, stale)
            if stage.init != "previous":
                load_net_weights(self.net, stage.init)
            trainable, frozen = set_trainable(self.net, stage)
            datamodule = self.make_datamodule(stage.data)
            finished = (folder / DONE).exists()
            if self.reuse and finished:
                done = self._verified_done(stage, folder)
                if done is not None:
                    return self._reuse(stage, key, folder, done, datamodule, trainable, frozen)
            elif finished:
                log.info("stage %s: phase.reuse=false, retraining beside the finished stage %s", stage.name, folder)
            else:
                self._log_changed_inputs(stage, config_key)
            if not finished:  # (phase.reuse=false restarts an interrupted stage; else it resumes)
                if not self.reuse and self.is_writer and clear_folder(folder):
                    log.info("stage %s: phase.reuse=false, restarting the unfinished stage %s", stage.name, folder)
                return self._train(stage, key, folder, datamodule, trainable, frozen, config_key)
            # A finished stage is never destroyed by a retrain that fails: train into a fresh sibling folder and
            # put it in place (renames) only once it is finished.
            fresh = sibling(folder, FRESH)
            if self.is_writer:
                remove_tree(fresh)
            self.folder = fresh
            result = self._train(stage, key, fresh, datamodule, trainable, frozen, config_key)
            if self.is_writer:
                replace_folder(fresh, folder)
            self.folder = folder
            result.weights = str(folder / WEIGHTS)
            return result

    def _log_changed_inputs(self, stage: Stage, config_key: str) -> None:
        """One line when a finished stage with this config but other file contents exists: which file changed."""
        for done_file in sorted(self.stage_root.glob(f"{stage.name}-*/{DONE}")):
            try:
                done = json.loads(done_file.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(done, dict) and done.get("config_key") == config_key:
                changes = changed_inputs(done.get("inputs") or {}, self.inputs)
                if changes:
                    log.warning(
                        "stage %s: %s changed since the finished stage %s; training a new stage",
                        stage.name,
                        "; ".join(changes),
                        done_file.parent,
                    )
                    return

    def _train(
        self,
        stage: Stage,
        key: str,
        folder: Path,
        datamodule: L.LightningDataModule,
        trainable: int,
        frozen: int,
        config_key: str = "",
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
        stopper = None
        if stage.patience is not None:
            stopper = ResumableEarlyStopping(monitor=monitor, mode="min", patience=stage.patience)
            callbacks.append(stopper)
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
                    if self.windows:
                        meta = {"stage": stage.name, "weights": "start"}
                        write_windows(folder, self.windows, meta, filename=START_WINDOWS)
                    atomic_write_json(start_file, start)
        with stop.installed():
            trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)

        # The last epoch's weights (a report may quote them: an overfit stop-epoch table), before the best load.
        final = self._validate_final(trainer, module, datamodule, stage, folder)
        final["stopped_early"] = int(bool(stopper is not None and stopper.stopped_epoch > 0))
        if best.best_model_path:
            load_net_weights(self.net, best.best_model_path)
        else:  # e.g. fast_dev_run writes no checkpoint: keep the weights in hand
            log.warning("stage %s: no checkpoint was written; continuing with the final weights", stage.name)
        metrics = {**start, **final, **self._validate(trainer, module, datamodule, stage)}
        metrics["epochs"] = trainer.current_epoch
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
                done.update(config_key=config_key, inputs=self.inputs)
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
            log.warning(
                "stage %s: finished stage %s cannot be trusted (%s); retraining it beside (it is replaced once the "
                "new one is finished)",
                stage.name,
                done_file,
                err,
            )
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
        kept = ("epochs", "steps", "stopped_early")  # of the training, and the last epoch's weights (not kept)
        metrics = {k: v for k, v in recorded.items() if k.startswith(("start_", "final_")) or k in kept}
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
        if stage.max_steps is not None:  # the stage's step budget, spread over its (uncapped) epochs
            per_epoch = -(-stage.max_steps // stage.max_epochs)
            limit = trainer.limit_train_batches
            trainer.limit_train_batches = min(per_epoch, limit) if isinstance(limit, int) else per_epoch
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
        metrics = validate(trainer, module, datamodule, stage)
        self.windows = validation_windows(trainer)
        return metrics

    def _validate_final(
        self, trainer: L.Trainer, module: LMModule, datamodule: L.LightningDataModule, stage: Stage, folder: Path
    ) -> dict[str, Any]:
        """`final_val_*` of the weights the fit ended with, and their per-window losses (`windows_final.safetensors`
        in the stage folder, gathered over ranks like every validation's records)."""
        final = {f"final_{k}": v for k, v in self._validate(trainer, module, datamodule, stage).items()}
        final["final_epoch"] = trainer.current_epoch
        if self.is_writer and self.windows:
            meta = {"stage": stage.name, "weights": "final"}
            write_windows(folder, self.windows, meta, filename=FINAL_WINDOWS)
        return final


def validation_callbacks(extra: Sequence[L.Callback], stage: Stage) -> list[L.Callback]:
    """A stage's validation callbacks: the run's, the stage's own, and position-wise PPL."""
    callbacks: list[L.Callback] = [*extra, *(make() for make in stage.callbacks)]
    if not any(isinstance(cb, PositionwisePPL) for cb in callbacks):
        callbacks.append(PositionwisePPL())
    return callbacks


def positionwise_callback(trainer: L.Trainer) -> PositionwisePPL:
    """The trainer's `PositionwisePPL` (every stage's trainer has one)."""
    return next(cb for cb in trainer_callbacks(trainer) if isinstance(cb, PositionwisePPL))


def validate(trainer: L.Trainer, module: LMModule, datamodule: L.LightningDataModule, stage: Stage) -> dict[str, Any]:
    """Validate the weights in hand; returns `val_*` metrics without the stage prefix."""
    positions = positionwise_callback(trainer)
    (raw,) = trainer.validate(module, datamodule=datamodule, verbose=False)
    prefix = f"{stage.name}/"
    metrics: dict[str, Any] = {
        k[len(prefix) :]: float(v) for k, v in raw.items() if k.startswith(prefix) and "val_pos_ppl/" not in k
    }
    metrics["val_pos_ppl"] = dict(positions.last)
    return metrics


def validation_windows(trainer: L.Trainer) -> dict[str, Any]:
    """The per-window losses of the trainer's latest validation (`PositionwisePPL.windows`)."""
    return dict(positionwise_callback(trainer).windows)


def set_log_step(trainer: L.Trainer, step: int) -> None:
    """Start the trainer's logging step at `step`. Lightning logs every metric at this counter (it is not the
    optimizer's `global_step`, which schedules use); it has no public setter."""
    trainer.fit_loop.epoch_loop._batches_that_stepped = step


def log_step(trainer: L.Trainer) -> int:
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


def clear_folder(folder: Path) -> bool:
    """Remove everything in a stage folder (an unfinished one: a finished stage is replaced by `replace_folder`);
    True if anything was there."""
    if not folder.is_dir():
        return False
    entries = list(folder.iterdir())
    for p in entries:
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    return bool(entries)


FRESH, REPLACED = ".new", ".old"  # a retrain's folder, and the finished one it replaces, beside the stage folder


def sibling(folder: Path, tag: str) -> Path:
    return folder.with_name(f".{folder.name}{tag}")


def remove_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def replace_folder(fresh: Path, folder: Path) -> None:
    """Put the finished `fresh` folder in the place of `folder` by two renames, then remove the old one. A kill
    between the renames is completed by `finish_interrupted_swap` on the next start (under the stage lock)."""
    old = sibling(folder, REPLACED)
    remove_tree(old)
    if folder.exists():
        os.rename(folder, old)
    os.rename(fresh, folder)
    remove_tree(old)


def finish_interrupted_swap(folder: Path) -> None:
    """After a kill inside `replace_folder`: the finished new folder (else the old one) takes the stage's place;
    leftovers (a retrain killed before it finished, an old folder not yet removed) are removed."""
    fresh, old = sibling(folder, FRESH), sibling(folder, REPLACED)
    if not folder.exists():
        for candidate in (fresh, old):
            if (candidate / DONE).is_file():
                log.warning("stage folder %s: completing an interrupted replacement from %s", folder, candidate)
                os.rename(candidate, folder)
                break
    for leftover in (fresh, old):
        remove_tree(leftover)


def content_only(inputs: Any) -> Any:
    """The inputs record without where the files are (`origin`, `source`, `path`): keys depend on contents only."""
    if isinstance(inputs, Mapping):
        return {k: content_only(v) for k, v in inputs.items() if k not in ("origin", "source", "path")}
    return inputs


def changed_inputs(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """'data.train (<file>): sha256 1a2b3c4d5e6f -> 9f8e7d6c5b4a' for each input whose contents differ."""

    def digest(entry: Any) -> str:
        if isinstance(entry, Mapping):
            hashes = [str(v) for k, v in entry.items() if k.endswith("sha256") and v]
            return hashes[0][:12] if hashes else stable_hash(content_only(entry))
        return "none" if entry is None else stable_hash(entry)

    items: list[tuple[str, Any, Any]] = []
    for group in sorted(set(old) | set(new)):
        a, b = old.get(group), new.get(group)
        if isinstance(a, Mapping) and isinstance(b, Mapping) and group == "data":
            items += [(f"data.{s}", a.get(s), b.get(s)) for s in sorted(set(a) | set(b))]
        else:
            items.append((group, a, b))
    out = []
    for name, a, b in items:
        if content_only(a) != content_only(b):
            entry = b if isinstance(b, Mapping) else a if isinstance(a, Mapping) else {}
            where = next((str(entry[k]) for k in ("origin", "source", "path") if entry.get(k)), "")
            out.append(f"{name}{f' ({where})' if where else ''}: sha256 {digest(a)} -> {digest(b)}")
    return out
