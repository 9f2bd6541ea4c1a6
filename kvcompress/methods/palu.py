"""Low-rank x quantized caches for V-DProj (Palu: Chang et al. 2024, "Palu: Compressing KV-Cache with Low-Rank
Projection", arXiv:2407.21118; seed 004's next step): `vdproj_int8` and `vdproj_int4`.

V-DProj already stores V (and, with `compress_k`, the non-rotary K dims) as a low-rank latent `V_c` (`K_c`); these
kinds store the latents quantized, per token (one token's latent is one vector across all heads):
- `vdproj_int8`: symmetric absmax int8 codes with one scale per token (the model's dtype);
- `vdproj_int4`: asymmetric 4-bit codes over groups of latent channels (the width split into the fewest equal groups
  of at most `group_size`, e.g. 40 -> 2 x 20; a scale and a zero point per token and group, the model's dtype), two
  codes a byte (channel d with d + width/2).
The keys the cache keeps in full (`k`, or the rotary `k_rot`) stay in the model's dtype: rope makes them position
dependent, and Palu too leaves them unquantized. Each token is quantized on `put` and dequantized on `get`
(`VDProjCache`'s two hooks), so the attention never knows which kind it has; new tokens attend over their own
dequantized latents, so prefilling in chunks equals prefilling at once. Choices Palu leaves open, as taken here:
no Hadamard transform before quantizing (Palu's, for outliers), no low-rank-aware fine-tuning (the V-DProj
projections are trained in full precision), and the latents are dequantized into a full-precision temporary on
read (a fused dequantize-matmul kernel is Palu's, not this library's); for int4 that dequantization is one fused
(compiled) kernel in eager decoding of a large cache (`fused_read`, as `int4`), not six full-size temporaries.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from kvcompress.methods.quant import Int8KVCache, _pack, _quantize4, _unpack, fused, use_fused
from kvcompress.methods.vdproj import VDProjCache
from kvcompress.models.caches import Step, register_cache

__all__ = ["VDProjInt4Cache", "VDProjInt8Cache"]

LATENTS = ("v_c", "k_c")  # what is quantized; `k` and `k_rot` stay in the model's dtype


@register_cache("vdproj_int8", layouts=("vdproj",))
class VDProjInt8Cache(VDProjCache):
    """V-DProj's cache with `v_c` (and `k_c`) as int8 codes (B, L, width) plus one scale per token (B, L, 1)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for name in LATENTS:
            if name in self.buffers:
                latent = self.buffers[name]
                self.dtype = latent.dtype
                B, L, width = latent.shape
                self.buffers[name] = torch.zeros(B, L, width, device=latent.device, dtype=torch.int8)
                self.buffers[f"{name}_scale"] = torch.zeros(B, L, 1, device=latent.device, dtype=latent.dtype)

    def put(self, name: str, x: Tensor, step: Step) -> None:
        if name not in LATENTS:
            return super().put(name, x, step)
        codes, scale = Int8KVCache.quantize(x)
        self.write(name, codes, step)
        self.write(f"{name}_scale", scale, step)

    def get(self, name: str, step: Step) -> Tensor:
        if name not in LATENTS:
            return super().get(name, step)
        return self.read(name, step).to(self.dtype) * self.read(f"{name}_scale", step)


def _dequantize4(packed: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """Latents (B, L, width) from packed codes (B, L, width/2) and a scale and zero point per token and group
    (B, L, groups), the groups being consecutive channels."""
    B, L, half = packed.shape
    groups = scale.shape[-1]
    codes = _unpack(packed).to(scale.dtype).view(B, L, groups, 2 * half // groups)
    return (codes * scale.unsqueeze(-1) + zero.unsqueeze(-1)).view(B, L, 2 * half)


_fused_dequantize4 = fused(_dequantize4)


@register_cache("vdproj_int4", layouts=("vdproj",))
class VDProjInt4Cache(VDProjCache):
    """V-DProj's cache with `v_c` (and `k_c`) as packed 4-bit codes (B, L, width/2) uint8, with a scale and a zero
    point per token and group (B, L, width/group) each: the fewest equal groups of at most `group_size` channels."""

    def __init__(self, *args: Any, group_size: int = 32, fused_read: bool | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"vdproj_int4 group_size={group_size!r} must be an int >= 1")
        self.groups: dict[str, int] = {}
        for name in LATENTS:
            if name not in self.buffers:
                continue
            latent = self.buffers[name]
            self.dtype = latent.dtype
            B, L, width = latent.shape
            if width % 2:
                raise ValueError(f"vdproj_int4 packs two codes a byte: the {name} width {width} must be even")
            n_groups = math.ceil(width / group_size)  # the fewest equal groups of at most group_size channels
            while width % n_groups:
                n_groups += 1
            group = width // n_groups
            self.groups[name] = group
            self.buffers[name] = torch.zeros(B, L, width // 2, device=latent.device, dtype=torch.uint8)
            for part in ("scale", "zero"):
                self.buffers[f"{name}_{part}"] = torch.zeros(
                    B, L, width // group, device=latent.device, dtype=self.dtype
                )
        latents = [self.buffers[name] for name in LATENTS if name in self.buffers]
        self.fused_read = use_fused(fused_read, max((2 * x.numel() for x in latents), default=0))

    def put(self, name: str, x: Tensor, step: Step) -> None:
        if name not in LATENTS:
            return super().put(name, x, step)
        B, T, width = x.shape
        group = self.groups[name]
        codes, scale, zero = _quantize4(x.reshape(B, T, width // group, group), dim=-1)
        self.write(name, _pack(codes.reshape(B, T, width)), step)
        self.write(f"{name}_scale", scale[..., 0], step)
        self.write(f"{name}_zero", zero[..., 0], step)

    def get(self, name: str, step: Step) -> Tensor:
        if name not in LATENTS:
            return super().get(name, step)
        dequantize = _fused_dequantize4 if self.fused_read else _dequantize4
        return dequantize(self.read(name, step), self.read(f"{name}_scale", step), self.read(f"{name}_zero", step))
