"""Plain-PyTorch models and caches (no Lightning or Hydra here; no method's code either)."""

from kvcompress.models.build import build_model
from kvcompress.models.caches import CACHES, Caches, DecodeState, KVCache, LayerCache, register_cache
from kvcompress.models.config import ModelConfig
from kvcompress.models.generate import compiled_decode_step, decode_step, generate, prefill
from kvcompress.models.gpt_neox import ATTENTIONS, Attention, GPTNeoX, register_attention
from kvcompress.models.gqa import pool_kv_heads

__all__ = [
    "ATTENTIONS",
    "CACHES",
    "Attention",
    "build_model",
    "Caches",
    "compiled_decode_step",
    "decode_step",
    "DecodeState",
    "GPTNeoX",
    "KVCache",
    "LayerCache",
    "ModelConfig",
    "generate",
    "pool_kv_heads",
    "prefill",
    "register_attention",
    "register_cache",
]
