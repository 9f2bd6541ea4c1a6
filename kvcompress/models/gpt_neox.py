"""GPT-NeoX / Pythia in plain PyTorch.

Module names follow Hugging Face's `GPTNeoXModel` so that weights convert by name. Attention
variants register by name (`@register_attention("...")`) and are picked by `ModelConfig.attention`.

Grouped K/V heads (GQA; `ModelConfig.n_kv_head`, 1 = MQA): query head h reads K/V head h // (n_head / n_kv_head)
(consecutive query heads share a K/V head, as SDPA's `enable_gqa` and `repeat_interleave` group them). The fused
`query_key_value` output is laid out per head as [q, k, v] interleaved (Hugging Face's layout) when n_kv_head ==
n_head, so such a model is today's exactly; with fewer K/V heads it is [Q of all n_head heads, then K of the
n_kv_head heads, then V of the n_kv_head heads], each block head-major: (n_head + 2 n_kv_head) x head_size
outputs (Hugging Face's GPT-NeoX has no grouped heads, so there is no layout to follow).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kvcompress.models.caches import (
    CACHES,
    Caches,
    DecodeState,
    LayerCache,
    Step,
    cannot_serve,
    eager_step,
    group_mean,
    sdpa,
)
from kvcompress.models.config import ModelConfig

ATTENTIONS: dict[str, type[Attention]] = {}

# Auxiliary per-forward outputs that layers may add to (e.g. {"recon": [...]}), keyed by loss name.
Aux = dict[str, list[Tensor]]


def register_attention(name: str):
    def wrap(cls: type[Attention]) -> type[Attention]:
        ATTENTIONS[name] = cls
        cls.name = name
        return cls

    return wrap


class RotaryEmbedding(nn.Module):
    """Rotary embedding on the first `rotary_ndims` dims of each head (GPT-NeoX's `rotary_pct`).

    The cos/sin tables are computed once in fp32 per device and kept out of the module's buffers, so
    casting the model to bf16 does not round them.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        dim = cfg.rotary_ndims
        self.inv_freq = 1.0 / (cfg.rotary_base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))  # as HF
        self.max_positions = cfg.max_position_embeddings
        self._tables: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def _table(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if device not in self._tables:
            positions = torch.arange(self.max_positions, dtype=torch.float)
            freqs = positions[:, None] * self.inv_freq[None, :]  # (P, rd/2)
            emb = torch.cat((freqs, freqs), dim=-1)  # (P, rd)
            self._tables[device] = (emb.cos().to(device), emb.sin().to(device))
        return self._tables[device]

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos/sin at `positions`: (T,) -> (T, rd); (B, T) per row -> (B, 1, T, rd), broadcast over heads."""
        cos, sin = self._table(positions.device)
        if positions.dim() == 1:
            return cos[positions], sin[positions]
        return cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (B, nh, T, hs); rotates the first cos.shape[-1] dims, passes the rest through."""
    rd = cos.shape[-1]
    if rd == 0:
        return x
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


@register_attention("standard")
class Attention(nn.Module):
    """Multi-head causal self-attention with fused QKV: per-head interleaved (HF layout), or [Q, K, V] blocks with
    grouped K/V heads (the module docstring). K and V have `n_kv_head` heads; `n_rep` query heads share each.

    Decoding goes through `decode(q, k, v, cache, step)`, which by default lets the cache store the new
    tokens and read itself (`cache.attend`); an attention that stores something else overrides it.
    """

    name: ClassVar[str]
    cache_layout: ClassVar[str] = "kv"  # what it writes per token; any cache kind registered for it can serve
    native_cache: ClassVar[str] = "kv"  # the cache kind `kind="native"` picks
    example_kwargs: ClassVar[dict[str, Any]] = {}  # a representative setting (the benchmark builds it)

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.n_head, self.head_size = cfg.n_head, cfg.head_size
        self.n_kv_head = cfg.kv_heads
        self.n_rep = cfg.n_head // self.n_kv_head  # query heads per K/V head
        self.query_key_value = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * self.n_kv_head) * cfg.head_size)
        self.dense = nn.Linear(cfg.n_embd, cfg.n_embd)

    def split_qkv(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """q (B, nh, T, hs), k and v (B, n_kv_head, T, hs), rotary applied to q and k."""
        B, T, _ = x.shape
        if self.n_rep == 1:
            qkv = self.query_key_value(x).view(B, T, self.n_head, 3 * self.head_size).transpose(1, 2)
            q, k, v = qkv.chunk(3, dim=-1)  # (B, nh, T, hs) each
        else:
            g, hs = self.n_kv_head, self.head_size
            q, k, v = self.query_key_value(x).split((self.n_head * hs, g * hs, g * hs), dim=-1)
            q = q.view(B, T, self.n_head, hs).transpose(1, 2)
            k, v = k.view(B, T, g, hs).transpose(1, 2), v.view(B, T, g, hs).transpose(1, 2)
        cos, sin = rope
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def group_mean(self, a: Tensor) -> Tensor:
        """Per-query-head tensors (B, nh, T, d) averaged over each K/V group -> (B, n_kv_head, T, d)."""
        return group_mean(a, self.n_kv_head)

    def merge_heads(self, a: Tensor) -> Tensor:
        B, _, T, _ = a.shape
        return a.transpose(1, 2).reshape(B, T, self.n_head * self.head_size)  # (B, T, C)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, aux: Aux | None = None) -> Tensor:
        """Uncached attention over the whole sequence; returns A = P V, (B, nh, T, hs)."""
        return sdpa(q, k, v, is_causal=True)

    @staticmethod
    def model_aux(model: GPTNeoX, input_ids: Tensor, aux: Aux) -> None:
        """Hook: auxiliary losses that need the whole model (e.g. a second, differently decoded pass), added to `aux`
        once per uncached forward with `aux` (once per attention class). `aux` arrives with the loss names the
        training stage weights as keys, so a costly loss can be computed only when asked for."""

    def decode(self, q: Tensor, k: Tensor, v: Tensor, cache: LayerCache, step: Step) -> Tensor:
        """Cached attention of the new tokens (B, nh, T, hs): the cache stores them and reads itself."""
        return cache.attend(q, k, v, step)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        cache: LayerCache | None = None,
        aux: Aux | None = None,
        step: Step | None = None,
    ) -> Tensor:
        return self.dense(self.merge_heads(self.heads(x, rope, cache, aux, step)))

    def heads(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        cache: LayerCache | None = None,
        aux: Aux | None = None,
        step: Step | None = None,
    ) -> Tensor:
        """Per-head attention outputs A (B, nh, T, hs), before W_O; with a cache, its decode path."""
        q, k, v = self.split_qkv(x, rope)
        if cache is None:
            return self.attend(q, k, v, aux)
        assert step is not None, "a cached forward needs its Step"
        return self.decode(q, k, v, cache, step)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(cfg.n_embd, cfg.intermediate_size)
        self.dense_4h_to_h = nn.Linear(cfg.intermediate_size, cfg.n_embd)

    def forward(self, x: Tensor) -> Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        if cfg.attention not in ATTENTIONS:
            raise ValueError(f"unknown attention {cfg.attention!r}; registered: {sorted(ATTENTIONS)}")
        self.parallel = cfg.use_parallel_residual
        self.input_layernorm = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.attention = ATTENTIONS[cfg.attention](cfg, layer_idx, **cfg.attention_kwargs)
        self.mlp = MLP(cfg)

    def forward(
        self, x: Tensor, rope, cache: LayerCache | None = None, aux: Aux | None = None, step: Step | None = None
    ) -> Tensor:
        a = self.attention(self.input_layernorm(x), rope, cache, aux, step)
        if self.parallel:  # x + attn(ln1(x)) + mlp(ln2(x))
            return x + a + self.mlp(self.post_attention_layernorm(x))
        h = x + a
        return h + self.mlp(self.post_attention_layernorm(h))


class GPTNeoX(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_in = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.final_layer_norm = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.embed_out = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)  # untied
        self.rotary = RotaryEmbedding(cfg)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self,
        input_ids: Tensor,
        caches: Caches | None = None,
        aux: Aux | None = None,
        last_only: bool = False,
    ) -> Tensor:
        """Logits (B, T, vocab), or (B, 1, vocab) with `last_only` (decoding needs no more).

        With `caches`, input_ids continue the cached sequence (eagerly; see `generate.decode_step`).
        """
        x = self.trunk(input_ids, caches, aux)
        if aux is not None and caches is None:
            for hook in dict.fromkeys(type(cast(Attention, layer.attention)).model_aux for layer in self.layers):
                hook(self, input_ids, aux)
        return self.head(x[:, -1:] if last_only else x)

    def trunk(self, input_ids: Tensor, caches: Caches | None = None, aux: Aux | None = None) -> Tensor:
        step = None if caches is None else eager_step(caches.state, input_ids.shape[1])
        x, rope = self.embed(input_ids, None if step is None else step.positions)
        return self.run_layers(x, rope, caches, aux, step=step)

    def embed(self, input_ids: Tensor, positions: Tensor | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Token embeddings (B, T, C) and the rotary tables at `positions` ((B, T) per row; None: 0..T-1)."""
        T = input_ids.shape[1]
        if positions is None:
            if T > self.cfg.max_position_embeddings:
                raise ValueError(
                    f"sequence of {T} tokens exceeds max_position_embeddings={self.cfg.max_position_embeddings}"
                )
            positions = torch.arange(T, device=input_ids.device)
        x = self.embed_in(input_ids)  # (B, T, C)
        return x, self.rope(positions, x)

    def rope(self, positions: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """cos/sin tables at `positions`, cast once (not per layer) to x's compute dtype."""
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        cos, sin = self.rotary(positions)
        return cos.to(dtype), sin.to(dtype)

    def run_layers(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        caches: Sequence[LayerCache] | None = None,
        aux: Aux | None = None,
        layers: slice = slice(None),
        step: Step | None = None,
    ) -> Tensor:
        """Hidden states after `self.layers[layers]`; `caches` holds one cache per layer of the whole model."""
        for i in range(*layers.indices(len(self.layers))):
            x = self.layers[i](x, rope, caches[i] if caches else None, aux, step)
        return x

    def head(self, x: Tensor) -> Tensor:
        """Logits: final LayerNorm, then the (untied) output projection."""
        return self.embed_out(self.final_layer_norm(x))

    def build_caches(
        self, batch_size: int, max_len: int, kind: str = "native", device=None, dtype=None, **kwargs: Any
    ) -> Caches:
        """One cache per layer and their shared decode state; `kind="native"` takes each attention's own cache.

        `kwargs` go to the cache kind (e.g. int4's `group_size`, `window`).
        """
        if max_len > self.cfg.max_position_embeddings:
            raise ValueError(f"max_len={max_len} exceeds max_position_embeddings={self.cfg.max_position_embeddings}")
        param = self.embed_out.weight
        device = device or param.device
        dtype = dtype or param.dtype
        caches = []
        for layer in self.layers:
            attn = cast(Attention, layer.attention)
            layer_kind = attn.native_cache if kind == "native" else kind
            spec = CACHES.get(layer_kind)
            if spec is None or not spec.serves(attn.cache_layout):
                raise cannot_serve(layer_kind, attn.name, attn.cache_layout)
            caches.append(spec.build(attn, batch_size, max_len, device=device, dtype=dtype, **kwargs))
        state = DecodeState(
            slot=torch.zeros(1, dtype=torch.long, device=device),
            offset=torch.zeros(batch_size, dtype=torch.long, device=device),
            max_len=max_len,
        )
        return Caches(caches, state)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
