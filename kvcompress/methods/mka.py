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

import math
from collections.abc import Iterable
from fnmatch import fnmatch
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kvcompress.methods.ka import ka_attention
from kvcompress.models.caches import LayerCache, attend_causal, causal_mask
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

    def forward(self, a: Tensor, cache: MKACache | None = None) -> Tensor:
        """a: (B, T, C) merged attention outputs -> ka(a) (B, T, C)."""
        B, T, C = a.shape
        h = self.norm(a)
        q, k, v = self.heads(self.q_proj(h)), self.heads(self.k_proj(h)), self.heads(self.v_proj(h))
        out = ka_attention(q, k, v) if cache is None else cache.attend_ka(q, k, v)  # (B, nh, T, hs)
        return out.transpose(1, 2).reshape(B, T, C)


class MKACache(LayerCache):
    """Cache of an MKA layer: the base's K, V and the KA layer's own K and past outputs A_ka.

    Buffers (B, nh, max_len, hs) each: `k`, `v` (base attention), `ka_k`, `ka_a` (KA layer), i.e. 4*C
    values per token. `attend` serves the base attention and advances the length; `attend_ka` must
    follow it for the same new tokens.
    """

    def __init__(self, batch_size: int, max_len: int, n_head: int, head_size: int, device=None, dtype=None) -> None:
        super().__init__(batch_size, max_len)
        shape = (batch_size, n_head, max_len, head_size)
        self.buffers = {name: torch.zeros(shape, device=device, dtype=dtype) for name in ("k", "v", "ka_k", "ka_a")}

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        span = self._take(k.shape[-2])
        self.buffers["k"][:, :, span] = k
        self.buffers["v"][:, :, span] = v
        return attend_causal(q, self.buffers["k"][:, :, : self.length], self.buffers["v"][:, :, : self.length])

    def attend_ka(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """KA-Attention of the new tokens (the last q.shape[-2] positions) continuing the cached ones.

        With P the new rows of the causal weights: A_new = P_past A_past + strict_lower(P_new) A_new
        + diag(P_new) V_new, solved exactly (a unit-lower-triangular system over the new tokens).
        """
        n_new, total = q.shape[-2], self.length
        past = total - n_new
        ct = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        self.buffers["ka_k"][:, :, past:total] = k
        keys = self.buffers["ka_k"][:, :, :total].to(ct)
        scores = (q.to(ct) @ keys.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B, nh, n_new, total)
        p = scores.masked_fill(~causal_mask(n_new, total, q.device), float("-inf")).softmax(dim=-1)
        p_new = p[..., past:]  # (B, nh, n_new, n_new), lower triangular
        rhs = p_new.diagonal(dim1=-2, dim2=-1).unsqueeze(-1) * v.to(ct)
        if past:
            rhs = rhs + p[..., :past] @ self.buffers["ka_a"][:, :, :past].to(ct)
        a = rhs if n_new == 1 else torch.linalg.solve_triangular(-p_new, rhs, upper=False, unitriangular=True)
        self.buffers["ka_a"][:, :, past:total] = a.to(self.buffers["ka_a"].dtype)
        return a.to(v.dtype)


@register_attention("mka")
class MKAAttention(Attention):
    """Standard attention; in the layers listed in `layers`, `A' = A + ka(A)` before `dense`."""

    cache_kinds: ClassVar[tuple[str, ...]] = ("mka",)

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
    ) -> Tensor:
        a = self.merge_heads(self.heads(x, rope, cache, aux))  # (B, T, C)
        if self.mka is not None:
            if cache is not None and not isinstance(cache, MKACache):
                raise TypeError(f"MKA layer {self.layer_idx} needs an MKACache, got {type(cache).__name__}")
            a = a + self.mka(a, cache)
        return self.dense(a)

    def build_cache(self, kind: str, batch_size: int, max_len: int, device=None, dtype=None) -> LayerCache:
        if kind != "mka":
            raise ValueError(f"cache {kind!r} cannot serve attention {self.name!r}; it serves {self.cache_kinds}")
        if self.mka is None:  # plain layer: the standard cache
            return super().build_cache("kv", batch_size, max_len, device, dtype)
        return MKACache(batch_size, max_len, self.n_head, self.head_size, device, dtype)


def freeze_all_but_mka(model: nn.Module) -> int:
    """Freeze every parameter except the KA layers (`*.attention.mka.*`); returns the trainable count."""
    for name, param in model.named_parameters():
        param.requires_grad_(fnmatch(name, MKA_PARAM_PATTERN))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
