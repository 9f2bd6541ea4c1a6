"""Build a model from a name, an attention choice and optional starting weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvcompress.models.config import ModelConfig
from kvcompress.models.gpt_neox import GPTNeoX
from kvcompress.models.weights import load_weights


def build_model(
    name: str = "pythia-70m",
    attention: str = "standard",
    attention_kwargs: dict[str, Any] | None = None,
    init_from: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> GPTNeoX:
    """A fresh model, or one starting from `init_from`.

    `init_from` is a kvcompress weights file (a stage's `weights.safetensors`, or a Lightning `.ckpt` with weights
    under `net.`, read with `weights_only=True`), a local Hugging Face directory, or a Hub name (online only).
    Weights the chosen attention adds keep their init.
    """
    kwargs = dict(attention_kwargs or {})
    cfg = ModelConfig.from_name(name, attention=attention, attention_kwargs=kwargs, **dict(overrides or {}))
    if init_from is None:
        return GPTNeoX(cfg)
    path = Path(str(init_from)).expanduser()
    if path.suffix in (".ckpt", ".safetensors"):
        if not path.is_file():
            raise FileNotFoundError(f"model.init_from: {path} does not exist")
        model = GPTNeoX(cfg)
        state = load_weights(path)
        missing, unexpected = model.load_state_dict(state, strict=False)
        base = set(GPTNeoX(cfg.with_(attention="standard", attention_kwargs={})).state_dict())
        if unexpected or [k for k in missing if k in base]:
            raise ValueError(f"{path} does not fit model {name!r}: missing={missing[:5]} unexpected={unexpected[:5]}")
        return model
    from kvcompress.models.hf import from_pretrained

    overrides_hf = {"attention": attention, "attention_kwargs": kwargs, **dict(overrides or {})}
    model = from_pretrained(str(path) if path.exists() else str(init_from), **overrides_hf)
    return model
