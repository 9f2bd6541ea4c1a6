"""Convert between our GPTNeoX and Hugging Face `GPTNeoXForCausalLM` (module names match)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kvcompress.models.config import ModelConfig
from kvcompress.models.gpt_neox import GPTNeoX
from kvcompress.models.gqa import fit_kv_heads

if TYPE_CHECKING:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

HF_PREFIX = "gpt_neox."
# The output head is `embed_out` in Pythia checkpoints and `lm_head` in transformers >= 5.
HEAD_NAMES = {"lm_head.weight": "embed_out.weight"}


def config_from_hf(hf_config: Any, **overrides: Any) -> ModelConfig:
    rope = getattr(hf_config, "rope_parameters", None) or {}
    rotary_pct = rope.get("partial_rotary_factor", getattr(hf_config, "rotary_pct", 0.25))
    rotary_base = rope.get("rope_theta", getattr(hf_config, "rotary_emb_base", 10000.0))
    if getattr(hf_config, "tie_word_embeddings", False):
        raise ValueError("tied embeddings are not GPT-NeoX; this config cannot be converted")
    fields = dict(
        name=getattr(hf_config, "_name_or_path", "") or "hf",
        vocab_size=hf_config.vocab_size,
        n_layer=hf_config.num_hidden_layers,
        n_embd=hf_config.hidden_size,
        n_head=hf_config.num_attention_heads,
        intermediate_size=hf_config.intermediate_size,
        rotary_pct=float(rotary_pct),
        rotary_base=float(rotary_base),
        max_position_embeddings=hf_config.max_position_embeddings,
        layer_norm_eps=hf_config.layer_norm_eps,
        use_parallel_residual=hf_config.use_parallel_residual,
    )
    return ModelConfig(**{**fields, **overrides})


def config_to_hf(cfg: ModelConfig) -> GPTNeoXConfig:
    """The `GPTNeoXConfig` of this shape; a model with grouped K/V heads has none (GPT-NeoX has no such setting)."""
    if cfg.kv_heads != cfg.n_head:
        raise ValueError(
            f"n_kv_head={cfg.n_kv_head} < n_head={cfg.n_head}: Hugging Face GPT-NeoX has no grouped K/V heads, "
            "so this model cannot be exported (only n_kv_head = null or n_head can)"
        )
    from transformers import GPTNeoXConfig

    # rotary_pct / rotary_emb_base: older names, still read by transformers 5 (its typed stub lacks them).
    return GPTNeoXConfig(  # type: ignore[call-arg]
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.n_embd,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        intermediate_size=cfg.intermediate_size,
        rotary_pct=cfg.rotary_pct,
        rotary_emb_base=cfg.rotary_base,
        max_position_embeddings=cfg.max_position_embeddings,
        layer_norm_eps=cfg.layer_norm_eps,
        use_parallel_residual=cfg.use_parallel_residual,
        tie_word_embeddings=False,
        hidden_act="gelu",
    )


def state_dict_from_hf(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in hf_state.items():
        if key.startswith(HF_PREFIX):
            key = key[len(HF_PREFIX) :]
        key = HEAD_NAMES.get(key, key)
        if "rotary_emb" in key or key.endswith((".masked_bias", ".attention.bias")):
            continue  # recomputed buffers in older checkpoints
        out[key] = value
    return out


def from_hf_model(hf_model: Any, **overrides: Any) -> GPTNeoX:
    """Our model with the weights of a `transformers.GPTNeoXForCausalLM` object (n_kv_head = n_head).

    `overrides` change the config (e.g. `attention="vdproj"`); weights the new attention adds keep
    their initial values (load is non-strict only for them). `n_kv_head` < n_head mean-pools each group's K and V
    projections (`kvcompress.models.gqa.pool_kv_heads`).
    """
    cfg = config_from_hf(hf_model.config, **overrides)
    model = GPTNeoX(cfg)
    load_hf_weights(model, hf_model.state_dict())
    return model.to(next(hf_model.parameters()).dtype)


def load_hf_weights(model: GPTNeoX, hf_state: dict[str, torch.Tensor]) -> None:
    """Load HF-named weights; every HF weight must be used, and only method-added ones may be missing.
    K/V heads are mean-pooled when the model has fewer than the checkpoint."""
    state = fit_kv_heads(state_dict_from_hf(hf_state), model.cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"weights not used by the model: {unexpected[:5]}...")
    base_keys = set(GPTNeoX(model.cfg.with_(attention="standard", attention_kwargs={})).state_dict())
    lost = [k for k in missing if k in base_keys]
    if lost:
        raise ValueError(f"checkpoint lacks base weights: {lost[:5]}...")


def from_pretrained(name_or_path: str | os.PathLike, **overrides: Any) -> GPTNeoX:
    """Load from a local `save_pretrained` directory, or a Hub name (downloaded, or from the HF cache offline).

    Raises FileNotFoundError naming both the local path and the Hub id when neither has the weights.
    """
    from transformers import GPTNeoXForCausalLM

    try:
        hf_model = GPTNeoXForCausalLM.from_pretrained(str(name_or_path), use_safetensors=True).float()
    except OSError as err:
        from huggingface_hub.constants import is_offline_mode

        offline = is_offline_mode()
        where = " (HF_HUB_OFFLINE=1: only the local Hugging Face cache was looked at)" if offline else ""
        raise FileNotFoundError(
            f"no base weights: {str(Path(name_or_path).expanduser())!r} is not a local model directory and the "
            f"Hub id {str(name_or_path)!r} could not be loaded{where}. "
            f"Download it (`hf download {name_or_path} --local-dir <dir>`) and pass the directory, "
            f"or a kvcompress .ckpt. ({type(err).__name__}: {str(err).splitlines()[0]})"
        ) from err
    return from_hf_model(hf_model, **overrides)


def to_hf_model(model: GPTNeoX) -> GPTNeoXForCausalLM:
    """A `GPTNeoXForCausalLM` with this model's weights (standard attention, n_kv_head = n_head only)."""
    from transformers import GPTNeoXForCausalLM

    if model.cfg.attention != "standard":
        raise ValueError(f"attention {model.cfg.attention!r} has no Hugging Face equivalent to export to")
    hf_config = config_to_hf(model.cfg)  # refuses grouped K/V heads
    hf_model = GPTNeoXForCausalLM(hf_config)
    head_key = "lm_head.weight" if "lm_head.weight" in hf_model.state_dict() else "embed_out.weight"
    state = {(head_key if k == "embed_out.weight" else HF_PREFIX + k): v for k, v in model.state_dict().items()}
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "rotary" not in k]:
        raise ValueError(f"export mismatch: missing={missing} unexpected={unexpected}")
    # (the ignore: transformers types its `to`, @wraps(nn.Module.to), as the unbound method)
    return hf_model.to(next(model.parameters()).dtype)  # type: ignore[arg-type]


def save_pretrained(model: GPTNeoX, directory: str | os.PathLike) -> None:
    """Write a Hugging Face directory (config.json + model.safetensors)."""
    to_hf_model(model).save_pretrained(str(directory), safe_serialization=True)
