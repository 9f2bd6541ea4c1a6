"""`streaming_llm`: attention sinks plus a recent window (Xiao et al. 2023, "Efficient Streaming Language Models
with Attention Sinks", arXiv:2309.17453).

Keeps the first `sinks` tokens of each row (the "attention sinks") and the `budget - sinks` most recent ones;
every step evicts the oldest token that is not a sink. Choices the paper leaves open, as taken here:
- positions: the paper re-assigns positions inside the cache (the window shifts to sit after the sinks); here every
  token keeps its original position (keys are cached after rope, as in kvpress's `StreamingLLMPress`), so the
  model sees gaps in positions, never positions it was not trained on;
- `sinks` defaults to 4 (the paper's choice) and is capped at `budget - 1`, so one slot at least is recent (the
  new token's own); a budget below the prompt evicts the prompt's middle at prefill.
State: no scores; only the slots' positions (int32, in the bytes).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kvcompress.methods.eviction import EvictionCache
from kvcompress.models.caches import register_cache

__all__ = ["StreamingLLMCache"]


@register_cache("streaming_llm", layouts=("kv",))
class StreamingLLMCache(EvictionCache):
    """`budget` slots: `sinks` first tokens and the most recent ones."""

    def __init__(
        self,
        batch_size: int,
        max_len: int,
        n_head: int,
        head_size: int,
        device=None,
        dtype=None,
        budget: int | float = 0.25,
        sinks: int = 4,
    ) -> None:
        super().__init__(batch_size, max_len, n_head, head_size, device, dtype, budget)
        if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
            raise ValueError(f"streaming_llm sinks={sinks!r} must be a number of tokens >= 0")
        self.sinks = min(sinks, self.size - 1)

    def keep_scores(self, cand: dict[str, Tensor], probs: Tensor | None, last_pos: Tensor, decoding: bool) -> Tensor:
        pos = cand["pos"]
        return torch.where(pos < self.sinks, math.inf, pos.float())
