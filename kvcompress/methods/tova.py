"""`tova`: token omission via attention (Oren et al. 2024, "Transformers are Multi-State RNNs", arXiv:2401.06104).

When the cache is full, each step drops the token that the current query attends to least; the new token is a
candidate too (it is then never written). Choices the paper leaves open, as taken here (as in the paper and
kvpress's `TOVAPress`):
- the score is the current query's attention averaged over the layer's heads, so all heads of a layer keep the
  same tokens (the paper found the head average better than per-head choices);
- no sinks and no protected window: the rule alone decides;
- a prompt longer than the budget keeps, after its exact prefill, the tokens the prompt's last query attends to
  most (the paper applies the rule token by token; its prompt outputs then differ from exact attention).
State: only the slots' positions (int32, in the bytes); the scores come from the step's own attention.
"""

from __future__ import annotations

from torch import Tensor

from kvcompress.methods.eviction import EvictionCache
from kvcompress.models.caches import register_cache

__all__ = ["TOVACache"]


@register_cache("tova", layouts=("kv",))
class TOVACache(EvictionCache):
    """`budget` slots: the tokens the newest query attends to most (head average)."""

    attention_rows = "last"

    def keep_scores(self, cand: dict[str, Tensor], probs: Tensor | None, last_pos: Tensor, decoding: bool) -> Tensor:
        assert probs is not None  # attention_rows = "last"; the one query when decoding
        # Every head holds the same tokens in the same slots, so a slot's attention averages over heads.
        return probs[:, :, -1].mean(dim=1, keepdim=True).expand_as(cand["pos"])
