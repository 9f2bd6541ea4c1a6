"""V-DProj: compress V (all heads merged) to `rank` dims; the cache stores the compressed V.

Per layer (METHODS.md section 5): `V_c = V W_down + b` (C -> rank), `V_r = V_c W_up + b` (rank -> C);
attention uses `V_r`, the cache keeps `V_c`. With `compress_k`, K is compressed the same way on its
non-rotary dims only (the rotary dims are rotated by position, so no fixed projection of them can be
folded into the query); the cache then keeps the rotary part of K and the compressed rest.

Decoding never restores cached tokens. Attention is linear in V and softmax rows sum to 1, so per head h
`P_h V_r[h] = (P_h V_c) W_up_h^T + b_h` (MLA-style "absorption"); for K,
`q_pass_h . (k_c W_kup_h^T + b_h) = (q_pass_h W_kup_h) . k_c + q_pass_h . b_h`, and the last term is
the same for every key of a query, so it cancels in the softmax and is dropped.

Grouped K/V heads (GQA, `n_kv_head` = g < n_head): V has g heads, so V_c compresses V's g x head_size values
(a `rank` given as a share is a share of that width) and is shared by every query head, as before; K keeps g
heads. Per token and layer the cache holds g x head_size + rank values (K, V_c) instead of n_head x head_size +
rank: grouping cuts only the K part (by n_head / g), since V_c was already shared. With `compress_k` the rotary K
part has g heads and K_c compresses g x (head_size - rotary_ndims) dims.

Aux losses (uncached forward with `aux`): "recon" gets `mean((V - V_r)^2)` per layer and, with `compress_k`,
also `mean((K_pass - K_pass_r)^2)` per layer (non-rotary K dims), so a stage trained on "recon" trains every
projection. "recon_k" repeats the K terms alone, for logging: do not weight it on top of "recon".
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kvcompress.models.caches import LayerCache, Step, cannot_serve, grouped_matmul, register_cache, sdpa
from kvcompress.models.config import ModelConfig
from kvcompress.models.gpt_neox import Attention, Aux, register_attention

__all__ = ["VDProjAttention", "VDProjCache", "projection_parameters"]


def as_width(value: int | float, full: int, setting: str = "vdproj width") -> int:
    """A width: an int is a width >= 1; a float is a share of `full` in (0, 1] (0.625 of 512 = 320; 1.0 = all of
    it). Anything else (a float > 1 or <= 0, a bool, a string) is refused, naming `setting`."""
    if isinstance(value, float):
        if not 0.0 < value <= 1.0:
            raise ValueError(
                f"{setting}={value}: a float is a share of the full width {full} in (0, 1] (1.0 = all {full}); "
                f"give an int for a width in [1, {full}]"
            )
        return max(1, round(value * full))
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{setting}={value!r}: give an int width in [1, {full}] or a float share in (0, 1]")
    return value


@register_attention("vdproj")
class VDProjAttention(Attention):
    """Standard attention whose values (and optionally non-rotary keys) pass through a low-rank bottleneck."""

    cache_layout: ClassVar[str] = "vdproj"
    native_cache: ClassVar[str] = "vdproj"
    example_kwargs: ClassVar[dict[str, Any]] = {"rank": 0.625}  # 320 of 512 at Pythia-70M

    def __init__(
        self,
        cfg: ModelConfig,
        layer_idx: int,
        rank: int | float = 320,
        compress_k: bool = False,
        k_rank: int | float | None = None,
    ) -> None:
        """`rank` / `k_rank`: an int is a width >= 1; a float is a share of the full width in (0, 1] (1.0 = all)."""
        super().__init__(cfg, layer_idx)
        C = self.n_kv_head * cfg.head_size  # V of all K/V heads (n_embd without grouped heads)
        rank = as_width(rank, C, "model.attention_kwargs.rank")
        k_width = self.n_kv_head * (cfg.head_size - cfg.rotary_ndims)
        k_rank = None if k_rank is None else as_width(k_rank, k_width, "model.attention_kwargs.k_rank")
        if not 1 <= rank <= C:
            label = f"n_embd={C}" if self.n_rep == 1 else f"n_kv_head x head_size={C}"
            raise ValueError(
                f"vdproj rank={rank} must be in [1, {label}] (V of all K/V heads: n_kv_head={self.n_kv_head} x "
                f"head_size={cfg.head_size})"
            )
        self.rank = rank
        self.rotary_ndims = cfg.rotary_ndims
        self.pass_size = cfg.head_size - cfg.rotary_ndims  # non-rotary dims per head
        self.v_compress = nn.Linear(C, rank)
        self.v_restore = nn.Linear(rank, C)
        self.compress_k = compress_k
        self.k_rank = k_rank
        if compress_k:
            width = self.n_kv_head * self.pass_size
            if k_rank is None:
                raise ValueError("vdproj compress_k=True needs k_rank (compressed width of the non-rotary K dims)")
            if not 1 <= k_rank <= width:
                raise ValueError(
                    f"vdproj k_rank={k_rank} must be in [1, {width}]: only the non-rotary K dims are compressed, "
                    f"n_kv_head={self.n_kv_head} x (head_size={cfg.head_size} - rotary_ndims={cfg.rotary_ndims})"
                )
            self.k_compress = nn.Linear(width, k_rank)
            self.k_restore = nn.Linear(k_rank, width)
        elif k_rank is not None:
            raise ValueError(f"vdproj k_rank={k_rank} given but compress_k=False; set compress_k=True or k_rank=None")

    # --- projections -----------------------------------------------------------------------------------
    def projections(self) -> list[nn.Linear]:
        return [self.v_compress, self.v_restore] + ([self.k_compress, self.k_restore] if self.compress_k else [])

    @torch.no_grad()
    def set_identity(self) -> None:
        """Make every projection the identity with zero bias (needs rank == V width, k_rank == non-rotary width)."""
        width = self.n_kv_head * self.head_size
        if self.rank != width:
            label = f"n_embd={width}" if self.n_rep == 1 else f"n_kv_head * head_size = {width}"
            raise ValueError(f"set_identity needs rank == {label}, got rank={self.rank}")
        if self.compress_k and self.k_rank != self.n_kv_head * self.pass_size:
            raise ValueError(
                f"set_identity needs k_rank == n_kv_head * non-rotary dims = {self.n_kv_head * self.pass_size}, "
                f"got k_rank={self.k_rank}"
            )
        for lin in self.projections():
            lin.weight.copy_(torch.eye(lin.out_features, lin.in_features))
            lin.bias.zero_()

    def merge_kv(self, v: Tensor) -> Tensor:
        """(B, g, T, hs) -> (B, T, g * hs): the K/V heads side by side."""
        B, g, T, hs = v.shape
        return v.transpose(1, 2).reshape(B, T, g * hs)

    def compress_v(self, v: Tensor) -> Tensor:
        """(B, g, T, hs) -> V_c (B, T, rank)."""
        return self.v_compress(self.merge_kv(v))

    def restore_v(self, v_c: Tensor) -> Tensor:
        """V_c (B, T, rank) -> V_r (B, g, T, hs)."""
        B, T, _ = v_c.shape
        return self.v_restore(v_c).view(B, T, self.n_kv_head, self.head_size).transpose(1, 2)

    def k_pass_merged(self, k: Tensor) -> Tensor:
        """Non-rotary dims of all K heads, (B, g, T, hs) -> (B, T, g * pass_size)."""
        B, nh, T, _ = k.shape
        return k[..., self.rotary_ndims :].transpose(1, 2).reshape(B, T, nh * self.pass_size)

    def compress_k_pass(self, k: Tensor) -> Tensor:
        """(B, nh, T, hs) -> k_c (B, T, k_rank)."""
        return self.k_compress(self.k_pass_merged(k))

    def restore_k(self, k_rot: Tensor, k_c: Tensor) -> Tensor:
        """Rotary part (B, g, T, rd) + k_c (B, T, k_rank) -> K (B, g, T, hs)."""
        B, T, _ = k_c.shape
        k_pass = self.k_restore(k_c).view(B, T, self.n_kv_head, self.pass_size).transpose(1, 2)  # (B, g, T, ps)
        return torch.cat((k_rot, k_pass), dim=-1)

    # --- attention -------------------------------------------------------------------------------------
    def attend(self, q: Tensor, k: Tensor, v: Tensor, aux: Aux | None = None) -> Tensor:
        """Uncached: attention over restored V (and K); adds reconstruction losses to `aux`."""
        v_m = self.merge_kv(v)  # (B, T, g * hs)
        v_r = self.v_restore(self.v_compress(v_m))  # (B, T, g * hs)
        if aux is not None:
            aux.setdefault("recon", []).append(F.mse_loss(v_r, v_m))  # mean((V - V_r)^2), V not detached
        if self.compress_k:
            k_p = self.k_pass_merged(k)  # (B, T, nh * ps)
            k_pr = self.k_restore(self.k_compress(k_p))  # (B, T, nh * ps)
            if aux is not None:
                loss_k = F.mse_loss(k_pr, k_p)
                aux.setdefault("recon", []).append(loss_k)
                aux.setdefault("recon_k", []).append(loss_k)
            B, T, _ = k_pr.shape
            k_pr = k_pr.view(B, T, self.n_kv_head, self.pass_size).transpose(1, 2)  # (B, g, T, ps)
            k = torch.cat((k[..., : self.rotary_ndims], k_pr), dim=-1)
        B, T, _ = v_r.shape
        v = v_r.view(B, T, self.n_kv_head, self.head_size).transpose(1, 2)  # (B, g, T, hs)
        return sdpa(q, k, v, is_causal=True)

    def decode(self, q: Tensor, k: Tensor, v: Tensor, cache: LayerCache, step: Step) -> Tensor:
        """Store [K, V_c] (or [K_rot, K_c, V_c]) of the new tokens and attend over the cache.

        Chunks longer than `cache.restore_above` tokens (prefill) restore the cached prefix and use SDPA,
        which is cheaper once T > head_size; shorter chunks (decoding) use the absorbed form and restore
        nothing.
        """
        if not isinstance(cache, VDProjCache):
            raise cannot_serve(getattr(cache, "name", type(cache).__name__), self.name, self.cache_layout)
        cache.put("v_c", self.compress_v(v), step)  # the cache gets V_c, never V
        if self.compress_k:
            cache.put("k_rot", k[..., : self.rotary_ndims], step)
            cache.put("k_c", self.compress_k_pass(k), step)
        else:
            cache.put("k", k, step)
        if q.shape[-2] > cache.restore_above:
            return self._attend_restored(q, cache, step)
        return self._attend_absorbed(q, cache, step)

    def _keys(self, cache: VDProjCache, step: Step) -> Tensor:
        if self.compress_k:
            return self.restore_k(cache.get("k_rot", step), cache.get("k_c", step))
        return cache.get("k", step)

    def _attend_restored(self, q: Tensor, cache: VDProjCache, step: Step) -> Tensor:
        v = self.restore_v(cache.get("v_c", step))  # (B, g, L, hs)
        return sdpa(q, self._keys(cache, step), v, attn_mask=step.mask)

    def _attend_absorbed(self, q: Tensor, cache: VDProjCache, step: Step) -> Tensor:
        """Scores and outputs without restoring the cache. Grouped heads: the n_rep query heads of a K/V head are
        rows of one product with that head's restore weights (the same products as n_head heads when n_rep == 1)."""
        B, nh, T, hs = q.shape
        g, rep = self.n_kv_head, self.n_rep
        q = q * hs**-0.5
        if self.compress_k:
            rd, ps, kr = self.rotary_ndims, self.pass_size, self.k_rank
            assert kr is not None  # compress_k validated it
            w_k = self.k_restore.weight.view(g, ps, kr)  # rows of K/V head j: (g, ps, kr)
            q_pass = q[..., rd:].reshape(B, g, rep * T, ps).transpose(0, 1).reshape(g, B * rep * T, ps)
            q_abs = torch.bmm(q_pass, w_k).view(g, B, rep * T, kr).transpose(0, 1)  # (B, g, rep*T, kr)
            k_c = cache.get("k_c", step)  # (B, L, kr)
            L = k_c.shape[1]
            scores = torch.bmm(q_abs.reshape(B, nh * T, kr), k_c.transpose(1, 2)).view(B, nh, T, L)
            if rd:
                scores = scores + grouped_matmul(q[..., :rd], cache.get("k_rot", step).transpose(-1, -2))
        else:
            scores = grouped_matmul(q, cache.get("k", step).transpose(-1, -2))  # (B, nh, T, L)
            L = scores.shape[-1]
        scores = scores.masked_fill(~step.mask, float("-inf"))
        if scores.dtype in (torch.float32, torch.float64):
            p = scores.softmax(dim=-1)
        else:
            p = scores.float().softmax(dim=-1).to(scores.dtype)
        # V_c is shared by the heads: one (nh*T, L) @ (L, rank) product per sequence, no per-head copy.
        r = self.rank
        pv = torch.bmm(p.reshape(B, nh * T, L), cache.get("v_c", step))  # (B, nh*T, r)
        pv = pv.view(B, g, rep * T, r).transpose(0, 1).reshape(g, B * rep * T, r)  # a view when T == 1, rep == 1
        w_v = self.v_restore.weight.view(g, hs, r).transpose(1, 2)  # rows of K/V head j, transposed: (g, r, hs)
        a = torch.baddbmm(self.v_restore.bias.view(g, 1, hs), pv, w_v)  # (g, B*rep*T, hs)
        return a.view(g, B, rep * T, hs).transpose(0, 1).reshape(B, nh, T, hs)  # (B, nh, T, hs)


@register_cache("vdproj", layouts=("vdproj",))
class VDProjCache(LayerCache):
    """Keys (B, n_kv_head, max_len, hs) and compressed values V_c (B, max_len, rank).

    With `compress_k`: rotary keys (B, n_kv_head, max_len, rd) and compressed non-rotary keys (B, max_len, k_rank).
    A buffer holder: `VDProjAttention.decode` stores and loads its tensors by name (`put`, `get`; the absorbed
    weights are the attention's), so a subclass may store them otherwise (methods/palu.py: V_c and K_c quantized).
    """

    def __init__(
        self,
        batch_size: int,
        max_len: int,
        n_head: int,
        head_size: int,
        rank: int,
        rotary_ndims: int,
        k_rank: int | None = None,
        device=None,
        dtype=None,
        restore_above: int | None = None,
    ) -> None:
        super().__init__(batch_size, max_len)
        self.restore_above = head_size if restore_above is None else restore_above
        B, kw = batch_size, dict(device=device, dtype=dtype)
        if k_rank is not None:
            self.buffers["k_rot"] = torch.zeros(B, n_head, max_len, rotary_ndims, **kw)
            self.buffers["k_c"] = torch.zeros(B, max_len, k_rank, **kw)
        else:
            self.buffers["k"] = torch.zeros(B, n_head, max_len, head_size, **kw)
        self.buffers["v_c"] = torch.zeros(B, max_len, rank, **kw)

    def put(self, name: str, x: Tensor, step: Step) -> None:
        """Store the new tokens' `name` tensor (`v_c`, `k_c`, `k_rot` or `k`) at the step's slots."""
        self.write(name, x, step)

    def get(self, name: str, step: Step) -> Tensor:
        """The stored `name` tensor of the slots the step reads, in the dtype it was given."""
        return self.read(name, step)

    @classmethod
    def build(cls, attn: Any, batch_size: int, max_len: int, device=None, dtype=None, **kwargs: Any) -> VDProjCache:
        k_rank = attn.k_rank if attn.compress_k else None
        shapes = (attn.n_kv_head, attn.head_size, attn.rank, attn.rotary_ndims, k_rank)
        return cls(batch_size, max_len, *shapes, device=device, dtype=dtype, **kwargs)


def projection_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of every V-DProj projection in `model` (what phase 1 trains and phase 2 freezes)."""
    return [
        p
        for m in model.modules()
        if isinstance(m, VDProjAttention)
        for lin in m.projections()
        for p in lin.parameters()
    ]
