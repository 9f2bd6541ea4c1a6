"""Run records: the provenance every `metrics.json`, W&B config and report reads, built in one place;
and the multirun summary (one line per job).

`run_record` gathers the resolved config and the command-line overrides, where each data split came from
(file or Hub id, the split used, token and window counts, whether training reads a test split), the code
version (git commit and dirty flag), the package versions and the device. The resolvers below name and
tag W&B runs from the same overrides, so the jobs of a sweep differ on the dashboard.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from kvcompress.utils import atomic_write_text

PACKAGES = ("torch", "transformers", "lightning", "hydra-core", "omegaconf", "torchmetrics", "tokenizers", "wandb")
# Overrides that say where a run writes, not what it is: left out of W&B run names.
FAILURE_FILE = "failure.txt"  # why a run failed, in its own folder (written by the run guard, read by the summary)
_NOT_IN_NAME = ("hydra.", "paths.", "logger", "trainer.enable_progress_bar", "print_config", "tags")
# Trainer settings that do not change what a run learns (left out of stage keys and of result configs).
COSMETIC_TRAINER_KEYS = {"enable_progress_bar", "log_every_n_steps", "enable_model_summary", "default_root_dir"}
# Top-level config keys that say where a run writes or how it shows itself, not what it computes (mid-epoch
# checkpoints too: resuming is exact); `seed` is set aside where runs are grouped as seeds of one configuration.
NOT_RESULT_KEYS = ("seed", "paths", "logger", "task_name", "print_config", "tags", "checkpoint")
COSMETIC_CALLBACKS = ("progress_bar", "lr_monitor", "model_summary", "rich_model_summary")
# Data settings that change no number (`seed` is the run's seed; the origins of the data are recorded apart).
NOT_RESULT_DATA_KEYS = ("seed", "eval_batch_size", "num_workers", "pin_memory", "cache_dir", "data_dir")


def task_overrides() -> list[str]:
    """The command-line overrides of this Hydra job (`[]` outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def run_name(task_name: str) -> str:
    """`task_name` plus the overrides that change the run, e.g. `train:model=vdproj,phase=two_stage,seed=2`."""
    kept = [o for o in task_overrides() if not o.lstrip("+~").startswith(_NOT_IN_NAME)]
    return f"{task_name}:{','.join(kept)}" if kept else task_name


def run_group(task_name: str) -> str:
    """One group a sweep: `task_name/<sweep folder>` in a multirun, `task_name` otherwise."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return f"{task_name}/{Path(HydraConfig.get().sweep.dir).name}"
    return task_name


def run_tags(tags: Any, *, _root_: DictConfig) -> list[str]:
    """The user's `tags` plus what the run is: model shape, attention, phase, cache, data source."""
    from hydra.core.hydra_config import HydraConfig

    phase = HydraConfig.get().runtime.choices.get("phase") if HydraConfig.initialized() else None
    auto = [_root_.model.name, _root_.model.attention, phase, _root_.cache.name, _root_.data.source]
    return list(dict.fromkeys([*(tags or []), *(str(t) for t in auto if t)]))


def _precision() -> str:
    import torch

    return "bf16-mixed" if torch.cuda.is_available() else "32-true"


def _devices() -> str | int:
    """DDP: every GPU, or 2 CPU processes."""
    import torch

    return "auto" if torch.cuda.is_available() else 2


def _wandb_offline() -> bool:
    return os.environ.get("WANDB_MODE", "offline") == "offline"


def register_resolvers() -> None:
    """The `kvc.*` resolvers the configs use (W&B names and tags, precision, devices, the launch pid)."""
    resolvers: dict[str, Any] = {
        "kvc.run_name": run_name,
        "kvc.run_group": run_group,
        "kvc.tags": run_tags,
        "kvc.precision": _precision,
        "kvc.devices": _devices,
        "kvc.wandb_offline": _wandb_offline,
        "kvc.uptrain_steps": uptrain_steps,
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
    if not OmegaConf.has_resolver("kvc.pid"):
        OmegaConf.register_new_resolver("kvc.pid", os.getpid, use_cache=True)


def recorded_steps(init_from: str | os.PathLike) -> int:
    """The optimizer steps that trained the weights in `init_from`, from their record: a run folder's metrics.json
    (the sum over its stages) or the `done.json` beside a stage's `weights.safetensors` (that stage's)."""
    path = Path(init_from).expanduser()
    try:
        if path.is_dir():
            stages = json.loads((path / "metrics.json").read_text())["stages"]
            return sum(int(stage.get("steps") or 0) for stage in stages)
        return int(json.loads((path.parent / "done.json").read_text())["metrics"]["steps"])
    except (OSError, KeyError, TypeError, ValueError) as err:
        raise ValueError(
            f"model.init_from={init_from}: no record of its training steps (a run folder with metrics.json, or a "
            f"stage's weights.safetensors beside its done.json) to take a share of ({type(err).__name__}: {err})"
        ) from None


def uptrain_steps(init_from: Any, share: Any) -> int:
    """`${kvc.uptrain_steps:<init_from>,<share>}`: round(share x the steps that trained `init_from`), at least 1
    when share > 0 (phase=gqa_uptrain: Ainslie et al. 2023 uptrain for 5% of the original steps)."""
    if init_from is None:
        raise ValueError("this phase needs model.init_from: a trained run's folder or a stage's weights.safetensors")
    share = float(share)
    if not 0.0 <= share:
        raise ValueError(f"phase.uptrain_share must be >= 0, got {share}")
    steps = round(share * recorded_steps(str(init_from)))
    return max(steps, 1) if share > 0 else 0


def git_state(path: str | Path | None = None) -> dict[str, Any] | None:
    """{commit, dirty} of the repository holding `path` (this package by default); None outside a repo."""
    cwd = Path(path or Path(__file__).resolve().parent)

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("kvcompress", *PACKAGES):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def device_record(accelerator: str) -> dict[str, Any]:
    """What ran the training: `accelerator` ("cpu" or "cuda"), the GPU name, the CPU and its thread count."""
    import torch

    out: dict[str, Any] = {
        "accelerator": accelerator,
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    if accelerator == "cuda":
        out["gpu"] = torch.cuda.get_device_name()
        out["gpu_count"] = torch.cuda.device_count()
    return out


def _split_used(origin: str) -> str:
    """The split a split's text really came from: the Hub split, or the local file's stem (`test`, `valid`...)."""
    return origin.rsplit(":", 1)[-1] if origin.startswith("hub:") else Path(origin).stem


def data_record(info: dict[str, Any]) -> dict[str, Any]:
    """Per split (train, validation): source, file or Hub id, split used, tokens and windows (available / asked /
    used / short of what was asked), the sha256 of the window ids used; the tokenizer's sha256, the seeds that chose
    the windows (`eval_seed` the validation windows, `seed` the training ones), and `train_on_test` (offline
    WikiText-2 trains on test.txt: a report made that way must say so).

    `info` is `TokenWindowDataModule.info` after `setup()`."""
    splits = info.get("splits", {})
    seq_window = int(info.get("seq_len", 0)) + 1
    used = {"train": info.get("train_windows"), "validation": info.get("val_windows")}
    out: dict[str, Any] = {
        "source": info.get("source"),
        "tokenizer": info.get("tokenizer"),
        "tokenizer_sha256": info.get("tokenizer_sha256"),
        "seq_len": info.get("seq_len"),
        "seed": info.get("seed"),
        "eval_seed": info.get("eval_seed"),
        "splits": {},
    }
    for name, n_used in used.items():
        split = splits.get(name) or splits.get("all") or {}
        origin = str(split.get("origin", ""))
        hub = origin.startswith("hub:")
        out["splits"][name] = {
            "origin": origin,
            "hub_id" if hub else "file": origin[len("hub:") :].rsplit(":", 1)[0] if hub else origin,
            "split_used": _split_used(origin),
            "shared_with_other_split": name not in splits,  # one stream, split into train / val windows
            "tokens": split.get("tokens"),
            "windows": split.get("windows"),
            "windows_used": n_used,
            "tokens_used": None if n_used is None else n_used * seq_window,
            **(info.get("selected") or {}).get(name, {}),  # windows_asked, windows_short_by, window_ids_sha256
        }
    out["train_on_test"] = out["splits"]["train"]["split_used"] == "test"
    out["windows_short_by"] = sum(int(s.get("windows_short_by") or 0) for s in out["splits"].values())
    return out


def run_record(cfg: DictConfig, data_info: dict[str, Any], accelerator: str) -> dict[str, Any]:
    """Everything a reader needs to trust a run's numbers (goes into metrics.json and the W&B config)."""
    keys = [k for k in cfg.keys() if k != "hydra"]  # `hydra` only in tests' compose(return_hydra_config=True)
    config = {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k] for k in keys}
    return {
        "overrides": task_overrides(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "config": config,
        "data": data_record(data_info),
        "code": git_state(),
        "versions": package_versions(),
        "device": device_record(accelerator),
    }


def result_config(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a recorded resolved config (metrics.json `config`) that changes a run's numbers, seed aside:
    everything but `NOT_RESULT_KEYS`, cosmetic trainer keys and callbacks, and `NOT_RESULT_DATA_KEYS`. An
    evaluation run (`python -m kvcompress.eval`) is named by what it evaluates, not by the path of its weights (one
    path a seed): its `ckpt_path` and `model.init_from` are left out too."""
    out = {k: v for k, v in config.items() if k not in NOT_RESULT_KEYS}
    if isinstance(out.get("trainer"), dict):
        out["trainer"] = {k: v for k, v in out["trainer"].items() if k not in COSMETIC_TRAINER_KEYS}
    if isinstance(out.get("callbacks"), dict):
        out["callbacks"] = {k: v for k, v in out["callbacks"].items() if k not in COSMETIC_CALLBACKS}
    if isinstance(out.get("data"), dict):
        out["data"] = {k: v for k, v in out["data"].items() if k not in NOT_RESULT_DATA_KEYS}
    if config.get("task_name") == "eval":
        out.pop("ckpt_path", None)
        if isinstance(out.get("model"), dict):
            out["model"] = {k: v for k, v in out["model"].items() if k != "init_from"}
    return out


def data_identity(metrics: dict[str, Any]) -> dict[str, Any]:
    """What a run's data is, from its metrics.json: the data settings that choose windows and tokens (all but
    `NOT_RESULT_DATA_KEYS` and the batch size), the origin of each split, and the tokenizer's hash."""
    data = metrics.get("data") or {}
    config = (metrics.get("config") or {}).get("data") or {}
    return {
        "config": {k: v for k, v in config.items() if k not in (*NOT_RESULT_DATA_KEYS, "batch_size")},
        "origins": {name: split.get("origin") for name, split in (data.get("splits") or {}).items()},
        "tokenizer_sha256": data.get("tokenizer_sha256"),
    }


class MultirunSummary(Callback):
    """After a multirun: one line per job (ok / failed and why), printed and saved as `summary.txt`.

    Each job leaves its line in its own folder (`job_status.txt`), so jobs that ran in other processes
    (a submitit launcher) are summarized too."""

    STATUS_FILE = "job_status.txt"

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus
        from hydra.types import RunMode

        if config.hydra.mode != RunMode.MULTIRUN:  # an ordinary run has no job number and no summary
            return

        num = int(config.hydra.job.num)
        overrides = " ".join(config.hydra.overrides.task) or "(no overrides)"
        if job_return.status == JobStatus.FAILED:
            why = f"{type(job_return._return_value).__name__}: {job_return._return_value}"
        else:  # the run guard turned an error into a score: it left the reason in the job's folder
            failure = Path(config.hydra.runtime.output_dir) / FAILURE_FILE
            why = failure.read_text().strip() if failure.is_file() else ""
        value = job_return._return_value if job_return.status == JobStatus.COMPLETED else None
        status = "failed" if why else f"ok      val_ppl={value:.4g}" if isinstance(value, float) else "ok"
        line = f"job {num}: {status}  [{overrides}]" + (f"  {why}" if why else "")
        atomic_write_text(Path(config.hydra.runtime.output_dir) / self.STATUS_FILE, line + "\n")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(config.hydra.sweep.dir)
        files = sorted(
            sweep.glob(f"*/{self.STATUS_FILE}"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0
        )
        lines = [f.read_text().strip() for f in files]
        text = "\n".join(["multirun summary:", *lines]) + "\n"
        print(text, end="")
        atomic_write_text(sweep / "summary.txt", text)
        if any(": failed" in line for line in lines):
            raise SystemExit(1)


# --- what a run folder may set --------------------------------------------------------------------------------------
# A run folder from someone else is data, never code. Composing a run again from the overrides recorded in its
# metrics.json (`python -m kvcompress.eval ckpt_path=<run folder>`) takes only:
#   - group choices of RUN_GROUPS, each a file of our own conf/ folder (e.g. `model=pythia-14m`, `phase=lego`);
#   - plain values under RUN_VALUES (e.g. `model.attention_kwargs.rank=0.5`, `data.seq_len=64`, `seed=3`).
# Settings of how and where the original run wrote (LEFT_OUT, plain values only) are left out, named in one line.
# Anything else is refused, the command stops in one line and nothing runs: a key path or a value holding a special
# key of Hydra's instantiate (SPECIAL_KEYS), an added / forced / deleted key outside RUN_VALUES, any other key,
# an interpolation, a sweep, a package (`@`), a group choice that is not one of our files.
RUN_GROUPS = ("model", "attention", "data", "cache", "phase", "eval", "experiment", "debug", "scheduler")
RUN_VALUES = ("model", "attention", "data", "cache", "phase", "eval", "seed")
LEFT_OUT = (
    "hydra", "paths", "logger", "trainer", "callbacks", "task_name", "ckpt_path", "print_config", "tags", "compile",
    "checkpoint", "optimizer", "module", "scheduler", "data.cache_dir", "extra_targets",
)  # fmt: skip
SPECIAL_KEYS = ("_target_", "_partial_", "_args_", "_recursive_", "_convert_")
# The targets a composed config may instantiate: the library's own, and the maintained libraries it plugs into.
# `extra_targets` (train.yaml) adds prefixes of your own (e.g. a callback of yours); a run folder cannot set it.
LIBRARY_TARGETS = ("kvcompress.", "lightning.pytorch.", "torch.optim.", "transformers.get_")
_CHOICE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


class RefusedOverride(ValueError):
    """A run folder's recorded override that could run code or write elsewhere."""


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _special_in_value(value: Any) -> str | None:
    """The first special key or interpolation anywhere in a parsed override value (lists and dicts, recursively)."""
    if isinstance(value, dict):
        for k, v in value.items():
            if str(k) in SPECIAL_KEYS:
                return f"its value sets {k}"
            found = _special_in_value(k) or _special_in_value(v)
            if found:
                return found
    elif isinstance(value, list | tuple):
        for v in value:
            found = _special_in_value(v)
            if found:
                return found
    elif isinstance(value, str) and "${" in value:
        return "its value is an interpolation (${...}), which may read the environment or decode code"
    return None


def classify_run_override(text: Any, conf_dir: str | os.PathLike) -> tuple[str, str]:
    """('keep' | 'leave' | 'refuse', why) for one override recorded in a run folder, parsed by Hydra's own
    override parser (so `+`, `++`, `~`, quoting and list / dict values are read as Hydra reads them)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType

    if not isinstance(text, str):
        return "refuse", f"it is a {type(text).__name__}, not an override string"
    try:
        override = OverridesParser.create().parse_override(text)
    except Exception as err:  # noqa: BLE001 - any parse failure: refused
        return "refuse", f"Hydra cannot parse it ({' '.join(str(err).split())[:120]})"
    key = override.key_or_group
    parts = re.split(r"[./]", key)
    special = next((p for p in parts if p in SPECIAL_KEYS), None)
    if special:
        return "refuse", f"it sets {special}"
    if override.package is not None:
        return "refuse", "it moves a config to another package (@)"
    if override.is_sweep_override():
        return "refuse", "it is a sweep, not one value"
    value = None if override.type == OverrideType.DEL else override.value()
    found = _special_in_value(value)
    if found:
        return "refuse", found
    plain = override.type == OverrideType.CHANGE
    if "/" not in key and "." not in key and key in RUN_GROUPS:
        if not plain:
            return "refuse", f"it adds or deletes the {key} group"
        if value is None:
            return "keep", ""
        if not isinstance(value, str) or not _CHOICE.fullmatch(value) or ".." in value:
            return "refuse", f"{key}= must name a file of conf/{key}/"
        if not (Path(conf_dir) / key / f"{value}.yaml").is_file():
            return "refuse", f"conf/{key}/{value}.yaml does not exist"
        return "keep", ""
    if _under(key, RUN_VALUES) and not _under(key, LEFT_OUT):
        return "keep", ""
    if _under(key.replace("/", "."), LEFT_OUT):
        return ("leave", "") if plain else ("refuse", f"a run folder may not add, force or delete {key}")
    return "refuse", f"{key} is outside what a run folder may set"


def run_folder_overrides(recorded: Any, source: str, conf_dir: str | os.PathLike) -> tuple[list[str], list[str]]:
    """(kept, left out) of the overrides a run folder recorded; raises RefusedOverride, one line naming the first
    refused one. `source` names where they came from (e.g. the metrics.json)."""
    if recorded is None:
        return [], []
    if not isinstance(recorded, list):
        raise RefusedOverride(f"{source}: `overrides` is a {type(recorded).__name__}, not a list of overrides")
    kept: list[str] = []
    left: list[str] = []
    for text in recorded:
        verdict, why = classify_run_override(text, conf_dir)
        if verdict == "refuse":
            raise RefusedOverride(
                f"{source}: override {text!r} is refused ({why}). A run folder may only choose files of conf/ for "
                f"{', '.join(RUN_GROUPS)} and set plain values under {', '.join(RUN_VALUES)}; nothing was run"
            )
        (kept if verdict == "keep" else left).append(text)
    return kept, left


def quoted_override(key: str, value: str) -> str:
    """`key='value'` that Hydra parses back to exactly `value` (a path with spaces, commas or quotes)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if "${" in value:
        raise RefusedOverride(f"{key}={value!r}: a path may not hold an interpolation (${{...}})")
    text = f"{key}='" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if OverridesParser.create().parse_override(text).value() != value:
        raise RefusedOverride(f"{key}={value!r}: not a path Hydra can take on its command line")
    return text


def check_targets(cfg: DictConfig) -> None:
    """Every `_target_` of a composed config (but Hydra's own, under `hydra`) is one of LIBRARY_TARGETS or of
    `extra_targets`; raises a ValueError naming the first other one and where it is."""
    extra = cfg.get("extra_targets") or []
    if not all(isinstance(p, str) and p for p in extra):
        raise ValueError(f"extra_targets must be a list of module prefixes (e.g. [mypackage.]), got {list(extra)}")
    allowed = (*LIBRARY_TARGETS, *extra)
    tree = OmegaConf.to_container(cfg, resolve=False)  # (a missing value stays "???")
    assert isinstance(tree, dict)
    tree.pop("hydra", None)

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "_target_" and (not isinstance(v, str) or "${" in v or not v.startswith(allowed)):
                    raise ValueError(
                        f"{where}._target_={v!r} is not one of the library's own targets ({', '.join(allowed)}): "
                        "refused before anything is built (add your own package's prefix to extra_targets)"
                    )
                walk(v, f"{where}.{k}" if where else str(k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}[{i}]")

    walk(tree, "")
