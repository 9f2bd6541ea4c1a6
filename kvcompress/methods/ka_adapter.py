"""KA cache + Adapter, "plan 1" (METHODS.md section 3).

A model trained with standard attention decodes with the KA cache `[K, A]` instead of `[K, V]`; the past
values are rebuilt from the cached attention outputs by a small per-layer adapter, `V' = adapter(A)`.
The adapter trains "in parallel mode": one teacher-forced forward of the frozen base, with an MSE between
`adapter(A)` and the values it should reproduce, added to `aux["adapter"]` (one scalar per layer).

Trainable parameters of the adapter phase: names matching `*.attention.ka_adapter.*`.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kvcompress.models.config import ModelConfig
from kvcompress.models.gpt_neox import Attention, Aux, register_attention

__all__ = ["ADAPTER_PARAM_PATTERN", "KAAdapter", "KAAdapterAttention", "adapter_loss"]

# Name pattern (fnmatch) of the parameters trained in the adapter phase.
ADAPTER_PARAM_PATTERN = "*.attention.ka_adapter.*"
TARGETS = ("next", "same")


class KAAdapter(nn.Module):
    """`LayerNorm(hs) -> Linear(hs, bottleneck) -> GELU -> Linear(bottleneck, hs)` on head vectors (..., hs)."""

    def __init__(self, head_size: int, bottleneck: int = 64, eps: float = 1e-5) -> None:
        super().__init__()
        if bottleneck < 1:
            raise ValueError(f"bottleneck must be >= 1, got {bottleneck}")
        self.norm = nn.LayerNorm(head_size, eps=eps)
        self.up = nn.Linear(head_size, bottleneck)
        self.down = nn.Linear(bottleneck, head_size)

    def forward(self, a: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(self.norm(a))))


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

    Uncached forward is standard attention; with `aux`, the adapter MSE is added to `aux["adapter"]`.
    `cache="kv"` decodes exactly; `cache="ka"` decodes with `[K, adapter(A)]` (the KA cache is given
    `self.ka_adapter` when it is built).
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int, bottleneck: int = 64, target: str = "next") -> None:
        super().__init__(cfg, layer_idx)
        if target not in TARGETS:
            raise ValueError(f"ka_adapter target must be one of {TARGETS}, got {target!r}")
        self.target = target
        self.ka_adapter = KAAdapter(cfg.head_size, bottleneck, cfg.layer_norm_eps)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, aux: Aux | None = None) -> Tensor:
        a = super().attend(q, k, v, aux)  # (B, nh, T, hs), before W_O
        if aux is not None:  # per K/V group, the KA cache keeps the mean of its heads' outputs
            aux.setdefault("adapter", []).append(adapter_loss(self.ka_adapter, self.group_mean(a), v, self.target))
        return a
