"""`h2o`: heavy hitters plus a recent window (Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for Efficient
Generative Inference of Large Language Models", arXiv:2306.14048).

Each slot accumulates the attention it has received from every query so far (per head; the prompt's queries
included); the `window` most recent tokens are always kept, and each step evicts the slot with the lowest
accumulated attention among the others. Choices the paper leaves open, as taken here:
- `window` (the recent share) defaults to half the budget (the paper's equal split of heavy hitters and recent
  tokens); a float is a share of the budget, an int a number of slots;
- scores are plain sums of attention probabilities (no normalisation by how many queries a token has seen, so
  older tokens are favoured, as in the paper), per head (each head keeps its own tokens), kept in float32;
- a prompt longer than the budget is reduced once after its exact prefill, by the column sums of its causal
  attention matrix (the paper's "one-shot" variant of the greedy per-token rule).
State: the accumulated scores (float32) and the slots' positions (int32), both in the bytes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kvcompress.methods.eviction import EvictionCache, recent, share_or_count
from kvcompress.models.caches import register_cache

__all__ = ["H2OCache"]


@register_cache("h2o", layouts=("kv",))
class H2OCache(EvictionCache):
    """`budget` slots: the `window` most recent tokens and the heaviest hitters by accumulated attention."""

    attention_rows = "all"
    slot_state = ("score",)

    def __init__(
        self,
        batch_size: int,
        max_len: int,
        n_head: int,
        head_size: int,
        device=None,
        dtype=None,
        budget: int | float = 0.25,
        window: int | float = 0.5,
    ) -> None:
        super().__init__(batch_size, max_len, n_head, head_size, device, dtype, budget)
        self.window = share_or_count(window, self.size, "h2o window")
        self.buffers["score"] = torch.zeros(batch_size, n_head, self.size, device=device, dtype=torch.float32)

    def candidate_state(self, old: dict[str, Tensor], k: Tensor, probs: Tensor | None) -> dict[str, Tensor]:
        assert probs is not None  # attention_rows = "all"
        fresh = old["score"].new_zeros(k.shape[:3])  # (B, nh, T)
        return {"score": torch.cat((old["score"], fresh), dim=-1) + probs.sum(dim=2)}

    def keep_scores(self, cand: dict[str, Tensor], probs: Tensor | None, last_pos: Tensor, decoding: bool) -> Tensor:
        return cand["score"].masked_fill(recent(cand["pos"], last_pos, self.window), math.inf)
