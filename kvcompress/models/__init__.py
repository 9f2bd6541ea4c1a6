"""Plain-PyTorch models and caches (no Lightning or Hydra here)."""

from kvcompress.models.build import build_model
from kvcompress.models.caches import Int8KVCache, KACache, KVCache, LayerCache
from kvcompress.models.config import ModelConfig
from kvcompress.models.generate import generate
from kvcompress.models.gpt_neox import ATTENTIONS, Attention, GPTNeoX, register_attention

__all__ = [
    "ATTENTIONS",
    "Attention",
    "build_model",
    "GPTNeoX",
    "Int8KVCache",
    "KACache",
    "KVCache",
    "LayerCache",
    "ModelConfig",
    "generate",
    "register_attention",
]
