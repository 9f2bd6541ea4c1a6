"""Shared test helpers (imported by the test modules; pytest puts this folder on sys.path)."""

from __future__ import annotations

import torch
from torch import Tensor

from kvcompress.models import GPTNeoX


def randomized(model: GPTNeoX, std: float = 0.2, seed: int = 0, dtype: torch.dtype | None = None) -> GPTNeoX:
    """Scaled-up random weights, biases included, so attention is far from uniform and wiring errors show."""
    if dtype is not None:
        model = model.to(dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
    return model.eval()


def random_ids(B: int, T: int, vocab: int = 512, seed: int = 0) -> Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))
