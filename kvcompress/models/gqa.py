"""Grouped K/V heads from a multi-head checkpoint: mean-pooling (Ainslie et al. 2023, "GQA: Training Generalized
Multi-Query Transformer Models from Multi-Head Checkpoints").

A checkpoint with G K/V heads becomes one with g heads (g divides G) by averaging, in each group of G / g
consecutive heads, the K projection's rows and biases and the V projection's rows and biases (query heads keep
theirs). Groups are consecutive heads, as `GPTNeoX` groups query heads (query head h reads K/V head
h // (n_head / g)). The fused `query_key_value` layouts are the model's (see `kvcompress.models.gpt_neox`):
per-head interleaved [q, k, v] when the K/V heads equal the query heads, else [Q | K | V] blocks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvcompress.models.config import ModelConfig

__all__ = ["fit_kv_heads", "fuse_qkv_rows", "kv_heads_in", "pool_kv_heads", "split_qkv_rows"]

QKV = "attention.query_key_value."  # the fused projection's weight / bias keys end with QKV + "weight" / "bias"


def split_qkv_rows(x: Tensor, n_head: int, n_kv_head: int, head_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """The fused projection's rows (a weight (out, in) or a bias (out,)) as q (n_head, hs, ...), k and v
    (n_kv_head, hs, ...)."""
    rest = x.shape[1:]
    if n_kv_head == n_head:
        heads = x.reshape(n_head, 3, head_size, *rest)
        return heads[:, 0], heads[:, 1], heads[:, 2]
    q, k, v = x.split((n_head * head_size, n_kv_head * head_size, n_kv_head * head_size))
    return (
        q.reshape(n_head, head_size, *rest),
        k.reshape(n_kv_head, head_size, *rest),
        v.reshape(n_kv_head, head_size, *rest),
    )


def fuse_qkv_rows(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The inverse of `split_qkv_rows` (the layout follows from the head counts)."""
    n_head, head_size, *rest = q.shape
    if k.shape[0] == n_head:
        return torch.stack((q, k, v), dim=1).reshape(3 * n_head * head_size, *rest)
    return torch.cat((q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)))


def kv_heads_in(state: dict[str, Tensor], cfg: ModelConfig) -> int | None:
    """The number of K/V heads of a checkpoint of `cfg`'s n_head and head_size (from its first fused projection's
    rows); None when it has no fused projection."""
    key = next((k for k in state if k.endswith(QKV + "weight")), None)
    if key is None:
        return None
    rows, hs = state[key].shape[0], cfg.head_size
    if rows % hs or (rows // hs - cfg.n_head) % 2 or rows // hs <= cfg.n_head:
        raise ValueError(f"{key} has {rows} rows: not (n_head={cfg.n_head} + 2 x K/V heads) x head_size={hs}")
    return (rows // hs - cfg.n_head) // 2


def pool_kv_heads(state: dict[str, Tensor], cfg_from: ModelConfig, cfg_to: ModelConfig) -> dict[str, Tensor]:
    """`state` (a checkpoint of `cfg_from`) with each group's K and V projection rows and biases mean-pooled to
    `cfg_to.kv_heads` heads; every other tensor is passed through. Groups of 1 give the checkpoint back."""
    g_from, g_to = cfg_from.kv_heads, cfg_to.kv_heads
    if (cfg_from.n_head, cfg_from.head_size) != (cfg_to.n_head, cfg_to.head_size):
        raise ValueError(
            f"pooling K/V heads keeps the query heads: n_head / head_size {cfg_from.n_head} / {cfg_from.head_size} "
            f"vs {cfg_to.n_head} / {cfg_to.head_size}"
        )
    if g_from % g_to:
        raise ValueError(f"n_kv_head={g_to} must divide the checkpoint's {g_from} K/V heads to pool them")
    if g_from == g_to:
        return dict(state)
    out = dict(state)
    for key, value in state.items():
        if not key.endswith((QKV + "weight", QKV + "bias")):
            continue
        q, k, v = split_qkv_rows(value, cfg_from.n_head, g_from, cfg_from.head_size)
        group = g_from // g_to
        k = k.reshape(g_to, group, *k.shape[1:]).mean(dim=1)
        v = v.reshape(g_to, group, *v.shape[1:]).mean(dim=1)
        out[key] = fuse_qkv_rows(q, k, v).contiguous()
    return out


def fit_kv_heads(state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """`state` for a model of `cfg`: mean-pooled when the checkpoint has more K/V heads than `cfg` (a divisor of
    them); as it is otherwise (a checkpoint with fewer heads fails in the load, naming the shapes)."""
    g_from = kv_heads_in(state, cfg)
    if g_from is None or g_from == cfg.kv_heads or g_from < cfg.kv_heads:
        return state
    return pool_kv_heads(state, cfg.with_(n_kv_head=g_from), cfg)
