"""`snapkv`: prompt tokens chosen by an observation window (Li et al. 2024, "SnapKV: LLM Knows What You are
Looking for Before Generation", arXiv:2404.14469).

After the exact prefill of a prompt, the attention of its last `window` queries (the observation window) is
summed per key and head, smoothed by a 1-D pooling over neighbouring positions (`kernel_size`, `pooling`), and
the `budget - window` best-voted earlier tokens are kept with the window itself. Choices the paper leaves open,
as taken here:
- defaults `window=8`, `kernel_size=5`, `pooling="avg"` (the paper: windows of 32 and kernels of 5-7, at 4k+
  tokens; kvpress: 64 and 5); the window is capped at the budget;
- per head (each head keeps its own tokens);
- decoding: the paper compresses the prompt only and lets the cache grow. With a fixed budget, decoded tokens
  first fill the free slots; once the buffer is full, the prompt's selection stays frozen and the remaining slots
  (the observation window's and the decoded tokens') act as a sliding window, the oldest of them evicted. Fed
  token by token with no prompt (`autoregressive_token_losses`), SnapKV is thus a sliding window of `budget`
  tokens; its selection acts on a prefilled prompt (the passkey probe);
- a prefill chunk after earlier ones re-selects over the kept slots and the chunk together.
State: the slots' positions (int32) and, per row, the position below which kept tokens are the frozen selection
(int32); both in the bytes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kvcompress.methods.eviction import EvictionCache, recent
from kvcompress.models.caches import register_cache

__all__ = ["SnapKVCache"]


@register_cache("snapkv", layouts=("kv",))
class SnapKVCache(EvictionCache):
    """`budget` slots: the prompt's tokens voted by its last `window` queries (pooled), then a sliding window."""

    attention_rows = "window"

    def __init__(
        self,
        batch_size: int,
        max_len: int,
        n_head: int,
        head_size: int,
        device=None,
        dtype=None,
        budget: int | float = 0.25,
        window: int = 8,
        kernel_size: int = 5,
        pooling: str = "avg",
    ) -> None:
        super().__init__(batch_size, max_len, n_head, head_size, device, dtype, budget)
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"snapkv window={window!r} must be a number of observation queries >= 1")
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"snapkv kernel_size={kernel_size!r} must be an odd int >= 1")
        if pooling not in ("avg", "max"):
            raise ValueError(f"snapkv pooling={pooling!r} must be 'avg' or 'max'")
        self.window, self.kernel_size, self.pooling = min(window, self.size), kernel_size, pooling
        self.buffers["frozen_below"] = torch.zeros(batch_size, 1, 1, device=device, dtype=torch.int32)

    def window_rows(self, T: int) -> slice:
        return slice(max(0, T - self.window), T)

    def _pool(self, votes: Tensor, pos: Tensor) -> Tensor:
        """Pool votes (B, nh, N) over neighbouring positions: sorted by position, pooled, put back."""
        B, nh, N = votes.shape
        order = pos.argsort(dim=-1)
        x = votes.gather(-1, order).reshape(B * nh, 1, N)
        pad = self.kernel_size // 2
        if self.pooling == "avg":
            x = F.avg_pool1d(x, self.kernel_size, stride=1, padding=pad)
        else:
            x = F.max_pool1d(x, self.kernel_size, stride=1, padding=pad)
        return torch.empty_like(votes).scatter_(-1, order, x.view(B, nh, N))

    def keep_scores(self, cand: dict[str, Tensor], probs: Tensor | None, last_pos: Tensor, decoding: bool) -> Tensor:
        pos = cand["pos"]
        if decoding:  # the frozen selection stays; the others slide, oldest out
            return torch.where(pos < self.buffers["frozen_below"], math.inf, pos.float())
        assert probs is not None  # attention_rows = "window"
        votes = self._pool(probs.sum(dim=2).masked_fill(pos < 0, 0.0), pos)
        return votes.masked_fill(recent(pos, last_pos, self.window), math.inf)

    def after_prefill(self, last_pos: Tensor) -> None:
        self.buffers["frozen_below"].copy_(last_pos + 1 - self.window)
