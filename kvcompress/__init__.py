"""kvcompress: train and evaluate KV-cache compression for GPT-NeoX / Pythia models."""

import kvcompress.methods  # noqa: F401  (registers every method's attention)
from kvcompress.models import GPTNeoX, ModelConfig, generate

__all__ = ["GPTNeoX", "ModelConfig", "generate"]
__version__ = "0.1.0"
