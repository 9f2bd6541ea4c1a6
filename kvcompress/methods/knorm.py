"""`knorm`: keep the keys with the lowest L2 norm (Devoto et al. 2024, "A Simple and Effective L2 Norm-Based
Strategy for KV Cache Compression", arXiv:2406.11430).

A low key norm goes with high attention, so each step drops the slot whose key has the largest L2 norm; the new
token is a candidate too (it is then never written). Choices the paper leaves open, as taken here (as kvpress's
`KnormPress`):
- norms of the keys after rope (a rotation: the norm is the same before and after), per head;
- no sinks and no protected window (the paper keeps none; its first tokens tend to have low norms anyway);
- the norms are kept per slot so a decode step reads no key twice, in bfloat16 (8 bits of mantissa, a 0.4% step):
  a token's key has the same norm at every position in exact arithmetic (rope is a rotation), but rope's rounding
  makes the norms of repeated tokens differ in their last bits; at bfloat16 they tie, and ties go by age (the
  oldest is evicted first), so rounding noise never decides (compiled and eager decoding choose alike).
State: the key norms (bfloat16) and the slots' positions (int32), both in the bytes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvcompress.methods.eviction import EvictionCache
from kvcompress.models.caches import register_cache

__all__ = ["KnormCache"]


@register_cache("knorm", layouts=("kv",))
class KnormCache(EvictionCache):
    """`budget` slots: the keys with the lowest L2 norm."""

    slot_state = ("norm",)

    def __init__(
        self,
        batch_size: int,
        max_len: int,
        n_head: int,
        head_size: int,
        device=None,
        dtype=None,
        budget: int | float = 0.25,
    ) -> None:
        super().__init__(batch_size, max_len, n_head, head_size, device, dtype, budget)
        self.buffers["norm"] = torch.zeros(batch_size, n_head, self.size, device=device, dtype=torch.bfloat16)

    def candidate_state(self, old: dict[str, Tensor], k: Tensor, probs: Tensor | None) -> dict[str, Tensor]:
        return {"norm": torch.cat((old["norm"], k.float().norm(dim=-1).to(torch.bfloat16)), dim=-1)}

    def keep_scores(self, cand: dict[str, Tensor], probs: Tensor | None, last_pos: Tensor, decoding: bool) -> Tensor:
        return -cand["norm"].float()
