"""`python -m kvcompress.eval ckpt_path=...`: evaluate trained weights without training.

`ckpt_path` is a kvcompress weights file (`.ckpt` or `.safetensors`), a training run folder (its
`metrics.json` names the final stage's weights and the run's overrides, which are composed again under this
command's), or a Hugging Face folder. The weights load through `model.init_from` (safe loading, no pickle).
One validation of the last stage's LightningModule gives val_ppl / val_loss / val_acc / val_pos_ppl, as in
training; then the end-of-run evaluation (caches, autoregressive PPL, TTFT/TPOT, `eval.extra`) and the run
record go to `metrics.json` with the same schema as a training run's, plus `ckpt_path`.

A run folder is data, never code: only the overrides `kvcompress.records.run_folder_overrides` keeps are composed
(our own config files and plain values); one that could run code or write elsewhere stops the command in one line.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from kvcompress.run import (
    CONF_DIR,
    INPUT_ERRORS,
    evaluate_weights,
    one_line,
    quoted_override,
    refuse_ignored_overrides,
    run_folder_overrides,
    run_guarded,
)

log = logging.getLogger(__name__)


def checkpoint_overrides(ckpt_path: str) -> list[str]:
    """The overrides that load `ckpt_path`: for a run folder the overrides it recorded that a run folder may set
    (`records.run_folder_overrides`: anything that could run code or write elsewhere stops here, in one line),
    then its final weights (`model.init_from`, always last)."""
    path = Path(ckpt_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: no such file or folder")
    if path.is_file() and path.suffix in (".ckpt", ".safetensors"):
        return [quoted_override("model.init_from", str(path.resolve()))]
    if path.is_dir() and (path / "metrics.json").is_file():
        metrics_file = path / "metrics.json"
        try:
            metrics = json.loads(metrics_file.read_text())  # data only: JSON, never code
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"ckpt_path={ckpt_path}: {metrics_file} is not JSON ({err})") from None
        if not isinstance(metrics, dict):
            raise ValueError(f"ckpt_path={ckpt_path}: {metrics_file} is not a JSON object")
        kept, left = run_folder_overrides(metrics.get("overrides"), f"ckpt_path={ckpt_path}: {metrics_file}", CONF_DIR)
        if left:
            log.info("not taken from the run folder (how and where it wrote; give them here if wanted): %s", left)
        stages = metrics.get("stages") or []
        last = stages[-1] if isinstance(stages, list) and stages and isinstance(stages[-1], dict) else {}
        weights = Path(last["weights"]) if isinstance(last.get("weights"), str) else None
        if weights is None or not weights.is_file():
            raise FileNotFoundError(f"ckpt_path={ckpt_path}: the run's final weights {weights} do not exist")
        return [*kept, quoted_override("model.init_from", str(weights))]
    if path.is_dir() and (path / "config.json").is_file():
        return [quoted_override("model.init_from", str(path.resolve()))]
    raise ValueError(
        f"ckpt_path={ckpt_path} is not a .ckpt / .safetensors file, a run folder with metrics.json, or a Hugging "
        "Face folder with config.json"
    )


def _key(override: str) -> str:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_override(override).key_or_group


def compose_for(cfg: DictConfig) -> DictConfig:
    """This command's config, recomposed with the checkpoint's overrides first (this command's win)."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    if OmegaConf.is_missing(cfg, "ckpt_path"):
        raise ValueError(
            "ckpt_path is required: python -m kvcompress.eval ckpt_path=<a .ckpt / .safetensors file, a training run "
            "folder or a Hugging Face folder>"
        )
    ours = list(HydraConfig.get().overrides.task)
    extra = checkpoint_overrides(str(cfg.ckpt_path))
    mine = {_key(o) for o in ours}
    theirs = [o for o in extra[:-1] if _key(o) not in mine]
    return compose("eval", overrides=[*theirs, *ours, extra[-1]])


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
