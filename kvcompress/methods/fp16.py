"""`fp16`: the standard K/V cache stored in half precision (float16), for models that run in fp32.

Half the bytes of an fp32 run's `[K, V]` cache, and lossy only by float16 rounding (a relative error of at most
2^-11 per value; K/V stay far inside float16's range). New tokens are rounded when written, so prefilling in
chunks gives the same result as prefilling at once. For a bf16 model this kind holds the same bytes as `kv`.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from kvcompress.models.caches import LayerCache, Step, register_cache, sdpa


@register_cache("fp16", layouts=("kv",))
class HalfKVCache(LayerCache):
    """Keys and values in float16, (B, n_kv_head, max_len, hs) each; read back in the query's dtype."""

    fillable: ClassVar[bool] = True  # an early exit may write K/V into it without attention

    def __init__(self, batch_size: int, max_len: int, n_head: int, head_size: int, device=None, dtype=None) -> None:
        super().__init__(batch_size, max_len)
        shape = (batch_size, n_head, max_len, head_size)
        self.buffers = {name: torch.zeros(shape, device=device, dtype=torch.float16) for name in ("k", "v")}

    def append(self, k: Tensor, v: Tensor, step: Step) -> None:
        self.write("k", k, step)
        self.write("v", v, step)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, step: Step) -> Tensor:
        self.append(k, v, step)
        keys, values = (self.read(name, step).to(q.dtype) for name in ("k", "v"))
        return sdpa(q, keys, values, attn_mask=step.mask)
