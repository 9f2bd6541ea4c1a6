"""The run harness: what `python -m kvcompress.train` and `python -m kvcompress.eval` share.

- `prepare(cfg)`: every check that bad input fails (settings, tokenizer, data, model, caches, stage settings),
  before anything is written; returns a `PreparedRun`.
- `train_stages(run)`: every stage (the phase runner), then `end_of_run`; `train(cfg)` is `prepare` + this.
- `evaluate_weights(run)`: one validation of the last stage's module, then `end_of_run` (the eval entry point).
- `end_of_run`: the end-of-run evaluation (`kvcompress.evaluation`) joined with the run record, logged and written
  to `metrics.json`; the per-window losses (final validation, autoregressive caches, context check) to
  `windows.safetensors` (`kvcompress.evaluation.windows`).
- `run_guarded(cfg, job)`: lightning-hydra-template's task wrapper: bad input is one line and exit code 1, every
  failure goes to train.log, W&B is always closed, a failed multirun job is recorded and the sweep goes on.

Heavy imports (Lightning) wait until a run starts, so `--help` and a missing data folder answer fast.
"""

from __future__ import annotations

import logging
import shlex
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from kvcompress.config import EvalConfig, require_int
from kvcompress.data.tokenizer import DEFAULT_TOKENIZER, DataUnavailableError, load_tokenizer
from kvcompress.records import COSMETIC_TRAINER_KEYS, FAILURE_FILE, check_targets, register_resolvers, run_record
from kvcompress.records import RefusedOverride as RefusedOverride  # what eval composes from a run folder (re-exported)
from kvcompress.records import quoted_override as quoted_override
from kvcompress.records import run_folder_overrides as run_folder_overrides
from kvcompress.utils import DiskFullError, atomic_write_json, atomic_write_text, content_sha256

if TYPE_CHECKING:
    import lightning as L
    from lightning.pytorch.loggers import Logger

    from kvcompress.data.datamodule import TokenWindowDataModule
    from kvcompress.models import GPTNeoX
    from kvcompress.training import LMModule, Stage

log = logging.getLogger(__name__)
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
# Errors of bad input, raised before anything trains: reported in one line, without a traceback.
INPUT_ERRORS = (DataUnavailableError, FileNotFoundError, ValueError, KeyError, InstantiationException)
Job = Callable[["PreparedRun"], dict[str, Any]]
# The files of a Hugging Face folder that `model.init_from` loads (hashed into the stage keys).
HF_WEIGHT_FILES = ("config.json", "*.safetensors", "*.safetensors.index.json")

register_resolvers()


def quiet_library_warnings() -> None:
    """Warnings of the libraries that say nothing true about a kvcompress run: Lightning 2.6 still uses torch's
    deprecated `LeafSpec` (nothing to act on), and it calls our mid-epoch resume unreliable because our loader
    resumes itself (`data.datamodule`; tested exact by tests/test_resume.py)."""
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
    )
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")


def build_hook(spec: Any, **context: Any) -> Any:
    """A stage hook, callback factory or evaluation from its config, before any training: a class target is
    constructed now (its constructor checks its settings) and, when it has a `check` method, checks `context`
    too (e.g. the model); a function target is partially applied."""
    from hydra.utils import instantiate

    hook = instantiate(spec, _partial_=True)
    if isinstance(hook.func, type) and not _is_lightning_callback(hook.func):
        hook = hook()
        if hasattr(hook, "check") and context:
            hook.check(**context)
    return hook


def _is_lightning_callback(cls: type) -> bool:
    """Callback classes stay factories: every fit gets a fresh one."""
    import lightning as L

    return issubclass(cls, L.Callback)


def build_stages(phase_cfg: DictConfig) -> list[Stage]:
    from kvcompress.training import Stage

    stages = []
    for name, spec in phase_cfg.stages.items():
        spec = cast(dict[str, Any], OmegaConf.to_container(spec, resolve=True))  # a DictConfig gives a dict
        for field in ("before", "after", "callbacks"):
            spec[field] = [build_hook(h) for h in spec.get(field, [])]
        stages.append(Stage(name=name, **spec))
    return stages


def build_loggers(cfg: DictConfig) -> list[Logger]:
    from hydra.utils import instantiate
    from lightning.pytorch.loggers import WandbLogger

    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    for logger in loggers:
        if isinstance(logger, WandbLogger):  # Lightning passes anonymous=None, which wandb warns has no effect
            logger._wandb_init.pop("anonymous", None)
    return loggers


def build_callbacks(cfg: DictConfig, with_logger: bool = True) -> list[L.Callback]:
    """The `callbacks` group; the LR monitor only when there is a logger, the progress bar only when enabled."""
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar

    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    if not cfg.trainer.get("enable_progress_bar", True):
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    if not with_logger:
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    return callbacks


def fingerprint(cfg: DictConfig) -> dict[str, Any]:
    """Everything outside a stage's own config that changes what it learns."""
    trainer = cast(dict[str, Any], OmegaConf.to_container(cfg.trainer, resolve=True))  # a DictConfig gives a dict
    return {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "module": OmegaConf.to_container(cfg.module, resolve=True),
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "trainer": {k: v for k, v in trainer.items() if k not in COSMETIC_TRAINER_KEYS},
        "optimizer": OmegaConf.to_container(cfg.optimizer, resolve=True),
        "scheduler": OmegaConf.to_container(cfg.scheduler, resolve=True) if cfg.get("scheduler") else None,
        "seed": cfg.seed,
        "compile": cfg.compile,
        "epochs_cap": cfg.phase.get("epochs_cap"),
    }


def check_settings(cfg: DictConfig) -> None:
    """Settings that are wrong whatever the model and data: fail before anything is built, naming them."""
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int):
        raise ValueError(f"seed must be an integer, got {cfg.seed!r}")
    if "lr" in cfg.optimizer:
        raise ValueError(optimizer_lr_refused(cfg.optimizer.lr))
    if cfg.phase.get("epochs_cap") is not None:
        require_int(cfg.phase.epochs_cap, "phase.epochs_cap", minimum=1)
    check_trainer_settings(cfg.trainer)
    every_n, minutes = cfg.checkpoint.get("every_n_steps"), cfg.checkpoint.get("every_minutes")
    if every_n is not None:
        require_int(every_n, "checkpoint.every_n_steps", minimum=1)  # (or null)
    if minutes is not None and (isinstance(minutes, bool) or not isinstance(minutes, int | float) or minutes <= 0):
        raise ValueError(f"checkpoint.every_minutes must be null or a number > 0, got {minutes!r}")


def check_trainer_settings(trainer: DictConfig) -> None:
    """The Trainer settings that otherwise fail after training, or as a traceback, or silently."""
    if trainer.get("max_steps") is not None:
        require_int(trainer.max_steps, "trainer.max_steps", minimum=-1)  # -1: no limit
    if trainer.get("accumulate_grad_batches") is not None:
        require_int(trainer.accumulate_grad_batches, "trainer.accumulate_grad_batches", minimum=1)
    for name in ("limit_val_batches", "limit_train_batches"):
        value = trainer.get(name)
        if value is None:
            continue
        share = isinstance(value, float) and 0.0 < value <= 1.0
        count = isinstance(value, int) and not isinstance(value, bool) and value >= 1
        if not (share or count):
            raise ValueError(
                f"trainer.{name}={value!r}: give an integer >= 1 (batches) or a float share in (0, 1] ("
                + ("every stage validates to choose its best weights)" if "val" in name else "a stage must train)")
            )


def optimizer_lr_refused(value: Any) -> str:
    return f"optimizer.lr={value} would be ignored: each stage sets its own lr. Set phase.stages.<stage>.lr instead."


def refuse_ignored_overrides(argv: list[str]) -> None:
    """Settings refused before Hydra composes (which would answer `Key 'lr' is not in struct`): one line, exit 1."""
    for arg in argv:
        key, _, value = arg.lstrip("+~").partition("=")
        if key == "optimizer.lr":
            raise SystemExit(f"error: ValueError: {optimizer_lr_refused(value)}")


def check_tokenizer(cfg: DictConfig) -> None:
    """The tokenizer first: without the offline data or the Hub this fails in seconds, before Lightning loads."""
    load_tokenizer(cfg.data.get("tokenizer") or DEFAULT_TOKENIZER, data_dir=cfg.data.get("data_dir"))


def build_net(cfg: DictConfig) -> GPTNeoX:
    from hydra.utils import instantiate

    try:
        return instantiate(cfg.model)
    except InstantiationException as err:
        cause = err.__cause__
        if cause is not None and "size mismatch" in str(cause) and cfg.model.init_from and cfg.model.overrides:
            raise ValueError(
                f"model.init_from={cfg.model.init_from} does not fit model.overrides={dict(cfg.model.overrides)} "
                "(debug=smoke shrinks the shape): drop the overrides, or start from weights of that shape"
            ) from err
        raise


def check_before_training(cfg: DictConfig, net: GPTNeoX, datamodule: L.LightningDataModule) -> None:
    """Bad input fails here, before any stage starts."""
    seq_len = int(cfg.data.seq_len)
    positions = net.cfg.max_position_embeddings
    if seq_len > positions:
        raise ValueError(
            f"data.seq_len={seq_len} is larger than the model's position limit max_position_embeddings={positions}"
        )
    eval_cfg = cast(EvalConfig, OmegaConf.to_object(cfg.eval))  # the eval/schema node; checks its own ranges
    decode = eval_cfg.decode
    if decode.new_tokens > 1 and decode.prompt_len + decode.new_tokens > positions:
        raise ValueError(
            f"eval.decode.prompt_len={decode.prompt_len} + eval.decode.new_tokens={decode.new_tokens} reach past the "
            f"model's max_position_embeddings={positions}: keep prompt_len + new_tokens <= {positions}"
        )
    for cache in eval_cfg.all_caches().values():  # raises if a kind cannot serve the model or its settings are bad
        net.build_caches(1, 2, kind=cache.name, **cache.kwargs)
    if eval_cfg.context_check.enabled:
        eval_cfg.context_check.span(seq_len)
    from kvcompress.evaluation.long_context import check_long_context

    check_long_context(eval_cfg, net.cfg.max_position_embeddings)  # the lengths against the position limit
    if net.cfg.attention == "mka" and cfg.model.init_from is None and "base" not in cfg.phase.stages:
        raise ValueError(
            "model=mka has no base weights to load: set model.init_from (a Hugging Face Pythia directory or "
            "Hub name, or a kvcompress .ckpt), or use phase=mka_base_then_frozen_base to train the base first"
        )
    datamodule.setup("fit")  # raises on empty or unreachable data
    vocab = getattr(datamodule, "vocab_size", 0)
    if vocab > net.cfg.vocab_size:
        raise ValueError(f"tokenizer vocab {vocab} exceeds model vocab_size {net.cfg.vocab_size}")


def check_callbacks(cfg: DictConfig) -> None:
    """Build the run's callbacks once (their constructors check their settings) and check the position buckets
    against data.seq_len: a bucket that straddles it would be relabelled, one wholly past it is skipped."""
    from kvcompress.training import PositionwisePPL

    seq_len = int(cfg.data.seq_len)
    for callback in build_callbacks(cfg):
        if not isinstance(callback, PositionwisePPL):
            continue
        setting = "callbacks.position_ppl.buckets"
        inside = [(lo, hi) for lo, hi in callback.buckets if lo < seq_len]
        for lo, hi in inside:
            if hi > seq_len:
                raise ValueError(
                    f"{setting}: [{lo}, {hi}] reaches past data.seq_len={seq_len} (its PPL would cover [{lo}, "
                    f"{seq_len}) under the label {lo}-{hi}): end it at {seq_len} or below"
                )
        if not inside:
            buckets = [list(b) for b in callback.buckets]
            raise ValueError(f"{setting}={buckets}: none starts below data.seq_len={seq_len}")
        skipped = [list(b) for b in callback.buckets if b[0] >= seq_len]
        if skipped:
            log.info("position buckets %s start at or past data.seq_len=%d: not measured", skipped, seq_len)


def check_stages(cfg: DictConfig, net: GPTNeoX, stages: list[Stage]) -> None:
    """Each stage's parameter patterns match the model, its `init` checkpoint exists, and its `monitor` is a
    metric the stage logs (its module's validation metrics and its callbacks')."""
    from kvcompress.training.phases import set_trainable, validation_callbacks

    make_module = module_factory(cfg)
    run_callbacks = build_callbacks(cfg)
    trainable = {name: p.requires_grad for name, p in net.named_parameters()}
    for stage in stages:
        set_trainable(net, stage)
        if stage.init != "previous" and not Path(stage.init).is_file():
            raise FileNotFoundError(f"phase.stages.{stage.name}.init: checkpoint {stage.init} does not exist")
        logged = set(make_module(net, stage).val_metric_names())
        for callback in validation_callbacks(run_callbacks, stage):
            logged |= set(getattr(callback, "logged_metrics", lambda: ())())
        if stage.monitor not in logged:
            raise ValueError(
                f"phase.stages.{stage.name}.monitor={stage.monitor!r} is never logged by this stage; it can monitor: "
                f"{', '.join(sorted(logged))}"
            )
    for name, param in net.named_parameters():
        param.requires_grad_(trainable[name])


def input_hashes(cfg: DictConfig, datamodule: L.LightningDataModule) -> dict[str, Any]:
    """Content hashes of every file that shapes the result, computed once a run (the data's come from the token
    cache and the data source, which hash them anyway): recorded in metrics.json and in every stage key."""
    info = getattr(datamodule, "info", {}) or {}
    data = {
        name: {
            "origin": split.get("origin"),
            **(split.get("identity") or {}),
            "tokens_sha256": split.get("tokens_sha256"),
        }
        for name, split in (info.get("splits") or {}).items()
    }
    tokenizer = {"source": info.get("tokenizer"), "serialization_sha256": info.get("tokenizer_sha256")}
    return {"data": data, "tokenizer": tokenizer, "init_from": init_from_hash(cfg.model.get("init_from"))}


def init_from_hash(init_from: Any) -> dict[str, Any] | None:
    """`model.init_from`'s contents: a weights file's sha256, or a Hugging Face folder's config and weight files';
    a Hub name is recorded by name (its files are not here to hash)."""
    if init_from is None:
        return None
    path = Path(str(init_from)).expanduser()
    if path.is_file():
        return {"path": str(path.resolve()), "sha256": content_sha256(path)}
    if path.is_dir():
        return {"path": str(path.resolve()), "sha256": content_sha256(path, HF_WEIGHT_FILES)}
    return {"hub": str(init_from), "sha256": None}


@dataclass
class PreparedRun:
    cfg: DictConfig
    net: GPTNeoX
    datamodule: TokenWindowDataModule  # data._target_ (the evaluation reads its tokenizer and validation windows)
    stages: list[Stage]
    accelerator: str  # "cuda" or "cpu"
    inputs: dict[str, Any]  # content hashes of the data, tokenizer and init_from (`input_hashes`)
    extra_evaluations: dict[str, Any]  # `eval.extra`, built (and checked) before any training


def prepare(cfg: DictConfig) -> PreparedRun:
    """Everything that fails on bad input: settings, tokenizer, data, model, cache and phase checks. Nothing is
    written."""
    check_targets(cfg)  # only the library's own targets are ever instantiated (a config is data, never code)
    check_settings(cfg)
    quiet_library_warnings()
    check_tokenizer(cfg)  # before anything imports Lightning (seconds): a missing data folder answers at once
    stages = build_stages(cfg.phase)  # each stage checks its own settings
    import lightning as L
    import torch
    from hydra.utils import instantiate

    if logging.getLogger().handlers:  # under Hydra, whose handlers print and file every record: say it once
        logging.getLogger("lightning").handlers.clear()  # Lightning's own stderr handler
    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision("high")
    datamodule: TokenWindowDataModule = instantiate(cfg.data)
    datamodule.setup("fit")  # data before the model: a missing data set fails before a large model is built
    net = build_net(cfg)
    check_before_training(cfg, net, datamodule)
    check_callbacks(cfg)
    check_stages(cfg, net, stages)
    extra_evaluations = build_extra_evaluations(cfg, net)
    accelerator = "cuda" if torch.cuda.is_available() and cfg.trainer.get("accelerator") != "cpu" else "cpu"
    return PreparedRun(cfg, net, datamodule, stages, accelerator, input_hashes(cfg, datamodule), extra_evaluations)


def train_stages(run: PreparedRun) -> dict[str, Any]:
    """Train every stage, evaluate, log and write `metrics.json`."""
    from hydra.utils import instantiate

    from kvcompress.training import PhaseRunner

    cfg, net, datamodule = run.cfg, run.net, run.datamodule
    record, loggers = start_records(run)

    def make_datamodule(overrides: Mapping[str, Any]) -> L.LightningDataModule:
        """The run's data (already set up) unless the stage overrides it."""
        return instantiate(OmegaConf.merge(cfg.data, overrides)) if overrides else datamodule

    def make_trainer(stage: Stage, callbacks: list[L.Callback], max_epochs: int) -> L.Trainer:
        return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, max_epochs=max_epochs)

    runner = PhaseRunner(
        net,
        run.stages,
        make_datamodule,
        make_trainer,
        module_factory(cfg),
        stage_root=cfg.paths.stage_dir,
        fingerprint=fingerprint(cfg),
        reuse=cfg.phase.reuse,
        extra_callbacks=lambda: build_callbacks(cfg, with_logger=bool(loggers)),
        loggers=loggers,
        epochs_cap=cfg.phase.get("epochs_cap"),
        checkpoint_every_n_steps=cfg.checkpoint.get("every_n_steps"),
        checkpoint_every_minutes=cfg.checkpoint.get("every_minutes"),
        inputs=run.inputs,
        keep_checkpoints=bool(cfg.checkpoint.get("keep_finished", False)),
    )
    status = "failed"
    try:
        results = runner.run()
        final = results[-1]
        metrics: dict[str, Any] = {
            "val_ppl": final.metrics.get("val_ppl"),
            "val_loss": final.metrics.get("val_loss"),
            "val_acc": final.metrics.get("val_acc"),
            "val_pos_ppl": final.metrics.get("val_pos_ppl"),
            "params": {"total": net.num_parameters()},
            "stages": [  # in run order
                {
                    "name": r.name,
                    "key": r.key,
                    "reused": r.reused,
                    "resumed": r.resumed,
                    "trainable_params": r.trainable_params,
                    "frozen_params": r.frozen_params,
                    "weights": r.weights,
                    **r.metrics,
                    **({"timing": r.timing} if r.timing else {}),
                }
                for r in results
            ],
        }
        if not runner.is_writer:  # DDP: the other ranks trained alongside; rank 0 evaluates and writes
            status = "success"
            return metrics
        end_of_run(run, metrics, record, loggers, run.extra_evaluations, step=runner.step, windows=runner.windows)
        status = "success"
        return metrics
    finally:
        for logger in loggers:
            logger.finalize(status)
        close_wandb()


def start_records(run: PreparedRun) -> tuple[dict[str, Any], list[Logger]]:
    """The run record (config, data origin, code version) and the loggers, which get it as hyperparameters."""
    record = {**run_record(run.cfg, getattr(run.datamodule, "info", {}), run.accelerator), "inputs": run.inputs}
    loggers = build_loggers(run.cfg)
    for logger in loggers:
        logger.log_hyperparams(record)
    return record, loggers


def build_extra_evaluations(cfg: DictConfig, net: GPTNeoX) -> dict[str, Any]:
    """Method evaluations after training, by name: fn(net=, datamodule=) -> metrics (e.g. eval=lego)."""
    return {name: build_hook(spec, net=net) for name, spec in (cfg.eval.get("extra") or {}).items()}


def module_factory(cfg: DictConfig) -> Any:
    """`make_module(net, stage)`: the `module` group's LightningModule with the stage's lr and losses."""
    from hydra.utils import instantiate

    make_lightning_module = instantiate(cfg.module)  # a partial: the module class and its own settings

    def make_module(model: GPTNeoX, stage: Stage) -> LMModule:
        optimizer = instantiate(cfg.optimizer, lr=stage.lr)
        scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
        return make_lightning_module(
            net=model,
            optimizer=optimizer,
            scheduler=scheduler,
            losses=stage.losses,
            metric_prefix=stage.name,
            compile=cfg.compile,
        )

    return make_module


def end_of_run(
    run: PreparedRun,
    metrics: dict[str, Any],
    record: dict[str, Any],
    loggers: list[Logger],
    extra_evaluations: dict[str, Any],
    step: int,
    windows: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The end-of-run evaluation joins `metrics` with the run record; logged as `eval/*`, written to metrics.json.
    `windows`, the final validation's per-window losses, gets the evaluation's and goes to windows.safetensors
    (written before metrics.json: a run with a metrics.json has its records)."""
    from kvcompress.evaluation.evaluate import evaluate
    from kvcompress.evaluation.metrics import DEFAULT_BUCKETS
    from kvcompress.evaluation.summary import results_table
    from kvcompress.evaluation.windows import buckets_of

    cfg, net, datamodule = run.cfg, run.net, run.datamodule
    eval_cfg = cast(EvalConfig, OmegaConf.to_object(cfg.eval))  # the eval/schema node
    records = dict(windows) if windows and "ids" in windows else None
    buckets = buckets_of(records or {}) or list(DEFAULT_BUCKETS)
    evaluation = evaluate(net.to(run.accelerator), datamodule, eval_cfg, windows=records, buckets=buckets)
    for name, extra in extra_evaluations.items():
        evaluation[name] = extra(net=net, datamodule=datamodule)
    metrics.update(evaluation)
    metrics.update(record)
    if records is not None:
        metrics["windows"] = write_window_records(Path(cfg.paths.output_dir), records, record, cfg, buckets)
    for logger in loggers:
        logger.log_metrics({f"eval/{k}": v for k, v in _flatten(evaluation).items()}, step=step)
        logger.save()  # the CSV is written even when every stage was reused, with the post-fit metrics
    path = Path(cfg.paths.output_dir) / "metrics.json"
    atomic_write_json(path, metrics)
    log.info("results (all of them in %s):\n%s", path, results_table(metrics))
    return metrics


def write_window_records(
    folder: Path, records: dict[str, Any], record: dict[str, Any], cfg: DictConfig, buckets: list[tuple[int, int]]
) -> dict[str, Any]:
    """`windows.safetensors` with its provenance; returns its summary for metrics.json (`windows`)."""
    import json

    from kvcompress.evaluation.windows import FILE, names, write_windows
    from kvcompress.utils import window_ids_sha256

    data = record.get("data") or {}
    meta = {
        "data_origin": ((data.get("splits") or {}).get("validation") or {}).get("origin"),
        "tokenizer_sha256": data.get("tokenizer_sha256"),
        "seq_len": str(cfg.data.get("seq_len")),
        "seed": str(cfg.seed),
        "eval_seed": str(data.get("eval_seed")),
        "buckets": json.dumps([list(b) for b in buckets]),
    }
    write_windows(folder, records, meta)
    return {
        "file": FILE,
        "n_windows": len(records["ids"]),
        "window_ids_sha256": window_ids_sha256(records["ids"]),
        "tensors": names(records),
    }


def train(cfg: DictConfig) -> dict[str, Any]:
    """One training run: `prepare` (checks, nothing written) then `train_stages`."""
    return train_stages(prepare(cfg))


def evaluate_weights(run: PreparedRun) -> dict[str, Any]:
    """One validation of the last stage's module on the loaded weights, then the end-of-run evaluation, into
    metrics.json (`python -m kvcompress.eval`)."""
    from hydra.utils import instantiate

    from kvcompress.training.phases import validate, validation_callbacks, validation_windows

    cfg, net = run.cfg, run.net
    record, loggers = start_records(run)
    stage = run.stages[-1]
    callbacks = validation_callbacks(build_callbacks(cfg, with_logger=bool(loggers)), stage)
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, max_epochs=1)
    module = module_factory(cfg)(net, stage)
    status = "failed"
    try:
        metrics: dict[str, Any] = {
            "ckpt_path": str(cfg.ckpt_path),
            **validate(trainer, module, run.datamodule, stage),
            "params": {"total": net.num_parameters()},
        }
        windows = validation_windows(trainer)
        end_of_run(run, metrics, record, loggers, run.extra_evaluations, step=0, windows=windows)
        status = "success"
        return metrics
    finally:
        for logger in loggers:
            logger.finalize(status)


def close_wandb() -> None:
    """Finish the W&B run, if any, so one failed job does not poison the next one of a multirun."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        elif isinstance(v, int | float) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


def print_config_tree(cfg: DictConfig, path: Path | None = None, show: bool = True) -> None:
    """The composed config as a rich tree (lightning-hydra-template's `print_config_tree`), saved to `path`."""
    import rich
    import rich.syntax
    import rich.tree
    from rich.console import Console

    tree = rich.tree.Tree("CONFIG", style="dim", guide_style="dim")
    order = ["data", "model", "phase", "cache", "scheduler", "optimizer", "eval", "trainer", "logger", "callbacks"]
    for name in [*[k for k in order if k in cfg], *[k for k in cfg if k not in order]]:
        node = cfg[name]
        text = OmegaConf.to_yaml(node, resolve=True) if isinstance(node, DictConfig) else str(node)
        tree.add(str(name), style="dim", guide_style="dim").add(rich.syntax.Syntax(text, "yaml"))
    if show:
        rich.print(tree)
    if path is not None:
        with open(path, "w") as f:
            Console(file=f, width=120, color_system=None).print(tree)


def objective(cfg: DictConfig, metrics: dict[str, Any]) -> float | None:
    """What a sweeper minimizes: val PPL, or inf when the cache is over `cache_budget` (a share of KV's bytes)."""
    budget, cache = cfg.get("cache_budget"), metrics.get("cache") or {}
    if budget is not None and cache and cache["bytes_per_token"] > budget * cache["kv_bytes_per_token"]:
        log.warning("cache %.0f B/token is over the budget %s x KV: objective = inf", cache["bytes_per_token"], budget)
        return float("inf")
    return metrics.get("val_ppl")


def one_line(err: BaseException) -> str:
    """The message of an input error (Hydra's instantiate wraps the real one), on one line."""
    cause = err.__cause__ if isinstance(err, InstantiationException) and err.__cause__ else err
    text = " ".join(str(cause).split()) or type(cause).__name__
    return f"{type(cause).__name__}: {text}"


def failed_in_one_line(err: BaseException, output_dir: Path, multirun: bool) -> float:
    """Bad input (or a full disk): one line in the log and in failure.txt, exit code 1 (a multirun job: the worst
    score for the sweeper, and the sweep goes on)."""
    message = one_line(err)
    log.error("%s", message)
    try:
        atomic_write_text(output_dir / FAILURE_FILE, message + "\n")
    except OSError:  # e.g. the disk is still full: the line above is in the console
        pass
    if multirun:
        return float("inf")
    raise SystemExit(1) from None


def rerun_command(argv: list[str] | None = None) -> str:
    """This process's command line as the user would type it again (`python -m kvcompress.train ...`)."""
    argv = list(sys.argv if argv is None else argv)
    entry = Path(argv[0]) if argv else Path("train.py")
    head = ["python", "-m", f"kvcompress.{entry.stem}"] if entry.parent.name == "kvcompress" else ["python", argv[0]]
    return shlex.join([*head, *argv[1:]])


def run_guarded(cfg: DictConfig, job: Job) -> float | None:
    """`job` (`train_stages` or `evaluate_weights`) after `prepare`, under a guard (lightning-hydra-template's
    `task_wrapper`): every failure goes to train.log and W&B is always closed. Bad input (missing data, wrong
    settings) is one line and exit code 1, no traceback. In a multirun a failed job is recorded
    (`records.MultirunSummary`) and the sweep goes on. Returns what a sweeper minimizes (`objective`)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    output_dir = Path(cfg.paths.output_dir)
    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        try:
            # Inside the guard: a setting that fails to resolve (e.g. a `kvc.*` resolver's check) is one line too.
            print_config_tree(cfg, output_dir / "config_tree.log", show=bool(cfg.get("print_config", True)))
            run = prepare(cfg)
        except (*INPUT_ERRORS, DiskFullError) as err:
            return failed_in_one_line(err, output_dir, multirun)
        from kvcompress.training.checkpoints import StageInterrupted  # (Lightning is loaded by now)

        try:
            score = objective(cfg, job(run))
        except DiskFullError as err:  # a full disk: one line naming the file; what was written before stays
            return failed_in_one_line(err, output_dir, multirun)
        except StageInterrupted as stop:  # a signal: the stage saved its state; the same command resumes
            line = f"interrupted by {stop}; resume with: {rerun_command()}"
            log.warning("%s", line)
            atomic_write_text(output_dir / FAILURE_FILE, line + "\n")
            raise SystemExit(128 + stop.signum) from None
        except Exception as err:
            log.exception("run failed")
            why = f"{type(err).__name__}: {' '.join(str(err).split())[:300]} (traceback in train.log)"
            atomic_write_text(output_dir / FAILURE_FILE, why + "\n")
            if multirun:
                return float("inf")
            raise
        (output_dir / FAILURE_FILE).unlink(missing_ok=True)  # an earlier attempt's, beside this run's metrics.json
        return score
    finally:
        close_wandb()
        log.info("run folder: %s", output_dir)
