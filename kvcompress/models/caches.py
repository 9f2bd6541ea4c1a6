"""Decode caches: one object per attention layer, holding preallocated fixed-shape buffers.

A cache owns how attention reads its past: `attend(q, k, v)` stores what the new tokens leave
behind and returns their attention outputs. Every cache reports its exact size, summed from the
tensors it holds (`nbytes`). Buffers never change shape while decoding, so a decode step can later
be captured in a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor


def causal_mask(n_new: int, n_total: int, device: torch.device) -> Tensor:
    """Boolean (n_new, n_total) mask: new token i (at position n_total - n_new + i) sees j <= its position."""
    rows = torch.arange(n_new, device=device)[:, None] + (n_total - n_new)
    return torch.arange(n_total, device=device)[None, :] <= rows


def attend_causal(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """SDPA where q holds the last q.shape[-2] positions of k/v."""
    n_new, n_total = q.shape[-2], k.shape[-2]
    if n_new == 1:
        return F.scaled_dot_product_attention(q, k, v)
    if n_new == n_total:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(n_new, n_total, q.device))


class LayerCache:
    """Base class: a fill length over preallocated buffers, sized `(batch_size, ..., max_len, ...)`.

    `fillable` caches take `append(k, v)` without attention (an early exit fills the layers it skipped).
    Any cache rolls back by setting `length` lower: what a position holds depends on no later position.
    """

    fillable: ClassVar[bool] = False

    def __init__(self, batch_size: int, max_len: int) -> None:
        self.batch_size = batch_size
        self.max_len = max_len
        self.length = 0
        self.buffers: dict[str, Tensor] = {}

    def nbytes(self) -> int:
        """Bytes held by this cache, measured from its tensors."""
        return sum(t.numel() * t.element_size() for t in self.buffers.values())

    def bytes_per_token(self) -> float:
        """Bytes per cached token (per sequence) for this layer."""
        return self.nbytes() / (self.batch_size * self.max_len)

    def reset(self) -> None:
        self.length = 0

    def _take(self, n_new: int) -> slice:
        if self.length + n_new > self.max_len:
            raise ValueError(f"cache overflow: {self.length} + {n_new} tokens > max_len={self.max_len}")
        span = slice(self.length, self.length + n_new)
        self.length += n_new
        return span

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Store the new tokens and return their attention outputs; q, k, v are (B, nh, T, hs)."""
        raise NotImplementedError


class KVCache(LayerCache):
    """The standard cache: keys and values, (B, nh, max_len, hs) each."""

    fillable: ClassVar[bool] = True

    def __init__(self, batch_size: int, max_len: int, n_head: int, head_size: int, device=None, dtype=None) -> None:
        super().__init__(batch_size, max_len)
        shape = (batch_size, n_head, max_len, head_size)
        self.buffers = {
            "k": torch.zeros(shape, device=device, dtype=dtype),
            "v": torch.zeros(shape, device=device, dtype=dtype),
        }

    def append(self, k: Tensor, v: Tensor) -> None:
        """Write keys/values of new tokens (also used to fill layers an early exit skipped)."""
        span = self._take(k.shape[-2])
        self.buffers["k"][:, :, span] = k
        self.buffers["v"][:, :, span] = v

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        self.append(k, v)
        keys = self.buffers["k"][:, :, : self.length]
        values = self.buffers["v"][:, :, : self.length]
        return attend_causal(q, keys, values)


class KACache(LayerCache):
    """The KA cache: keys and past attention outputs in place of values, (B, nh, max_len, hs) each.

    A new token attends over `[V'(A[0]), ..., V'(A[t-1]), V[t]]` where `V' = adapter` (identity when
    None). The adapter is applied once, when A[t] is made, and the cache keeps `V'(A[t])`: the same
    bytes as keeping A[t], and the past never has to be re-adapted at each step.
    """

    def __init__(
        self,
        batch_size: int,
        max_len: int,
        n_head: int,
        head_size: int,
        adapter: Callable[[Tensor], Tensor] | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(batch_size, max_len)
        shape = (batch_size, n_head, max_len, head_size)
        self.adapter = adapter
        self.buffers = {
            "k": torch.zeros(shape, device=device, dtype=dtype),
            "a": torch.zeros(shape, device=device, dtype=dtype),
        }

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if q.shape[-2] > 1 and self.adapter is None:
            return self.attend_parallel(q, k, v)
        return self.attend_loop(q, k, v)  # decode (T == 1) or a nonlinear adapter

    def attend_loop(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Token by token: each output becomes a value for the tokens after it (one SDPA per token)."""
        outputs = []
        for t in range(q.shape[-2]):
            span = self._take(1)
            self.buffers["k"][:, :, span] = k[:, :, t : t + 1]
            self.buffers["a"][:, :, span] = v[:, :, t : t + 1]  # own V at the diagonal
            keys = self.buffers["k"][:, :, : self.length]
            values = self.buffers["a"][:, :, : self.length]
            a_t = F.scaled_dot_product_attention(q[:, :, t : t + 1], keys, values)
            self.buffers["a"][:, :, span] = a_t if self.adapter is None else self.adapter(a_t)
            outputs.append(a_t)
        return torch.cat(outputs, dim=-2)

    def attend_parallel(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Exact prefill of T new tokens at once (adapter=None only): one unit-lower-triangular solve.

        With P over [past, new] positions: (I - strict_lower(P_nn)) A_new = P_np A_past + diag(P_nn) V_new.
        Computed in fp32 for half dtypes (fp64 stays fp64).
        """
        if self.adapter is not None:
            raise ValueError("parallel KA prefill is exact only without an adapter (the adapter is nonlinear)")
        past, T = self.length, q.shape[-2]
        span = self._take(T)
        self.buffers["k"][:, :, span] = k
        ct = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        keys = self.buffers["k"][:, :, : self.length].to(ct)  # (B, nh, past + T, hs)
        scores = (q.to(ct) * q.shape[-1] ** -0.5) @ keys.mT  # (B, nh, T, past + T)
        p = scores.masked_fill_(~causal_mask(T, past + T, q.device), float("-inf")).softmax(dim=-1)
        p_new = p[..., past:]  # (B, nh, T, T), lower triangular
        rhs = p_new.diagonal(dim1=-2, dim2=-1).unsqueeze(-1) * v.to(ct)  # (B, nh, T, hs)
        if past:
            rhs = rhs + p[..., :past] @ self.buffers["a"][:, :, :past].to(ct)
        # Unit diagonal implied: only the strict lower part of -P_nn is read.
        a_new = torch.linalg.solve_triangular(-p_new, rhs, upper=False, unitriangular=True)
        self.buffers["a"][:, :, span] = a_new.to(self.buffers["a"].dtype)
        return a_new.to(q.dtype)


class Int8KVCache(LayerCache):
    """K and V quantized to int8 per (token, head), with absmax scales kept in the model's dtype.

    Per token, head and layer it holds `2 * (head_size + scale bytes)` bytes instead of
    `2 * head_size * element_size`. Lossy: new tokens also attend over their own dequantized K/V,
    so prefilling in chunks gives the same result as prefilling at once.
    """

    fillable: ClassVar[bool] = True

    def __init__(self, batch_size: int, max_len: int, n_head: int, head_size: int, device=None, dtype=None) -> None:
        super().__init__(batch_size, max_len)
        values, scales = (batch_size, n_head, max_len, head_size), (batch_size, n_head, max_len, 1)
        self.dtype = dtype or torch.get_default_dtype()
        self.buffers = {
            "k": torch.zeros(values, device=device, dtype=torch.int8),
            "v": torch.zeros(values, device=device, dtype=torch.int8),
            "k_scale": torch.zeros(scales, device=device, dtype=self.dtype),
            "v_scale": torch.zeros(scales, device=device, dtype=self.dtype),
        }

    @staticmethod
    def quantize(x: Tensor) -> tuple[Tensor, Tensor]:
        scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) / 127.0
        return torch.round(x / scale).clamp(-127, 127).to(torch.int8), scale

    def append(self, k: Tensor, v: Tensor) -> None:
        span = self._take(k.shape[-2])
        for name, x in (("k", k), ("v", v)):
            quantized, scale = self.quantize(x)
            self.buffers[name][:, :, span] = quantized
            self.buffers[f"{name}_scale"][:, :, span] = scale.to(self.dtype)

    def dequantized(self, name: str, dtype: torch.dtype) -> Tensor:
        n = self.length
        return self.buffers[name][:, :, :n].to(dtype) * self.buffers[f"{name}_scale"][:, :, :n].to(dtype)

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        self.append(k, v)
        return attend_causal(q, self.dequantized("k", q.dtype), self.dequantized("v", q.dtype))
