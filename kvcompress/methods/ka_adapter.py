"""KA cache + Adapter, "plan 1" (METHODS.md section 3).

A model trained with standard attention decodes with the KA cache `[K, A]` instead of `[K, V]`; the past
values are rebuilt from the cached attention outputs by a small per-layer adapter, `V' = adapter(A)`.
With grouped K/V heads the cache keeps one A per group (the mean of its heads' outputs, `kvcompress.methods.ka`),
and the adapter maps that to the group's V.

Settings (`attention=ka_adapter`, conf/attention/ka_adapter.yaml): `bottleneck` (the hidden width), `layers` (hidden
layers of the adapter's MLP; 1 is report 000's adapter), `target` (the MSE's alignment), and `unroll_tokens` /
`unroll_chunk` (the cost bounds of the unrolled loss below).

Two auxiliary losses (uncached forward with `aux`), which a phase weights by name:
- `adapter`: "parallel mode" (report 000), one teacher-forced forward of the frozen base and an MSE between
  `adapter(A)` and the values it should reproduce, one scalar per layer (phase=ka_adapter);
- `unrolled`: the LM cross-entropy of the model decoding its inputs with the KA cache built from the adapter's own
  outputs, i.e. what `autoregressive_token_losses(model, ids, cache="ka")` measures (teacher-forced tokens, exact
  to rounding), but differentiable: each layer decodes its positions in order (`unrolled_token_losses`). It is
  computed only when asked for (the module passes the names its stage weights as keys of `aux`), since it costs
  a token loop per layer: `unroll_tokens` scores only each window's first positions, and `unroll_chunk` stops the
  gradient through the cached past every that many positions (truncated backpropagation; the value is unchanged)
  (phase=ka_adapter_unrolled). Early stopping stays on the autoregressive PPL (`val_ar_ppl`).

Trainable parameters of the adapter phase: names matching `*.attention.ka_adapter.*`.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kvcompress.models.caches import Caches, DecodeState, LayerCache, Step, group_mean, grouped_matmul
from kvcompress.models.config import ModelConfig
from kvcompress.models.gpt_neox import Attention, Aux, GPTNeoX, register_attention

__all__ = [
    "ADAPTER_PARAM_PATTERN",
    "KAAdapter",
    "KAAdapterAttention",
    "UnrolledKACache",
    "adapter_loss",
    "unrolled_token_losses",
]

# Name pattern (fnmatch) of the parameters trained in the adapter phase.
ADAPTER_PARAM_PATTERN = "*.attention.ka_adapter.*"
TARGETS = ("next", "same")


class KAAdapter(nn.Module):
    """`LayerNorm(hs) -> Linear(hs, bottleneck) -> GELU -> [Linear(bottleneck, bottleneck) -> GELU] x (layers - 1)
    -> Linear(bottleneck, hs)` on head vectors (..., hs); `layers=1` is report 000's adapter (same parameter names)."""

    def __init__(self, head_size: int, bottleneck: int = 64, eps: float = 1e-5, layers: int = 1) -> None:
        super().__init__()
        if isinstance(bottleneck, bool) or not isinstance(bottleneck, int) or bottleneck < 1:
            raise ValueError(f"ka_adapter bottleneck must be an integer >= 1, got {bottleneck!r}")
        if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
            raise ValueError(f"ka_adapter layers must be an integer >= 1 (hidden layers of the MLP), got {layers!r}")
        self.norm = nn.LayerNorm(head_size, eps=eps)
        self.up = nn.Linear(head_size, bottleneck)
        self.hidden = nn.ModuleList(nn.Linear(bottleneck, bottleneck) for _ in range(layers - 1))
        self.down = nn.Linear(bottleneck, head_size)

    def forward(self, a: Tensor) -> Tensor:
        h = F.gelu(self.up(self.norm(a)))
        for layer in self.hidden:
            h = F.gelu(layer(h))
        return self.down(h)


def adapter_loss(adapter: nn.Module, a: Tensor, v: Tensor, target: str = "next") -> Tensor:
    """MSE between adapter(A) and V, both (B, nh, T, hs).

    `"next"`: A of position t predicts V of position t+1 (the report's alignment).
    `"same"`: A of position t predicts V of position t (the slot `KACache` puts adapter(A[t]) in).
    """
    if target == "next":
        return F.mse_loss(adapter(a[:, :, :-1]), v[:, :, 1:])
    if target == "same":
        return F.mse_loss(adapter(a), v)
    raise ValueError(f"adapter target must be one of {TARGETS}, got {target!r}")


@register_attention("ka_adapter")
class KAAdapterAttention(Attention):
    """Standard attention plus a per-layer `ka_adapter` (shared by heads) used by the `"ka"` cache.

    Uncached forward is standard attention; with `aux`, the adapter MSE is added to `aux["adapter"]`, and the
    unrolled loss to `aux["unrolled"]` when `aux` asks for it (the module docstring).
    `cache="kv"` decodes exactly; `cache="ka"` decodes with `[K, adapter(A)]` (the KA cache is given
    `self.ka_adapter` when it is built).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        layer_idx: int,
        bottleneck: int = 64,
        target: str = "next",
        layers: int = 1,
        unroll_tokens: int | None = None,
        unroll_chunk: int | None = None,
    ) -> None:
        super().__init__(cfg, layer_idx)
        if target not in TARGETS:
            raise ValueError(f"ka_adapter target must be one of {TARGETS}, got {target!r}")
        for name, value in (("unroll_tokens", unroll_tokens), ("unroll_chunk", unroll_chunk)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"ka_adapter {name} must be null or an integer >= 1, got {value!r}")
        self.target = target
        self.unroll_tokens, self.unroll_chunk = unroll_tokens, unroll_chunk
        self.ka_adapter = KAAdapter(cfg.head_size, bottleneck, cfg.layer_norm_eps, layers)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, aux: Aux | None = None) -> Tensor:
        a = super().attend(q, k, v, aux)  # (B, nh, T, hs), before W_O
        if aux is not None:  # per K/V group, the KA cache keeps the mean of its heads' outputs
            aux.setdefault("adapter", []).append(adapter_loss(self.ka_adapter, self.group_mean(a), v, self.target))
        return a

    @staticmethod
    def model_aux(model: GPTNeoX, input_ids: Tensor, aux: Aux) -> None:
        """`aux["unrolled"]`: the mean CE of the inputs' next tokens decoded with the adapter's KA cache, when asked."""
        if "unrolled" not in aux:
            return
        first = next(cast(KAAdapterAttention, layer.attention) for layer in model.layers)
        losses = unrolled_token_losses(model, input_ids, first.unroll_tokens, first.unroll_chunk)
        aux["unrolled"].append(losses.mean())


class UnrolledKACache(LayerCache):
    """The KA cache of one teacher-forced pass, out of place so that it is differentiable: each new token attends
    over `[V'(Ā[0]), ..., V'(Ā[t-1]), V[t]]` with `V' = adapter` and Ā the group mean, as `KACache.attend_loop`
    does, but the past is a list of tensors (no buffer written in place). `chunk`: the past is detached every
    `chunk` positions (truncated backpropagation; the values are unchanged)."""

    def __init__(self, adapter: nn.Module, chunk: int | None = None) -> None:
        super().__init__(batch_size=0, max_len=0)
        self.adapter, self.chunk = adapter, chunk

    def attend(self, q: Tensor, k: Tensor, v: Tensor, step: Step) -> Tensor:
        """a_t = sum_{j<t} P[t, j] V'(Ā[j]) + P[t, t] V[t], position by position. P does not depend on the cache (q and
        k are the layer's), so it is computed once for all positions; only the mixing of the past is a loop."""
        B, nh, T, hs = q.shape
        g = k.shape[1]
        ct = q.dtype if q.dtype in (torch.float32, torch.float64) else torch.float32
        scores = grouped_matmul(q.to(ct) * hs**-0.5, k.to(ct).mT)  # (B, nh, T, T)
        p = scores.masked_fill(~step.mask, float("-inf")).softmax(dim=-1)
        diag = p.diagonal(dim1=-2, dim2=-1).unsqueeze(-1)  # (B, nh, T, 1)
        own = (diag.view(B, g, nh // g, T, 1) * v.to(ct).unsqueeze(2)).view(B, nh, T, hs)  # P[t, t] V[t]
        past: list[Tensor] = []  # V'(Ā[j]), (B, g, 1, hs) each
        outputs = []
        for t in range(T):
            if self.chunk is not None and t and t % self.chunk == 0:
                past = [x.detach() for x in past]
            a_t = own[:, :, t : t + 1]
            if t:
                a_t = a_t + grouped_matmul(p[:, :, t : t + 1, :t], torch.cat(past, dim=2))
            past.append(self.adapter(group_mean(a_t, g).to(v.dtype)).to(ct))
            outputs.append(a_t)
        return torch.cat(outputs, dim=2).to(q.dtype)


def unrolled_token_losses(
    model: GPTNeoX, input_ids: Tensor, tokens: int | None = None, chunk: int | None = None
) -> Tensor:
    """Per-token CE (B, n - 1) of input_ids[:, :n] (n = `tokens`, or all) decoded with the KA cache that the
    adapters build from their own outputs (teacher-forced, differentiable; `UnrolledKACache`): equal, up to float
    rounding, to `autoregressive_token_losses(model, input_ids[:, :n], cache="ka")`."""
    ids = input_ids if tokens is None else input_ids[:, :tokens]
    B, T = ids.shape
    if T < 2:
        raise ValueError(f"the unrolled KA loss needs at least 2 tokens (an input and its next token), got {T}")
    layers = [cast(Any, layer.attention).ka_adapter for layer in model.layers]
    device = ids.device
    zero = torch.zeros(1, dtype=torch.long, device=device)
    state = DecodeState(slot=zero, offset=zero.expand(B).clone(), max_len=T)
    caches = Caches([UnrolledKACache(adapter, chunk) for adapter in layers], state)
    logits = model(ids[:, :-1], caches)  # (B, T - 1, V)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
