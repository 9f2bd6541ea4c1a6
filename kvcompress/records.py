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
    """Per split (train, validation): source, file or Hub id, split used, tokens and windows (available / used),
    and `train_on_test` (offline WikiText-2 trains on test.txt: a report made that way must say so).

    `info` is `TokenWindowDataModule.info` after `setup()`."""
    splits = info.get("splits", {})
    seq_window = int(info.get("seq_len", 0)) + 1
    used = {"train": info.get("train_windows"), "validation": info.get("val_windows")}
    out: dict[str, Any] = {"source": info.get("source"), "tokenizer": info.get("tokenizer"), "splits": {}}
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
        }
    out["train_on_test"] = out["splits"]["train"]["split_used"] == "test"
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


class MultirunSummary(Callback):
    """After a multirun: one line per job (ok / failed and why), printed and saved as `summary.txt`.

    Each job leaves its line in its own folder (`job_status.txt`), so jobs that ran in other processes
    (a submitit launcher) are summarized too."""

    STATUS_FILE = "job_status.txt"

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus

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
