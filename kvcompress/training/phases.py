"""Multi-phase training as data: a list of stages, each its own Lightning fit.

A stage names what trains (parameter-name patterns; everything else is frozen and left out of the
optimizer), its losses and weights, lr, epochs, early stopping and data. Each stage gets a folder
keyed by a hash of its config and of everything it starts from, so a later run with the same inputs
reuses the finished stage, and a killed run resumes the interrupted stage from `last.ckpt`.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import Logger

from kvcompress.models import GPTNeoX
from kvcompress.training.callbacks import PositionwisePPL
from kvcompress.training.module import LMModule
from kvcompress.utils import atomic_write_json, stable_hash

log = logging.getLogger(__name__)

# A hook runs between stages: hook(runner=..., stage=..., net=..., datamodule=...).
StageHook = Callable[..., None]


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
    before: list[Any] = field(default_factory=list)  # hooks run before the fit (not when reused)
    after: list[Any] = field(default_factory=list)  # hooks run after the fit or the reuse (e.g. mining)
    callbacks: list[Any] = field(default_factory=list)  # this stage's own callbacks (factories)
    validate_before: bool = False  # also record the metrics of the starting weights (`start_val_*`)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"stage name must be non-empty without '/': {self.name!r}")
        self.train, self.freeze = list(self.train), list(self.freeze)
        self.losses, self.data = dict(self.losses), dict(self.data)

    def key_fields(self) -> dict[str, Any]:
        fields = asdict(self)
        for name in ("before", "after", "callbacks"):
            fields[name] = [describe(f) for f in getattr(self, name)]
        return fields


def describe(fn: Any) -> str:
    """A process-independent name for a hook or callback factory (a repr would hold a memory address)."""
    if isinstance(fn, functools.partial):
        return f"{describe(fn.func)}(*{fn.args!r}, **{dict(sorted(fn.keywords.items()))!r})"
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"


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


def load_net_weights(net: GPTNeoX, ckpt_path: str | Path) -> None:
    """Load the `net.*` weights of a Lightning checkpoint (raises on a corrupt or foreign file)."""
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    state = {k[len("net.") :]: v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
    net.load_state_dict(state, strict=True)


def checkpoint_is_loadable(path: Path) -> bool:
    try:
        torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
        return True
    except Exception as err:  # noqa: BLE001 - any failure means corrupt
        log.warning("checkpoint %s is corrupt (%s: %s)", path, type(err).__name__, err)
        return False


class SaveLast(L.Callback):
    """Writes `last.ckpt` after every validation (atomically), whether or not the monitor improved."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or trainer.fast_dev_run:
            return
        trainer.save_checkpoint(self.path)


@dataclass
class StageResult:
    name: str
    key: str
    reused: bool
    resumed: bool
    trainable_params: int
    frozen_params: int
    best_checkpoint: str
    metrics: dict[str, Any]


class PhaseRunner:
    """Runs stages in order on one `net`, under one set of loggers.

    `make_datamodule(overrides)` builds the data for a stage; `make_trainer(stage, callbacks, max_epochs)`
    builds its Trainer (with `loggers`); `make_module(net, stage)` builds its LightningModule.
    `fingerprint` is everything outside the stage that changes its result (model, data, trainer,
    optimizer, seed); it goes into every stage key.
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
    ) -> None:
        if not stages:
            raise ValueError("a phase needs at least one stage")
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique: {names}")
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
        self.results: list[StageResult] = []

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
        folder = self.stage_root / f"{stage.name}-{key}"
        done_file = folder / "done.json"
        if stage.init != "previous":
            load_net_weights(self.net, stage.init)
        trainable, frozen = set_trainable(self.net, stage)
        datamodule = self.make_datamodule(stage.data)

        if done_file.exists() and self.reuse:
            reused = self._try_reuse(stage, key, folder, trainable, frozen)
            if reused is not None:
                self._run_hooks(stage.after, stage, datamodule)  # later stages may depend on them
                return reused
        if folder.exists() and not self.reuse:
            log.info("stage %s: phase.reuse=false, retraining (removing %s)", stage.name, folder)
            shutil.rmtree(folder)

        ckpt_dir = folder / "checkpoints"
        last = ckpt_dir / "last.ckpt"
        resume_from = None
        if last.exists():
            if checkpoint_is_loadable(last):
                resume_from = str(last)
                log.info("stage %s: resuming from %s", stage.name, last)
            else:
                log.warning("stage %s: last checkpoint is corrupt, retraining the stage from its start", stage.name)
                shutil.rmtree(ckpt_dir)

        self._run_hooks(stage.before, stage, datamodule)
        monitor = f"{stage.name}/{stage.monitor}"
        checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=monitor, mode="min", save_top_k=1)
        callbacks: list[L.Callback] = [checkpoint, SaveLast(last), *self.extra_callbacks()]
        callbacks += [make() for make in stage.callbacks]
        if not any(isinstance(cb, PositionwisePPL) for cb in callbacks):
            callbacks.append(PositionwisePPL())
        if stage.patience is not None:
            callbacks.append(EarlyStopping(monitor=monitor, mode="min", patience=stage.patience))
        max_epochs = stage.max_epochs if self.epochs_cap is None else min(stage.max_epochs, self.epochs_cap)
        trainer = self.make_trainer(stage, callbacks, max_epochs)
        module = self.make_module(self.net, stage)
        self._log({f"{stage.name}/trainable_params": trainable, f"{stage.name}/frozen_params": frozen})
        start = {}
        if stage.validate_before and resume_from is None:
            start = {f"start_{k}": v for k, v in self._validate(trainer, module, datamodule, stage).items()}
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)

        best = checkpoint.best_model_path or (str(last) if last.exists() else "")
        if best:
            load_net_weights(self.net, best)
        else:  # e.g. fast_dev_run writes no checkpoint: keep the weights in hand
            log.warning("stage %s: no checkpoint was written; continuing with the final weights", stage.name)
        metrics = {**start, **self._validate(trainer, module, datamodule, stage)}
        self._run_hooks(stage.after, stage, datamodule)
        result = StageResult(stage.name, key, False, resume_from is not None, trainable, frozen, best, metrics)
        if best:
            atomic_write_json(done_file, asdict(result))
        return result

    def _run_hooks(self, hooks: Sequence[StageHook], stage: Stage, datamodule: L.LightningDataModule) -> None:
        for hook in hooks:
            hook(runner=self, stage=stage, net=self.net, datamodule=datamodule)

    def _log(self, metrics: Mapping[str, float]) -> None:
        for logger in self.loggers:
            logger.log_metrics(dict(metrics))

    def _validate(self, trainer: L.Trainer, module: LMModule, datamodule, stage: Stage) -> dict[str, Any]:
        """Validate the best weights; returns `val_*` metrics without the stage prefix."""
        positions = next(cb for cb in trainer.callbacks if isinstance(cb, PositionwisePPL))
        (raw,) = trainer.validate(module, datamodule=datamodule, verbose=False)
        prefix = f"{stage.name}/"
        metrics: dict[str, Any] = {
            k[len(prefix) :]: float(v) for k, v in raw.items() if k.startswith(prefix) and "val_pos_ppl/" not in k
        }
        metrics["val_pos_ppl"] = dict(positions.last)
        metrics["epochs"] = trainer.current_epoch
        return metrics

    def _try_reuse(self, stage: Stage, key: str, folder: Path, trainable: int, frozen: int) -> StageResult | None:
        try:
            done = json.loads((folder / "done.json").read_text())
            load_net_weights(self.net, done["best_checkpoint"])
        except Exception as err:  # noqa: BLE001 - missing/corrupt: retrain
            log.warning("stage %s: finished stage at %s cannot be loaded (%s); retraining", stage.name, folder, err)
            shutil.rmtree(folder)
            return None
        log.info("stage %s: reusing finished stage %s", stage.name, folder)
        metrics = done["metrics"]
        scalars = {f"{stage.name}/{k}": v for k, v in metrics.items() if isinstance(v, int | float)}
        self._log({**scalars, f"{stage.name}/reused": 1})
        return StageResult(stage.name, key, True, False, trainable, frozen, done["best_checkpoint"], metrics)
