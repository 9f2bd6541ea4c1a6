"""Training entry point: `python -m kvcompress.train [group=option ...] [-m]`.

Builds the model, data, loggers and the phase runner from the Hydra config, runs every stage,
evaluates the result (val PPL, position-wise PPL, cache bytes per token, decode tokens/s) and
writes `metrics.json` in the run directory.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

import kvcompress  # noqa: F401  (registers attentions)
from kvcompress.models import GPTNeoX
from kvcompress.training import LMModule, PhaseRunner, Stage
from kvcompress.training.evaluate import run_evaluation
from kvcompress.training.phases import require_int
from kvcompress.utils import atomic_write_json

log = logging.getLogger(__name__)
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
# Trainer settings that do not change what a stage learns (left out of stage keys).
COSMETIC_TRAINER_KEYS = {"enable_progress_bar", "log_every_n_steps", "enable_model_summary", "default_root_dir"}


def _register_resolvers() -> None:
    if not OmegaConf.has_resolver("kvc.precision"):
        OmegaConf.register_new_resolver(
            "kvc.precision", lambda: "bf16-mixed" if torch.cuda.is_available() else "32-true"
        )
    if not OmegaConf.has_resolver("kvc.devices"):  # DDP: every GPU, or 2 CPU processes
        OmegaConf.register_new_resolver("kvc.devices", lambda: "auto" if torch.cuda.is_available() else 2)
    if not OmegaConf.has_resolver("kvc.pid"):
        OmegaConf.register_new_resolver("kvc.pid", os.getpid, use_cache=True)
    if not OmegaConf.has_resolver("kvc.wandb_offline"):
        OmegaConf.register_new_resolver(
            "kvc.wandb_offline", lambda: os.environ.get("WANDB_MODE", "offline") == "offline"
        )


_register_resolvers()


def build_hook(spec: Any, **context: Any) -> Any:
    """A hook, callback factory or evaluation, partially applied; a target with `check_settings` checks its
    settings (and `context`, e.g. the model) now, before any training."""
    hook = instantiate(spec, _partial_=True)
    check = getattr(hook.func, "check_settings", None)
    if check is not None:
        check(**hook.keywords, **context)
    return hook


def build_stages(phase_cfg: DictConfig) -> list[Stage]:
    stages = []
    for name, spec in phase_cfg.stages.items():
        spec = OmegaConf.to_container(spec, resolve=True)
        for field in ("before", "after", "callbacks"):
            spec[field] = [build_hook(h) for h in spec.get(field, [])]
        stages.append(Stage(name=name, **spec))
    return stages


def build_loggers(cfg: DictConfig) -> list[Logger]:
    return [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    if not cfg.trainer.get("enable_progress_bar", True):
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    return callbacks


def fingerprint(cfg: DictConfig) -> dict[str, Any]:
    """Everything outside a stage's own config that changes what it learns."""
    trainer = {k: v for k, v in OmegaConf.to_container(cfg.trainer, resolve=True).items()}
    return {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "module": OmegaConf.to_container(cfg.module, resolve=True),
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "trainer": {k: v for k, v in trainer.items() if k not in COSMETIC_TRAINER_KEYS},
        "optimizer": OmegaConf.to_container(cfg.optimizer, resolve=True),
        "scheduler": OmegaConf.to_container(cfg.scheduler, resolve=True),
        "seed": cfg.seed,
        "compile": cfg.compile,
        "epochs_cap": cfg.phase.get("epochs_cap"),
    }


def check_before_training(cfg: DictConfig, net: GPTNeoX, datamodule: L.LightningDataModule) -> None:
    """Bad input fails here, before any stage starts."""
    seq_len = int(cfg.data.seq_len)
    if seq_len > net.cfg.max_position_embeddings:
        raise ValueError(
            f"data.seq_len={seq_len} is larger than the model's position limit "
            f"max_position_embeddings={net.cfg.max_position_embeddings}"
        )
    net.build_caches(1, 2, kind=cfg.cache.name)  # raises when the cache cannot serve this model
    for kind in cfg.eval.get("caches") or []:
        net.build_caches(1, 2, kind=kind)
    if net.cfg.attention == "mka" and cfg.model.init_from is None and "base" not in cfg.phase.stages:
        raise ValueError(
            "model=mka has no base weights to load: set model.init_from (a Hugging Face Pythia directory or "
            "Hub name, or a kvcompress .ckpt), or use phase=base_then_frozen_base to train the base first"
        )
    datamodule.setup("fit")  # raises on empty or unreachable data
    if getattr(datamodule, "vocab_size", 0) > net.cfg.vocab_size:
        raise ValueError(f"tokenizer vocab {datamodule.vocab_size} exceeds model vocab_size {net.cfg.vocab_size}")


def check_settings(cfg: DictConfig) -> None:
    """Settings that are wrong whatever the model and data: fail before anything is built, naming them."""
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int):
        raise ValueError(f"seed must be an integer, got {cfg.seed!r}")
    if "lr" in cfg.optimizer:
        raise ValueError(
            f"optimizer.lr={cfg.optimizer.lr} would be ignored: each stage sets its own lr. "
            "Set phase.stages.<stage>.lr instead."
        )
    if cfg.phase.get("epochs_cap") is not None:
        require_int(cfg.phase.epochs_cap, "phase.epochs_cap", minimum=1)


def train(cfg: DictConfig) -> dict[str, Any]:
    check_settings(cfg)
    stages = build_stages(cfg.phase)  # each stage checks its own settings
    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision("high")
    output_dir = Path(cfg.paths.output_dir)
    net: GPTNeoX = instantiate(cfg.model)

    datamodule: L.LightningDataModule = instantiate(cfg.data)

    def make_datamodule(overrides: dict[str, Any]) -> L.LightningDataModule:
        """The run's data (already set up) unless the stage overrides it."""
        return instantiate(OmegaConf.merge(cfg.data, overrides)) if overrides else datamodule

    check_before_training(cfg, net, datamodule)
    # Method evaluations after training, by name: fn(net=, datamodule=) -> metrics (e.g. eval=lego).
    extra_evaluations = {name: build_hook(spec, net=net) for name, spec in (cfg.eval.get("extra") or {}).items()}
    loggers = build_loggers(cfg)

    def make_trainer(stage: Stage, callbacks: list[L.Callback], max_epochs: int) -> L.Trainer:
        return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, max_epochs=max_epochs)

    make_lightning_module = instantiate(cfg.module)  # a partial: the module class and its own settings

    def make_module(model: GPTNeoX, stage: Stage) -> LMModule:
        optimizer = instantiate(cfg.optimizer, lr=stage.lr)
        scheduler = OmegaConf.to_container(cfg.scheduler, resolve=True)
        return make_lightning_module(
            net=model, optimizer=optimizer, scheduler=scheduler, losses=stage.losses, metric_prefix=stage.name
        )

    runner = PhaseRunner(
        net,
        stages,
        make_datamodule,
        make_trainer,
        make_module,
        stage_root=cfg.paths.stage_dir,
        fingerprint=fingerprint(cfg),
        reuse=cfg.phase.reuse,
        extra_callbacks=lambda: build_callbacks(cfg),
        loggers=loggers,
        epochs_cap=cfg.phase.get("epochs_cap"),
        checkpoint_every_n_steps=cfg.checkpoint.get("every_n_steps"),
        checkpoint_every_minutes=cfg.checkpoint.get("every_minutes"),
    )
    try:
        results = runner.run()
        final = results[-1]
        metrics: dict[str, Any] = {
            "val_ppl": final.metrics.get("val_ppl"),
            "val_loss": final.metrics.get("val_loss"),
            "val_acc": final.metrics.get("val_acc"),
            "val_pos_ppl": final.metrics.get("val_pos_ppl"),
            "params": {"total": net.num_parameters()},
            "stages": {
                r.name: {
                    "key": r.key,
                    "reused": r.reused,
                    "resumed": r.resumed,
                    "trainable_params": r.trainable_params,
                    "frozen_params": r.frozen_params,
                    "weights": r.weights,
                    **r.metrics,
                }
                for r in results
            },
        }
        if rank_zero_only.rank != 0:  # DDP: the other ranks trained alongside; rank 0 evaluates and writes
            return metrics
        device = "cuda" if torch.cuda.is_available() and cfg.trainer.get("accelerator") != "cpu" else "cpu"
        evaluation = run_evaluation(net.to(device), datamodule, OmegaConf.to_container(cfg.eval, resolve=True))
        for name, evaluate in extra_evaluations.items():
            evaluation[name] = evaluate(net=net, datamodule=datamodule)
        metrics.update(evaluation)
        for logger in loggers:
            logger.log_metrics({f"eval/{k}": v for k, v in _flatten(evaluation).items()})
            logger.save()  # metrics logged after the last fit (hooks, evaluation) are buffered until now
        atomic_write_json(output_dir / "metrics.json", metrics)
        log.info("metrics written to %s", output_dir / "metrics.json")
        return metrics
    finally:
        for logger in loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                wandb.finish()


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        elif isinstance(v, int | float) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


def objective(cfg: DictConfig, metrics: dict[str, Any]) -> float | None:
    """What a sweeper minimizes: val PPL, or inf when the cache is over `cache_budget` (a share of KV's bytes)."""
    budget, cache = cfg.get("cache_budget"), metrics.get("cache") or {}
    if budget is not None and cache and cache["bytes_per_token"] > budget * cache["kv_bytes_per_token"]:
        log.warning("cache %.0f B/token is over the budget %s x KV: objective = inf", cache["bytes_per_token"], budget)
        return float("inf")
    return metrics.get("val_ppl")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    return objective(cfg, train(cfg))


if __name__ == "__main__":
    main()
