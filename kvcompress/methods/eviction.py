"""The shared machinery of the training-free eviction caches (`streaming_llm`, `h2o`, `snapkv`, `tova`, `knorm`).

Each keeps at most `budget` tokens per (batch row, head) in fixed buffers: `k`, `v` (B, nh, S, hs) in the model's
dtype and `pos` (B, nh, S) int32, the original position of the token a slot holds (-1: empty), plus whatever state
its rule needs (H2O's accumulated attention, Knorm's key norms, SnapKV's frozen boundary). All of it counts in
`nbytes`, so the bytes per token are measured, not estimated. Keys are cached after rope, so a kept token keeps
its original position; nothing is re-rotated.

A rule is one method, `keep_scores`: a score per candidate (higher is kept; +inf is never evicted). Empty slots
and padding score -inf, so they go first and padding never takes a slot. Equal scores go by age (the oldest is
evicted first), so a choice never depends on the order of slots or on how a tie is broken.
- Prefill (a chunk of T > 1 tokens): exact attention of the chunk over the kept slots and itself (the chunk's own
  outputs are exact), then the `S` best of the kept slots and the chunk stay (`topk`; eager, any shapes).
- Decoding (one token a row, static shapes, compiled): the query attends over the `S` slots and itself; then the
  lowest-scored of the `S + 1` candidates is dropped: an empty slot first, else the rule's victim, which may be
  the new token itself (it is then not written). The new token overwrites the victim's slot in place
  (`gather`/`scatter_` at a data-dependent index, never a data-dependent shape).

`budget`: a share of the context (a float in (0, 1]: `round(share x max_len)` slots, at least 1) or a number of
slots (an int >= 1; at most `max_len` are allocated). A budget >= the context evicts nothing and equals `kv`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kvcompress.models.caches import LayerCache, Step

__all__ = ["EvictionCache", "budget_slots", "recent", "share_or_count"]


def budget_slots(budget: Any, max_len: int) -> int:
    """Slots for a `budget`: a share of `max_len` (float in (0, 1]) or a count (int >= 1), at most `max_len`."""
    if isinstance(budget, float) and 0.0 < budget <= 1.0:
        return max(1, min(max_len, round(budget * max_len)))
    if isinstance(budget, int) and not isinstance(budget, bool) and budget >= 1:
        return min(budget, max_len)
    raise ValueError(f"budget={budget!r} must be a share of the context in (0, 1] or a number of slots >= 1")


def share_or_count(value: Any, whole: int, setting: str) -> int:
    """A part of `whole` slots: a share (float in [0, 1]) or a count (int >= 0), clipped to `whole`."""
    if isinstance(value, float) and 0.0 <= value <= 1.0:
        return min(whole, round(value * whole))
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return min(whole, value)
    raise ValueError(f"{setting}={value!r} must be a share of the budget in [0, 1] or a number of slots >= 0")


def _softmax(scores: Tensor) -> Tensor:
    """Softmax in float32 at least (half types are upcast; float64 stays)."""
    return (scores if scores.dtype == torch.float64 else scores.float()).softmax(dim=-1)


class EvictionCache(LayerCache):
    """Base class: buffers of `size` slots per (row, head), the prefill and decode paths; a rule overrides
    `keep_scores` (and `candidate_state` when it keeps state per slot, `after_prefill` when a prefill sets any)."""

    attention_rows: str = "none"  # which prefill queries' attention the rule reads: none, last, window, all
    slot_state: tuple[str, ...] = ()  # state buffers (B, nh, S) kept per slot, beside k, v and pos

    def __init__(
        self,
        batch_size: int,
        max_len: int,
        n_head: int,
        head_size: int,
        device=None,
        dtype=None,
        budget: int | float = 0.25,
    ) -> None:
        super().__init__(batch_size, max_len)
        self.size = budget_slots(budget, max_len)
        self.dtype = dtype or torch.get_default_dtype()
        B, nh, S = batch_size, n_head, self.size
        self.buffers = {
            "k": torch.zeros(B, nh, S, head_size, device=device, dtype=self.dtype),
            "v": torch.zeros(B, nh, S, head_size, device=device, dtype=self.dtype),
            "pos": torch.full((B, nh, S), -1, device=device, dtype=torch.int32),
        }

    @classmethod
    def build(cls, attn: Any, batch_size: int, max_len: int, device=None, dtype=None, **kwargs: Any) -> LayerCache:
        if attn.n_kv_head != attn.n_head:  # eviction scores are per query head; grouped K/V slots are not built yet
            raise ValueError(
                f"cache {cls.name!r} does not hold grouped K/V heads (n_kv_head={attn.n_kv_head} < n_head="
                f"{attn.n_head}); use kv, fp16, int8 or int4 with GQA / MQA"
            )
        return super().build(attn, batch_size, max_len, device=device, dtype=dtype, **kwargs)

    # --- the rule ----------------------------------------------------------------------------------------
    def keep_scores(self, cand: dict[str, Tensor], probs: Tensor | None, last_pos: Tensor, decoding: bool) -> Tensor:
        """A score per candidate (B, nh, N), higher kept. `cand`: the candidates' `pos` (B, nh, N) (-1: empty or
        padding) and per-slot state (`slot_state`); `probs` (B, nh, Tq, N): the attention of the queries named by
        `attention_rows` in prefill, of the one new query in decoding (fp32 at least); `last_pos` (B, 1, 1): the
        newest token's position; `decoding`: a one-token step (else a prefill chunk)."""
        raise NotImplementedError

    def candidate_state(self, old: dict[str, Tensor], k: Tensor, probs: Tensor | None) -> dict[str, Tensor]:
        """The per-slot state (`slot_state`) of the candidates (B, nh, S + T): the kept slots' `old` state and the
        new tokens' (keys k (B, nh, T, hs)), given the attention `probs` (B, nh, Tq, S + T) the rule asked for."""
        return {}

    def after_prefill(self, last_pos: Tensor) -> None:
        """After a prefill kept its slots (e.g. SnapKV freezes its selection); `last_pos` (B, 1, 1)."""

    # --- shared paths ------------------------------------------------------------------------------------
    def attend(self, q: Tensor, k: Tensor, v: Tensor, step: Step) -> Tensor:
        B, T = q.shape[0], q.shape[-2]
        if step.offset is None:
            real = torch.ones(B, T, dtype=torch.bool, device=q.device)
        else:
            real = step.slots[None, :] >= step.offset[:, None]  # (B, T): left padding is not real
        new_pos = torch.where(real, step.positions, -1).to(torch.int32)  # (B, T)
        last_pos = step.positions[:, -1].view(B, 1, 1)  # the last token of a chunk is real in every row
        if T == 1:
            return self._decode(q, k, v, real, new_pos, last_pos)
        return self._prefill(q, k, v, real, new_pos, last_pos)

    def _probs(self, q: Tensor, keys: Tensor, mask: Tensor) -> Tensor:
        scores = (q @ keys.mT) * q.shape[-1] ** -0.5
        return _softmax(scores.masked_fill(~mask, float("-inf")))

    def _prefill(self, q: Tensor, k: Tensor, v: Tensor, real: Tensor, new_pos: Tensor, last_pos: Tensor) -> Tensor:
        B, nh, T, _ = q.shape
        S, buf = self.size, self.buffers
        keys = torch.cat((buf["k"].to(q.dtype), k), dim=2)  # (B, nh, S + T, hs)
        values = torch.cat((buf["v"].to(q.dtype), v), dim=2)
        pos = torch.cat((buf["pos"], new_pos[:, None, :].expand(B, nh, T)), dim=2)  # (B, nh, S + T)
        eye = torch.eye(T, dtype=torch.bool, device=q.device)
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        own = (causal & real[:, None, :]) | eye  # (B, T, T): a real query sees the chunk's real tokens; padding itself
        kept = (buf["pos"] >= 0)[:, :, None, :] & real[:, None, :, None]  # (B, nh, T, S)
        mask = torch.cat((kept, own[:, None].expand(B, nh, T, T)), dim=-1)  # (B, nh, T, S + T)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        rows = {"none": None, "last": slice(T - 1, T), "window": self.window_rows(T), "all": slice(0, T)}
        chosen = rows[self.attention_rows]
        probs = None if chosen is None else self._probs(q[:, :, chosen], keys, mask[:, :, chosen])
        cand = {"pos": pos, **self.candidate_state({n: buf[n] for n in self.slot_state}, k, probs)}
        score = self.keep_scores(cand, probs, last_pos, False).masked_fill(pos < 0, float("-inf"))
        # The S best, ties going to the newest: sorted by position first, then (stably) by score.
        newest_first = pos.argsort(dim=-1, descending=True, stable=True)
        by_score = score.gather(-1, newest_first).argsort(dim=-1, descending=True, stable=True)
        idx = newest_first.gather(-1, by_score[..., :S])  # (B, nh, S)
        full = idx[..., None].expand(B, nh, S, keys.shape[-1])
        buf["k"].copy_(keys.gather(2, full))
        buf["v"].copy_(values.gather(2, full))
        for name in ("pos", *self.slot_state):
            buf[name].copy_(cand[name].gather(2, idx))
        self.after_prefill(last_pos)
        return out

    def window_rows(self, T: int) -> slice:
        return slice(0, T)

    def _decode(self, q: Tensor, k: Tensor, v: Tensor, real: Tensor, new_pos: Tensor, last_pos: Tensor) -> Tensor:
        B, nh, _, hs = q.shape
        S, buf = self.size, self.buffers
        kb, vb = buf["k"].to(q.dtype), buf["v"].to(q.dtype)
        s_old = ((q @ kb.mT) * hs**-0.5).masked_fill(~(buf["pos"] >= 0)[:, :, None, :], float("-inf"))
        s_new = (q * k).sum(-1, keepdim=True) * hs**-0.5  # (B, nh, 1, 1)
        p = _softmax(torch.cat((s_old, s_new), dim=-1))  # (B, nh, 1, S + 1)
        out = p[..., :S].to(q.dtype) @ vb + p[..., S:].to(q.dtype) * v
        pos = torch.cat((buf["pos"], new_pos[:, None, :].expand(B, nh, 1)), dim=-1)  # (B, nh, S + 1)
        cand = {"pos": pos, **self.candidate_state({n: buf[n] for n in self.slot_state}, k, p)}
        score = self.keep_scores(cand, p, last_pos, True).masked_fill(pos < 0, float("-inf"))
        lowest = score == score.amin(dim=-1, keepdim=True)  # ties go to the oldest (the first empty slot first)
        victim = torch.where(lowest, pos, torch.iinfo(torch.int32).max).argmin(dim=-1, keepdim=True)  # (B, nh, 1)
        write = (victim < S) & real[:, None, :]  # the new token kept (and real): it takes the victim's slot
        slot = victim.clamp_max(S - 1)
        self._put("k", slot, k, write)
        self._put("v", slot, v, write)
        self._put("pos", slot, new_pos[:, None, :].expand(B, nh, 1), write)
        for name in self.slot_state:  # every slot's state moves on (e.g. accumulated attention), then the new one
            buf[name].copy_(cand[name][..., :S])
            self._put(name, slot, cand[name][..., S:], write)
        return out

    def _put(self, name: str, slot: Tensor, x: Tensor, write: Tensor) -> None:
        """Write x (B, nh, 1[, d]) at `slot` (B, nh, 1) where `write`, else leave the slot as it was."""
        buf = self.buffers[name]
        if buf.dim() == 4:
            slot, write = slot[..., None].expand(*slot.shape, buf.shape[-1]), write[..., None]
        old = buf.gather(2, slot)
        buf.scatter_(2, slot, torch.where(write, x.to(buf.dtype), old))


def recent(pos: Tensor, last_pos: Tensor, window: int) -> Tensor:
    """Candidates among the `window` most recent positions (the newest token included), (B, nh, N) bool."""
    return pos > last_pos - window
