"""The decode systems: one per registered cache kind, on a model whose attention writes that kind's layout
(standard attention where it can), with the attention's `example_kwargs`; and HF `generate` as a reference.
Every system's model starts from the same seeded standard weights."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

import kvcompress.methods  # noqa: F401  (registers every method's attention and cache)
from kvcompress.models.caches import CACHES
from kvcompress.models.config import ModelConfig
from kvcompress.models.gpt_neox import ATTENTIONS, GPTNeoX
from kvcompress.models.hf import to_hf_model

if TYPE_CHECKING:
    from transformers import GPTNeoXForCausalLM, PreTrainedModel

HF = "hf"  # transformers generate(), standard weights; measured in batch-1 cells only
System = tuple[str, dict[str, Any], str]  # (attention, attention kwargs, cache kind)


def systems() -> dict[str, System]:
    """Every registered cache kind as a decode system, `kv` first: the attention is `standard` when the kind
    holds its layout, else the first attention whose native cache the kind is (or that writes a layout it holds)."""
    out: dict[str, System] = {}
    for kind, spec in CACHES.items():
        fits = [a for a in ATTENTIONS.values() if spec.serves(a.cache_layout)]
        if not fits:
            continue
        native = [a for a in fits if a.native_cache == kind]
        attention = ATTENTIONS["standard"] if ATTENTIONS["standard"] in fits else (native or fits)[0]
        out[kind] = (attention.name, dict(attention.example_kwargs), kind)
    return out


def copy_shared_weights(dst: nn.Module, src: nn.Module) -> int:
    """Copy every same-named, same-shaped tensor of src into dst; returns how many were copied."""
    src_state = src.state_dict()
    shared = {k: v for k, v in src_state.items() if k in dst.state_dict() and dst.state_dict()[k].shape == v.shape}
    dst.load_state_dict(shared, strict=False)
    return len(shared)


def set_sdpa(hf_model: PreTrainedModel) -> None:
    """Make a transformers model attend with SDPA, like ours."""
    if hasattr(hf_model, "set_attn_implementation"):
        hf_model.set_attn_implementation("sdpa")
    else:  # older transformers
        hf_model.config._attn_implementation = "sdpa"


def base_cfg(args: argparse.Namespace, attention: str = "standard", kwargs: dict | None = None) -> ModelConfig:
    overrides: dict[str, Any] = dict(attention=attention, attention_kwargs=kwargs or {})
    if args.vocab_size is not None:
        overrides["vocab_size"] = args.vocab_size
    return ModelConfig.from_name(args.model, **overrides)


def seeded_model(args: argparse.Namespace, attention: str = "standard", kwargs: dict | None = None) -> GPTNeoX:
    """The standard model from `--seed`; another attention gets its weights where names and shapes match."""
    torch.manual_seed(args.seed)
    standard = GPTNeoX(base_cfg(args))
    if attention == "standard":
        return standard
    model = GPTNeoX(base_cfg(args, attention, kwargs))
    copy_shared_weights(model, standard)
    return model


def hf_model(standard: GPTNeoX, info: dict[str, Any] | None = None) -> GPTNeoXForCausalLM:
    # (the ignore: transformers types its `to`, @wraps(nn.Module.to), as the unbound method)
    hf = to_hf_model(standard).to(standard.embed_out.weight.device)  # type: ignore[arg-type]
    set_sdpa(hf)  # our model uses SDPA too
    if info is not None:
        info["hf_attn_implementation"] = hf.config._attn_implementation
    hf.generation_config.eos_token_id = None  # never stop early: exactly the asked number of tokens
    return hf
