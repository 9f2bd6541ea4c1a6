"""Shared test helpers (imported by the test modules; pytest puts this folder on sys.path)."""

from __future__ import annotations

import torch
from torch import Tensor

from kvcompress.models import GPTNeoX, generate


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


def assert_cached_equals_uncached(
    model: GPTNeoX, prompt: Tensor, new_tokens: int, temperature: float = 0.0, seed: int = 0, atol: float = 1e-10
) -> Tensor:
    """Decoding with and without the cache gives the same tokens and logits (sampling from one seed)."""
    runs = [
        generate(
            model,
            prompt,
            new_tokens,
            temperature=temperature,
            generator=torch.Generator().manual_seed(seed),
            use_cache=use_cache,
            return_logits=True,
        )
        for use_cache in (True, False)
    ]
    (tok_c, log_c), (tok_u, log_u) = runs
    assert torch.equal(tok_c, tok_u)
    torch.testing.assert_close(log_c, log_u, atol=atol, rtol=0)
    return tok_c
