"""PretrainedMKA (METHODS.md section 4): KA-attention among a frozen pretrained model's attention outputs.

In the chosen layers, the base attention output A (B, T, C, merged heads, before `dense` = W_O) gets a
trainable KA-attention layer added residually, `A' = A + ka(A)`, then the frozen `dense`:

    ka(A) = merge(KA-Attention(q(LN(A)), k(LN(A)), v(LN(A))))     (n_head heads, no rotary, no W_O)

One layer at hidden 512 is LayerNorm(512) + three Linear(512, 512) with bias: 788,992 parameters. The v
projection starts at zero by default (`zero_init=True`), so ka(A) = 0 and MKA starts exactly at the
pretrained model. Layers not listed in `layers` are standard attention with no extra parameters.

Trainable parameters: names matching `*.attention.mka.*` (`MKA_PARAM_PATTERN`, `freeze_all_but_mka`).
"""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatch
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kvcompress.methods.ka import KACache, ka_attention
from kvcompress.models.caches import KVCache, LayerCache, Step, cannot_serve, register_cache
from kvcompress.models.config import ModelConfig
from kvcompress.models.gpt_neox import Attention, Aux, register_attention

__all__ = [
    "MKA_PARAM_PATTERN",
    "KALayer",
    "MKAAttention",
    "MKACache",
    "freeze_all_but_mka",
    "resolve_layers",
]

MKA_PARAM_PATTERN = "*.attention.mka.*"


def resolve_layers(layers: int | Iterable[int], n_layer: int) -> tuple[int, ...]:
    """Sorted non-negative layer indices; negative ones count from the end."""
    items = [layers] if isinstance(layers, int) else list(layers)
    out = set()
    for layer in items:
        layer = int(layer)
        if not -n_layer <= layer < n_layer:
            raise ValueError(f"mka layer {layer} is out of range for a model of {n_layer} layers")
        out.add(layer % n_layer)
    if not out:
        raise ValueError("mka needs at least one layer in `layers`")
    return tuple(sorted(out))


class ZeroableLinear(nn.Module):
    """A Linear(in, out) with bias that keeps its own init (zero or N(0, 0.02)).

    Not an `nn.Linear`, so `GPTNeoX._init_weights` (which runs after the layers are built) leaves it alone.
    """

    def __init__(self, in_features: int, out_features: int, zero: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features))
        self.zero = zero
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.zero:
            nn.init.zeros_(self.weight)
        else:
            nn.init.normal_(self.weight, std=0.02)
        nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class KALayer(nn.Module):
    """LayerNorm(C) + q/k/v projections over n_head heads; KA-Attention among the input vectors."""

    def __init__(self, cfg: ModelConfig, zero_init: bool = True) -> None:
        super().__init__()
        C = cfg.n_embd
        self.n_head, self.head_size = cfg.n_head, cfg.head_size
        self.norm = nn.LayerNorm(C, eps=cfg.layer_norm_eps)
        self.q_proj = nn.Linear(C, C)
        self.k_proj = nn.Linear(C, C)
        self.v_proj = ZeroableLinear(C, C, zero=zero_init)

    def heads(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)

    def forward(self, a: Tensor, cache: KACache | None = None, step: Step | None = None) -> Tensor:
        """a: (B, T, C) merged attention outputs -> ka(a) (B, T, C)."""
        B, T, C = a.shape
        h = self.norm(a)
        q, k, v = self.heads(self.q_proj(h)), self.heads(self.k_proj(h)), self.heads(self.v_proj(h))
        if cache is None:
            out = ka_attention(q, k, v)  # (B, nh, T, hs)
        else:
            assert step is not None, "a cached forward needs its Step"
            out = cache.attend(q, k, v, step)
        return out.transpose(1, 2).reshape(B, T, C)


class MKACache(LayerCache):
    """Cache of an MKA layer: the base's [K, V] (a `KVCache`) and the KA layer's [K, A] (a `KACache`).

    Buffers: `k`, `v` (base attention, (B, n_kv_head, max_len, hs)), `ka_k`, `ka_a` (KA layer, (B, nh, max_len, hs);
    the KA layer has its own n_head heads), i.e. 4*C values per token without grouped heads.
    """

    def __init__(
        self,
        batch_size: int,
        max_len: int,
        n_head: int,
        head_size: int,
        device=None,
        dtype=None,
        n_kv_head: int | None = None,
    ) -> None:
        super().__init__(batch_size, max_len)
        kv_heads = n_head if n_kv_head is None else n_kv_head
        self.kv = KVCache(batch_size, max_len, kv_heads, head_size, device=device, dtype=dtype)
        self.ka = KACache(batch_size, max_len, n_head, head_size, None, device=device, dtype=dtype)
        self.buffers = {**self.kv.buffers, **{f"ka_{name}": t for name, t in self.ka.buffers.items()}}

    def attend(self, q: Tensor, k: Tensor, v: Tensor, step: Step) -> Tensor:
        return self.kv.attend(q, k, v, step)


@register_cache("mka", layouts=("mka",))
def build_mka_cache(attn: Any, batch_size: int, max_len: int, device=None, dtype=None) -> LayerCache:
    """MKACache in the KA layers; the standard KVCache in plain layers."""
    if attn.mka is None:
        return KVCache(batch_size, max_len, attn.n_kv_head, attn.head_size, device=device, dtype=dtype)
    return MKACache(
        batch_size, max_len, attn.n_head, attn.head_size, device=device, dtype=dtype, n_kv_head=attn.n_kv_head
    )


@register_attention("mka")
class MKAAttention(Attention):
    """Standard attention; in the layers listed in `layers`, `A' = A + ka(A)` before `dense`."""

    cache_layout: ClassVar[str] = "mka"
    native_cache: ClassVar[str] = "mka"

    def __init__(
        self, cfg: ModelConfig, layer_idx: int, layers: int | Iterable[int] = (-1,), zero_init: bool = True
    ) -> None:
        super().__init__(cfg, layer_idx)
        self.mka_layers = resolve_layers(layers, cfg.n_layer)
        self.mka: KALayer | None = KALayer(cfg, zero_init) if layer_idx in self.mka_layers else None

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        cache: LayerCache | None = None,
        aux: Aux | None = None,
        step: Step | None = None,
    ) -> Tensor:
        a = self.merge_heads(self.heads(x, rope, cache, aux, step))  # (B, T, C)
        if self.mka is not None:
            if cache is not None and not isinstance(cache, MKACache):
                raise cannot_serve(getattr(cache, "name", type(cache).__name__), self.name, self.cache_layout)
            a = a + self.mka(a, None if cache is None else cache.ka, step)
        return self.dense(a)


def freeze_all_but_mka(model: nn.Module) -> int:
    """Freeze every parameter except the KA layers (`*.attention.mka.*`); returns the trainable count."""
    for name, param in model.named_parameters():
        param.requires_grad_(fnmatch(name, MKA_PARAM_PATTERN))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
