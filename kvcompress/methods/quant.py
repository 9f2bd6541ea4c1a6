"""Quantized KV caches: `int8` (per token and head) and `int4` (KIVI: K per channel, V per token).

Both dequantize inside the attention of a decoding query, never into a full-precision copy of the cache:
the scores are `sum_d q[d] * (code[j, d] * scale + zero)` and the output `sum_j p[j] * (code[j, d] * scale
+ zero)`, written as elementwise products and sums so that `torch.compile` fuses the int -> float
conversion into one pass over the codes. Prefill (eager, many tokens) dequantizes what it reads.

Eager decoding (`generate` without `compile=True`) would run those products op by op, materialising float
copies of the whole cache every step (int8 6.4x slower than KV at batch 8 x 2,000 tokens on a 2-core CPU). So
the decode read of a large cache is a fused kernel: the same function, `torch.compile`d on its own (once per
process and shape; a few seconds), called from the eager step; inside a compiled step it is traced as part of
the whole graph. `fused_read`: None (default) fuses when the cache holds >= 2**20 values per tensor, True / False
force it.

int4 follows KIVI (Liu et al. 2024, "KIVI: a tuning-free asymmetric 2bit quantization for KV cache"): keys
are quantized per channel over groups of `group_size` tokens, values per token over groups of
`group_size` channels, both asymmetric (scale and zero point per group), and the `window` most recent
tokens stay in full precision. Codes are packed two to a byte (channel d and d + hs/2). The bytes count
codes, scales, zero points and the window.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from kvcompress.models.caches import LayerCache, Step, register_cache, sdpa

__all__ = ["Int4KVCache", "Int8KVCache", "fused"]

FUSED_FROM = 2**20  # values per cache tensor from which the decode read is a fused (compiled) kernel


def _softmax(scores: Tensor) -> Tensor:
    if scores.dtype in (torch.float32, torch.float64):
        return scores.softmax(dim=-1)
    return scores.float().softmax(dim=-1).to(scores.dtype)


def fused(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """`fn` compiled on its own at its first eager call (a fused kernel over the codes); inside a compiled graph
    (the compiled decode step) it is traced as plain code."""
    compiled: Callable[..., Tensor] | None = None

    def call(*args: Any) -> Tensor:
        nonlocal compiled
        if torch.compiler.is_compiling():
            return fn(*args)
        if compiled is None:
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            compiled = torch.compile(fn, fullgraph=True, dynamic=False)
        return compiled(*args)

    return call


def use_fused(setting: bool | None, values: int) -> bool:
    """The `fused_read` setting: None fuses a cache of >= FUSED_FROM values per tensor."""
    return values >= FUSED_FROM if setting is None else bool(setting)


def _int8_decode(q: Tensor, kq: Tensor, ks: Tensor, vq: Tensor, vs: Tensor, mask: Tensor) -> Tensor:
    """One query per row over int8 codes: K scales fold into the scores, V scales into the probabilities."""
    B, nh, _, hs = q.shape
    g = kq.shape[1]
    if g != nh:  # grouped K/V heads: the group's query heads as rows of one product
        qg = q.reshape(B, g, nh // g, hs)
        scores_g = (qg @ kq.to(q.dtype).mT) * ks.mT * hs**-0.5  # (B, g, r, L)
        pv_g = _softmax(scores_g.masked_fill(~mask, float("-inf"))) * vs.mT  # (B, g, r, L)
        return (pv_g @ vq.to(q.dtype)).view(B, nh, 1, hs)
    scores = (q * kq.to(q.dtype)).sum(-1, keepdim=True) * ks * hs**-0.5  # (B, nh, L, 1)
    scores = scores.mT.masked_fill(~mask, float("-inf"))  # (B, nh, 1, L)
    pv = _softmax(scores).mT * vs  # (B, nh, L, 1)
    return (pv * vq.to(q.dtype)).sum(-2, keepdim=True)  # (B, nh, 1, hs)


_int8_decode_fused = fused(_int8_decode)


@register_cache("int8", layouts=("kv",))
class Int8KVCache(LayerCache):
    """K and V quantized to int8 per (token, K/V head), with absmax scales kept in the model's dtype.

    Per token, head and layer it holds `2 * (head_size + scale bytes)` bytes instead of
    `2 * head_size * element_size`. Lossy: new tokens also attend over their own dequantized K/V,
    so prefilling in chunks gives the same result as prefilling at once.
    """

    fillable: ClassVar[bool] = True

    def __init__(
        self,
        batch_size: int,
        max_len: int,
        n_head: int,
        head_size: int,
        device=None,
        dtype=None,
        fused_read: bool | None = None,
    ) -> None:
        super().__init__(batch_size, max_len)
        values, scales = (batch_size, n_head, max_len, head_size), (batch_size, n_head, max_len, 1)
        self.dtype = dtype or torch.get_default_dtype()
        self.buffers = {
            "k": torch.zeros(values, device=device, dtype=torch.int8),
            "v": torch.zeros(values, device=device, dtype=torch.int8),
            "k_scale": torch.zeros(scales, device=device, dtype=self.dtype),
            "v_scale": torch.zeros(scales, device=device, dtype=self.dtype),
        }
        self.fused_read = use_fused(fused_read, batch_size * n_head * max_len * head_size)

    @staticmethod
    def quantize(x: Tensor) -> tuple[Tensor, Tensor]:
        scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) / 127.0
        return torch.round(x / scale).clamp(-127, 127).to(torch.int8), scale

    def append(self, k: Tensor, v: Tensor, step: Step) -> None:
        for name, x in (("k", k), ("v", v)):
            quantized, scale = self.quantize(x)
            self.write(name, quantized, step)
            self.write(f"{name}_scale", scale, step)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, step: Step) -> Tensor:
        self.append(k, v, step)
        kq, ks = self.read("k", step), self.read("k_scale", step).to(q.dtype)  # (B, nh, L, hs), (B, nh, L, 1)
        vq, vs = self.read("v", step), self.read("v_scale", step).to(q.dtype)
        if q.shape[-2] > 1:  # prefill: dequantize what is read
            return sdpa(q, kq.to(q.dtype) * ks, vq.to(q.dtype) * vs, attn_mask=step.mask)
        read = _int8_decode_fused if self.fused_read else _int8_decode
        return read(q, kq, ks, vq, vs, step.mask)


def _pack(codes: Tensor) -> Tensor:
    """uint8 codes in [0, 15] (..., hs) -> (..., hs / 2): channel d in the low nibble, d + hs/2 in the high."""
    lo, hi = codes.chunk(2, dim=-1)
    return lo | (hi << 4)


def _unpack(packed: Tensor) -> Tensor:
    return torch.cat((packed & 15, packed >> 4), dim=-1)


def _quantize4(x: Tensor, dim: int, valid: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric 4-bit codes of x with one (scale, zero) per slice along `dim` (min/max over `valid`)."""
    lo_src = x if valid is None else x.masked_fill(~valid, float("inf"))
    hi_src = x if valid is None else x.masked_fill(~valid, float("-inf"))
    lo = lo_src.amin(dim=dim, keepdim=True)
    hi = hi_src.amax(dim=dim, keepdim=True)
    if valid is not None:  # a group with no valid entry yet: any finite scale
        lo, hi = torch.where(torch.isfinite(lo), lo, 0.0), torch.where(torch.isfinite(hi), hi, 0.0)
    scale = ((hi - lo) / 15.0).clamp_min(1e-8)
    codes = torch.round((x - lo) / scale).clamp(0, 15).to(torch.uint8)
    return codes, scale, lo


def _int4_decode(
    q: Tensor,
    slot: Tensor,
    mask: Tensor,
    k: Tensor,
    k_scale: Tensor,
    k_zero: Tensor,
    v: Tensor,
    v_scale: Tensor,
    v_zero: Tensor,
    k_win: Tensor,
    v_win: Tensor,
    G: int,
    Gv: int,
    R: int,
) -> Tensor:
    """One int4 query per row over the codes (older than the window) and the full-precision window.

    Scales fold into the small operands (q * K scale per group and channel; p * V scale per token and group),
    zero points into one sum per group, so the only full-length reads are the packed codes.
    """
    L = mask.shape[-1]
    B, nh, _, hs = q.shape
    h2, ng, dtype, scale = hs // 2, k_scale.shape[2], q.dtype, hs**-0.5
    cols = torch.arange(L, device=q.device)
    old = mask & (cols <= slot - R)  # (B, 1, 1, L): the codes, for tokens out of the window
    qg = q.view(B, nh, 1, hs)
    qs = (qg * k_scale.to(dtype)).unsqueeze(-2)  # (B, nh, ng, 1, hs)
    qz = (qg * k_zero.to(dtype)).sum(-1, keepdim=True)  # (B, nh, ng, 1)
    packed = k.view(B, nh, ng, G, h2)
    s_old = (qs[..., :h2] * (packed & 15).to(dtype)).sum(-1) + (qs[..., h2:] * (packed >> 4).to(dtype)).sum(-1)
    s_old = ((s_old + qz).view(B, nh, ng * G)[..., :L] * scale).unsqueeze(-2)  # (B, nh, 1, L)
    s_old = s_old.masked_fill(~old, float("-inf"))
    ring = torch.arange(R, device=q.device)
    pos = slot - torch.remainder(slot - ring, R)  # position held by each window entry (R,)
    recent = mask[..., pos.clamp_min(0)] & (pos >= 0)  # (B, 1, 1, R): filled, not padding
    s_win = (q @ k_win.to(dtype).mT) * scale  # (B, nh, 1, R)
    s_win = s_win.masked_fill(~recent, float("-inf"))
    p = _softmax(torch.cat((s_old, s_win), dim=-1))
    p_old, p_win = p[..., :L].mT, p[..., L:]  # (B, nh, L, 1), (B, nh, 1, R)
    ps = (p_old * v_scale[:, :, :L].to(dtype)).repeat_interleave(Gv, dim=-1)  # (B, nh, L, hs)
    pz = (p_old * v_zero[:, :, :L].to(dtype)).sum(-2, keepdim=True)  # (B, nh, 1, hs/Gv)
    codes = v[:, :, :L]
    out_lo = (ps[..., :h2] * (codes & 15).to(dtype)).sum(-2, keepdim=True)
    out_hi = (ps[..., h2:] * (codes >> 4).to(dtype)).sum(-2, keepdim=True)
    out = torch.cat((out_lo, out_hi), dim=-1) + pz.repeat_interleave(Gv, dim=-1)  # (B, nh, 1, hs)
    return out + p_win @ v_win.to(dtype)


_int4_decode_fused = fused(_int4_decode)


@register_cache("int4", layouts=("kv",))
class Int4KVCache(LayerCache):
    """KIVI-style 4-bit cache (per K/V head): K per channel (groups of `group_size` tokens), V per token (groups of
    `group_size` channels), the last `window` tokens in full precision (a ring buffer).

    Buffers: `k`, `v` packed codes (B, nh, L, hs/2) uint8; `k_scale`, `k_zero` (B, nh, L/G, hs);
    `v_scale`, `v_zero` (B, nh, L, hs/G) in the model's dtype; `k_win`, `v_win` (B, nh, window, hs).
    A token older than the window is read from its codes, so the window must hold a whole group
    (`window >= group_size`): a group is final before its first token leaves the window. The default window is
    that minimum (32 tokens), so that the library's 128-token contexts are quantized (KIVI's 128 would hold
    every token of them: no reduction, the same PPL as `kv`).
    """

    def __init__(
        self,
        batch_size: int,
        max_len: int,
        n_head: int,
        head_size: int,
        device=None,
        dtype=None,
        group_size: int = 32,
        window: int = 32,
        fused_read: bool | None = None,
    ) -> None:
        super().__init__(batch_size, max_len)
        if head_size % 2:
            raise ValueError(f"int4 packs two channels a byte: head_size={head_size} must be even")
        if group_size < 1 or head_size % min(group_size, head_size):
            raise ValueError(f"int4 group_size={group_size} must divide head_size={head_size} (or exceed it)")
        if window < group_size:
            raise ValueError(f"int4 window={window} must be >= group_size={group_size} (a group waits in it)")
        self.group_size, self.window = group_size, window
        self.v_group = min(group_size, head_size)
        self.dtype = dtype or torch.get_default_dtype()
        B, nh, hs, G = batch_size, n_head, head_size, group_size
        n_groups = math.ceil(max_len / G)
        kw = dict(device=device, dtype=self.dtype)
        self.buffers = {
            "k": torch.zeros(B, nh, n_groups * G, hs // 2, device=device, dtype=torch.uint8),
            "k_scale": torch.zeros(B, nh, n_groups, hs, **kw),
            "k_zero": torch.zeros(B, nh, n_groups, hs, **kw),
            "v": torch.zeros(B, nh, max_len, hs // 2, device=device, dtype=torch.uint8),
            "v_scale": torch.zeros(B, nh, max_len, hs // self.v_group, **kw),
            "v_zero": torch.zeros(B, nh, max_len, hs // self.v_group, **kw),
            "k_win": torch.zeros(B, nh, window, hs, **kw),
            "v_win": torch.zeros(B, nh, window, hs, **kw),
        }
        self.fused_read = use_fused(fused_read, B * nh * max_len * hs)

    def equals(self) -> str | None:
        return "kv" if self.window >= self.max_len else None  # every token stays in full precision

    # --- writes ------------------------------------------------------------------------------------------
    def _write_v(self, v: Tensor, step: Step) -> None:
        B, nh, T, hs = v.shape
        codes, scale, zero = _quantize4(v.reshape(B, nh, T, hs // self.v_group, self.v_group), dim=-1)
        self.write("v", _pack(codes.reshape(B, nh, T, hs)), step)
        self.write("v_scale", scale[..., 0], step)
        self.write("v_zero", zero[..., 0], step)

    def _write_k_groups(self, src: Tensor, first_slot: Tensor, valid: Tensor) -> None:
        """Quantize whole groups: src (B, nh, n*G, hs) starting at slot `first_slot` (a group start)."""
        B, nh, n, hs = src.shape
        G = self.group_size
        codes, scale, zero = _quantize4(src.view(B, nh, n // G, G, hs), dim=-2, valid=valid.view(n // G, G, 1))
        slots = first_slot + torch.arange(n, device=src.device)
        self.buffers["k"].index_copy_(2, slots, _pack(codes.view(B, nh, n, hs)))
        groups = first_slot // G + torch.arange(n // G, device=src.device)
        self.buffers["k_scale"].index_copy_(2, groups, scale[..., 0, :].to(self.dtype))
        self.buffers["k_zero"].index_copy_(2, groups, zero[..., 0, :].to(self.dtype))

    def _write_window(self, k: Tensor, v: Tensor, step: Step) -> None:
        n = min(k.shape[-2], self.window)
        ring = step.slots[-n:] % self.window
        self.buffers["k_win"].index_copy_(2, ring, k[:, :, -n:].to(self.dtype))
        self.buffers["v_win"].index_copy_(2, ring, v[:, :, -n:].to(self.dtype))

    def _write_decode(self, k: Tensor, v: Tensor, step: Step) -> None:
        """One token (static shapes): into the window, then re-quantize its group from the window."""
        G = self.group_size
        self._write_window(k, v, step)
        self._write_v(v, step)
        first = (step.slots // G) * G  # (1,)
        members = first + torch.arange(G, device=k.device)  # (G,)
        src = self.buffers["k_win"].index_select(2, members % self.window)  # (B, nh, G, hs)
        self._write_k_groups(src, first, members <= step.slots)

    def _write_prefill(self, k: Tensor, v: Tensor, step: Step) -> None:
        """T tokens from slot `start` (eager): the groups they touch, completed from the window."""
        G, T = self.group_size, k.shape[-2]
        assert step.n_read is not None  # eager: the first n_read slots
        start = step.n_read - T
        first = start - start % G
        head = self.buffers["k_win"].index_select(2, torch.arange(first, start, device=k.device) % self.window)
        n = math.ceil((start + T - first) / G) * G
        src = torch.cat((head, k.to(self.dtype)), dim=-2)
        src = F.pad(src, (0, 0, 0, n - src.shape[-2]))
        valid = torch.arange(n, device=k.device) < start + T - first
        self._write_k_groups(src, torch.tensor([first], device=k.device), valid)
        self._write_v(v, step)
        self._write_window(k, v, step)

    # --- reads -------------------------------------------------------------------------------------------
    def _dequantized(self, n: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """K and V of the first n slots from their codes (B, nh, n, hs)."""
        G, Gv = self.group_size, self.v_group
        k = _unpack(self.buffers["k"][:, :, :n]).to(dtype)
        k = k * self.buffers["k_scale"].repeat_interleave(G, dim=2)[:, :, :n].to(dtype)
        k = k + self.buffers["k_zero"].repeat_interleave(G, dim=2)[:, :, :n].to(dtype)
        v = _unpack(self.buffers["v"][:, :, :n]).to(dtype)
        v = v * self.buffers["v_scale"][:, :, :n].repeat_interleave(Gv, dim=-1).to(dtype)
        v = v + self.buffers["v_zero"][:, :, :n].repeat_interleave(Gv, dim=-1).to(dtype)
        return k, v

    def _attend_prefill(self, q: Tensor, k: Tensor, v: Tensor, step: Step) -> Tensor:
        """New tokens see the past as a decoding query would at `start` (codes, the window in full
        precision) and each other in full precision."""
        T = q.shape[-2]
        assert step.n_read is not None  # eager: the first n_read slots
        start = step.n_read - T
        k_past, v_past = self._dequantized(start, q.dtype)
        recent = torch.arange(max(start - self.window, 0), start, device=q.device)
        if recent.numel():
            k_past[:, :, recent] = self.buffers["k_win"][:, :, recent % self.window].to(q.dtype)
            v_past[:, :, recent] = self.buffers["v_win"][:, :, recent % self.window].to(q.dtype)
        keys, values = torch.cat((k_past, k), dim=-2), torch.cat((v_past, v), dim=-2)
        return sdpa(q, keys, values, attn_mask=step.mask)

    def _attend_decode(self, q: Tensor, step: Step) -> Tensor:
        """One query per row over the codes (older than the window) and the window (`_int4_decode`); with grouped
        K/V heads, each of a group's query heads in turn (a static loop)."""
        b = self.buffers
        read = _int4_decode_fused if self.fused_read else _int4_decode
        args: tuple[Any, ...] = (step.slots, step.mask, b["k"], b["k_scale"], b["k_zero"], b["v"], b["v_scale"])
        args += (b["v_zero"], b["k_win"], b["v_win"], self.group_size, self.v_group, self.window)
        B, nh, _, hs = q.shape
        g = b["v"].shape[1]
        if g == nh:
            return read(q, *args)
        per_head = q.view(B, g, nh // g, hs)
        outs = [read(per_head[:, :, i, None].contiguous(), *args) for i in range(nh // g)]  # each (B, g, 1, hs)
        return torch.cat(outs, dim=2).view(B, nh, 1, hs)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, step: Step) -> Tensor:
        if q.shape[-2] > 1:
            out = self._attend_prefill(q, k, v, step)
            self._write_prefill(k, v, step)
            return out
        self._write_decode(k, v, step)
        return self._attend_decode(q, step)
