"""Autoregressive decoding, with or without a cache."""

from __future__ import annotations

import torch
from torch import Tensor

from kvcompress.models.caches import LayerCache
from kvcompress.models.gpt_neox import GPTNeoX


def sample_next(
    logits: Tensor, temperature: float = 0.0, top_k: int | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """Next token ids (B,) from last-position logits (B, V): greedy at temperature 0."""
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: GPTNeoX,
    input_ids: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    cache: str = "native",
    caches: list[LayerCache] | None = None,
    return_logits: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Append `max_new_tokens` tokens to `input_ids` (B, T).

    With `use_cache`, the prompt is prefilled once and each new token is one forward of one position.
    `return_logits` also returns the logits each new token was drawn from, (B, max_new_tokens, V).
    """
    if max_new_tokens < 0:
        raise ValueError("max_new_tokens must be >= 0")
    B, T = input_ids.shape
    tokens = torch.empty((B, T + max_new_tokens), dtype=input_ids.dtype, device=input_ids.device)
    tokens[:, :T] = input_ids
    step_logits = []
    if use_cache and caches is None:
        caches = model.build_caches(B, T + max_new_tokens, kind=cache)
    logits = model(input_ids, caches if use_cache else None, last_only=True)[:, -1]
    for i in range(max_new_tokens):
        if return_logits:
            step_logits.append(logits)
        nxt = sample_next(logits, temperature, top_k, generator)
        tokens[:, T + i] = nxt
        if i + 1 == max_new_tokens:
            break
        if use_cache:
            logits = model(tokens[:, T + i : T + i + 1], caches, last_only=True)[:, -1]
        else:
            logits = model(tokens[:, : T + i + 1], last_only=True)[:, -1]
    if return_logits:
        empty = input_ids.new_zeros((B, 0, model.cfg.vocab_size), dtype=torch.float)
        return tokens, torch.stack(step_logits, dim=1) if step_logits else empty
    return tokens
