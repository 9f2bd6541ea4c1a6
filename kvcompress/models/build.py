"""Build a model from a name, an attention choice and optional starting weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvcompress.models.config import ModelConfig
from kvcompress.models.gpt_neox import GPTNeoX
from kvcompress.models.gqa import fit_kv_heads
from kvcompress.models.weights import load_weights


def run_weights(folder: Path) -> Path:
    """The final weights of a training run folder (its metrics.json names the last stage's weights file)."""
    metrics = json.loads((folder / "metrics.json").read_text())
    stages = metrics.get("stages") or []
    weights = Path(stages[-1]["weights"]) if stages and stages[-1].get("weights") else None
    if weights is None or not weights.is_file():
        raise FileNotFoundError(f"model.init_from: run folder {folder} names no existing final weights ({weights})")
    return weights


def build_model(
    name: str = "pythia-70m",
    attention: str = "standard",
    attention_kwargs: dict[str, Any] | None = None,
    init_from: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> GPTNeoX:
    """A fresh model, or one starting from `init_from`.

    `init_from` is a kvcompress weights file (a stage's `weights.safetensors`, or a Lightning `.ckpt` with weights
    under `net.`, read with `weights_only=True`), a training run folder (its final weights), a local Hugging Face
    directory, or a Hub name (online only). Weights the chosen attention adds keep their init. A checkpoint with
    more K/V heads than the model (`overrides.n_kv_head`) is mean-pooled to it (`kvcompress.models.gqa`).
    """
    kwargs = dict(attention_kwargs or {})
    cfg = ModelConfig.from_name(name, attention=attention, attention_kwargs=kwargs, **dict(overrides or {}))
    if init_from is None:
        return GPTNeoX(cfg)
    path = Path(str(init_from)).expanduser()
    if path.is_dir() and (path / "metrics.json").is_file():
        path = run_weights(path)
    if path.suffix in (".ckpt", ".safetensors"):
        if not path.is_file():
            raise FileNotFoundError(f"model.init_from: {path} does not exist")
        model = GPTNeoX(cfg)
        state = fit_kv_heads(load_weights(path), cfg)
        missing, unexpected = model.load_state_dict(state, strict=False)
        base = set(GPTNeoX(cfg.with_(attention="standard", attention_kwargs={})).state_dict())
        if unexpected or [k for k in missing if k in base]:
            raise ValueError(f"{path} does not fit model {name!r}: missing={missing[:5]} unexpected={unexpected[:5]}")
        return model
    from kvcompress.models.hf import from_pretrained

    overrides_hf = {"attention": attention, "attention_kwargs": kwargs, **dict(overrides or {})}
    model = from_pretrained(str(path) if path.exists() else str(init_from), **overrides_hf)
    return model
