"""`python -m kvcompress.eval ckpt_path=...`: evaluate trained weights without training.

`ckpt_path` is a kvcompress weights file (`.ckpt` or `.safetensors`), a training run folder (its
`metrics.json` names the final stage's weights and the run's overrides, which are composed again under this
command's), or a Hugging Face folder. The weights load through `model.init_from` (safe loading, no pickle).
One validation of the last stage's LightningModule gives val_ppl / val_loss / val_acc / val_pos_ppl, as in
training; then the end-of-run evaluation (caches, autoregressive PPL, TTFT/TPOT, `eval.extra`) and the run
record go to `metrics.json` with the same schema as a training run's, plus `ckpt_path`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from kvcompress.run import CONF_DIR, INPUT_ERRORS, evaluate_weights, one_line, refuse_ignored_overrides, run_guarded

_NOT_FROM_THE_RUN = ("hydra.", "paths.output_dir", "task_name=", "ckpt_path=")


def checkpoint_overrides(ckpt_path: str) -> list[str]:
    """The overrides that load `ckpt_path`: for a run folder its own overrides, then its final weights."""
    path = Path(ckpt_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: no such file or folder")
    if path.is_file() and path.suffix in (".ckpt", ".safetensors"):
        return [f"model.init_from={path.resolve()}"]
    if path.is_dir() and (path / "metrics.json").is_file():
        metrics = json.loads((path / "metrics.json").read_text())
        stages = metrics.get("stages") or []
        weights = Path(stages[-1]["weights"]) if stages and stages[-1].get("weights") else None
        if weights is None or not weights.is_file():
            raise FileNotFoundError(f"ckpt_path={ckpt_path}: the run's final weights {weights} do not exist")
        own = [o for o in metrics.get("overrides") or [] if not o.startswith(_NOT_FROM_THE_RUN)]
        return [*own, f"model.init_from={weights}"]
    if path.is_dir() and (path / "config.json").is_file():
        return [f"model.init_from={path.resolve()}"]
    raise ValueError(
        f"ckpt_path={ckpt_path} is not a .ckpt / .safetensors file, a run folder with metrics.json, or a Hugging "
        "Face folder with config.json"
    )


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def compose_for(cfg: DictConfig) -> DictConfig:
    """This command's config, recomposed with the checkpoint's overrides first (this command's win)."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    ours = list(HydraConfig.get().overrides.task)
    extra = checkpoint_overrides(str(cfg.ckpt_path))
    mine = {_key(o) for o in ours}
    theirs = [o for o in extra if _key(o) not in mine or _key(o) == "model.init_from"]
    return compose("eval", overrides=[*theirs[:-1], *ours, theirs[-1]])


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def main(cfg: DictConfig) -> float | None:
    try:
        cfg = compose_for(cfg)
    except INPUT_ERRORS as err:  # a bad ckpt_path: one line, before any work
        raise SystemExit(f"error: {one_line(err)}") from None
    return run_guarded(cfg, evaluate_weights)


if __name__ == "__main__":
    refuse_ignored_overrides(sys.argv[1:])
    main()
