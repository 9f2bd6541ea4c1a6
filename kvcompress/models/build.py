"""Build a model from a name, an attention choice and optional starting weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kvcompress.models.config import ModelConfig
from kvcompress.models.gpt_neox import GPTNeoX


def build_model(
    name: str = "pythia-70m",
    attention: str = "standard",
    attention_kwargs: dict[str, Any] | None = None,
    init_from: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> GPTNeoX:
    """A fresh model, or one starting from `init_from`.

    `init_from` is a kvcompress/Lightning checkpoint (`.ckpt`, weights under `net.`), a local Hugging
    Face directory, or a Hub name (online only). Weights the chosen attention adds keep their init.
    """
    kwargs = dict(attention_kwargs or {})
    cfg = ModelConfig.from_name(name, attention=attention, attention_kwargs=kwargs, **dict(overrides or {}))
    if init_from is None:
        return GPTNeoX(cfg)
    path = Path(str(init_from)).expanduser()
    if path.suffix == ".ckpt":
        if not path.is_file():
            raise FileNotFoundError(f"init_from checkpoint {path} does not exist")
        model = GPTNeoX(cfg)
        state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
        state = {k[len("net.") :]: v for k, v in state.items() if k.startswith("net.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        base = set(GPTNeoX(cfg.with_(attention="standard", attention_kwargs={})).state_dict())
        if unexpected or [k for k in missing if k in base]:
            raise ValueError(f"{path} does not fit model {name!r}: missing={missing[:5]} unexpected={unexpected[:5]}")
        return model
    from kvcompress.models.hf import from_pretrained

    overrides_hf = {"attention": attention, "attention_kwargs": kwargs, **dict(overrides or {})}
    model = from_pretrained(str(path) if path.exists() else str(init_from), **overrides_hf)
    return model
