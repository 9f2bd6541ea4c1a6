"""LEGO decoding (report 002's "Phase B"): true early exit and greedy self-speculation, as loops over the
model's layers and the same caches as `generate`.

`generate_early_exit` skips the deep layers for confident tokens. The deep layers' caches then miss those
positions; `fill` decides how they are filled:
- `propagate` (CALM): the exit hidden state goes through each skipped layer's K/V projection (cheap, approximate);
- `recompute`: when a later token goes deep, the deep layers first run over the pending positions from the
  stored exit hidden states (exact: the deep caches equal the full model's).
`generate_self_speculative` (LayerSkip) drafts with the shallow exit and verifies with the full model in one
forward; its greedy tokens are the full model's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor

from kvcompress.methods.lego import FILL_POLICIES, LegoGPTNeoX, check_threshold, confidence
from kvcompress.models.caches import Caches, Step, eager_step, span_step
from kvcompress.models.generate import sample_next
from kvcompress.models.gpt_neox import Block

__all__ = ["Decoded", "check_fillable", "generate_early_exit", "generate_self_speculative", "truncate"]


@dataclass
class Decoded:
    tokens: Tensor  # (B, T + new)
    shallow: Tensor  # (B, new) bool: the token came from the shallow exit (all False for full depth)
    logits: Tensor | None = None  # (B, new, V): the logits each new token was drawn from
    drafted: int = 0  # self-speculative: draft tokens proposed (summed over rows)
    accepted: int = 0  # ... and accepted by the full model

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def check_fillable(model: LegoGPTNeoX, caches: Caches, fill: str) -> None:
    if fill not in FILL_POLICIES:
        raise ValueError(f"fill={fill!r}: use one of {list(FILL_POLICIES)}")
    if fill == "propagate":
        bad = {type(c).__name__ for c in caches[model.shallow_exit :] if not c.fillable}
        if bad:
            raise ValueError(
                f"fill='propagate' writes K/V into the layers an early exit skips, but cache(s) {sorted(bad)} "
                "cannot be filled without attention; use fill='recompute' or a kv / int8 cache"
            )


def _propagate(model: LegoGPTNeoX, h: Tensor, rope: tuple[Tensor, Tensor], caches: Caches, step: Step) -> None:
    """CALM: every skipped layer's cache gets K/V projected from the exit hidden state h."""
    for i in range(model.shallow_exit, model.deep_exit):
        layer = cast(Block, model.layers[i])  # (ModuleList items are typed as Module)
        _, k, v = layer.attention.split_qkv(layer.input_layernorm(h), rope)
        caches[i].append(k, v, step)


@torch.no_grad()
def generate_early_exit(
    model: LegoGPTNeoX,
    input_ids: Tensor,
    max_new_tokens: int,
    *,
    threshold: float | None = None,
    fill: str = "recompute",
    cache: str = "native",
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    return_logits: bool = False,
    caches: Caches | None = None,
) -> Decoded:
    """Decode with true early exit: a new token whose shallow confidence >= `threshold` (default: the model's)
    skips the deep layers. Works at batch > 1 with mixed exits; the prompt runs at full depth. `caches` (empty,
    one per layer) may be given to inspect them afterwards."""
    threshold = float(model.threshold) if threshold is None else check_threshold(threshold)
    if max_new_tokens < 0:
        raise ValueError("max_new_tokens must be >= 0")
    B, T = input_ids.shape
    total = T + max_new_tokens
    caches = model.build_caches(B, total, kind=cache) if caches is None else caches
    check_fillable(model, caches, fill)
    e = model.shallow_exit
    tokens = torch.empty((B, total), dtype=input_ids.dtype, device=input_ids.device)
    tokens[:, :T] = input_ids
    shallow_taken = torch.zeros((B, max_new_tokens), dtype=torch.bool, device=input_ids.device)
    step_logits = []
    caches.reset()
    offset = caches.state.offset
    step = eager_step(caches.state, T)  # the prompt, at full depth
    x, rope = model.embed(input_ids, step.positions)
    h = model.run_layers(x, rope, caches, layers=slice(0, e), step=step)
    mid = h.new_empty((B, total, h.shape[-1]))  # exit hidden states: recompute runs the deep layers from them
    mid[:, :T] = h
    deep_h = model.run_layers(h, rope, caches, layers=slice(e, None), step=step)
    deep_len = T  # positions the deep caches hold
    deep: Tensor | None  # None: this step's deep logits were not computed
    shallow, deep = model.shallow_head(h[:, -1]), model.head(deep_h[:, -1])
    for i in range(max_new_tokens):
        take = confidence(shallow) >= threshold  # (B,)
        logits = torch.where(take[:, None], shallow, deep) if deep is not None else shallow
        shallow_taken[:, i] = take
        if return_logits:
            step_logits.append(logits)
        tokens[:, T + i] = sample_next(logits, temperature, top_k, generator)
        if i + 1 == max_new_tokens:
            break
        p = T + i  # position of the token just drawn
        step = span_step(p, 1, offset)  # the shallow caches hold every position; the deep ones may lag
        caches.state.set_length(p + 1)
        x, rope = model.embed(tokens[:, p : p + 1], step.positions)
        h = model.run_layers(x, rope, caches, layers=slice(0, e), step=step)
        mid[:, p] = h[:, 0]
        shallow, deep = model.shallow_head(h[:, 0]), None
        go_deep = confidence(shallow) < threshold
        if fill == "propagate":
            if not go_deep.any():
                _propagate(model, h, rope, caches, step)
            else:  # deep rows run the layers; shallow rows feed h to each skipped layer, so they get CALM's K/V
                rows = go_deep[:, None, None]
                y = h
                for j in range(e, model.deep_exit):
                    y = torch.where(rows, model.layers[j](y, rope, caches[j], None, step), h)
                deep = model.head(y[:, 0])
            deep_len = p + 1
        elif go_deep.any():  # recompute: the deep layers catch up over every pending position, for all rows
            pending = mid[:, deep_len : p + 1]
            catch_up = span_step(deep_len, p + 1 - deep_len, offset)
            rope = model.rope(catch_up.positions, pending)
            y = model.run_layers(pending, rope, caches, layers=slice(e, None), step=catch_up)
            deep, deep_len = model.head(y[:, -1]), p + 1
    return Decoded(tokens, shallow_taken, torch.stack(step_logits, dim=1) if step_logits else None)


def truncate(caches: Caches, length: int) -> None:
    """Roll every cache back to its first `length` positions (the decode state's length; nothing is erased)."""
    caches.state.set_length(length)


@torch.no_grad()
def generate_self_speculative(
    model: LegoGPTNeoX, input_ids: Tensor, max_new_tokens: int, *, draft_tokens: int = 4, cache: str = "native"
) -> Decoded:
    """Greedy self-speculative decoding (LayerSkip): the shallow exit drafts up to `draft_tokens` tokens, the
    deep layers verify them in one forward from the drafts' exit hidden states (the shallow layers are shared,
    so their caches are the full model's), and every cache rolls back past the first mismatch. At batch > 1 all
    rows advance by the shortest accepted run, so the tokens stay exactly the full model's greedy tokens."""
    if draft_tokens < 1:
        raise ValueError(f"draft_tokens must be >= 1, got {draft_tokens}")
    if max_new_tokens < 0:
        raise ValueError("max_new_tokens must be >= 0")
    B, T = input_ids.shape
    total = T + max_new_tokens
    tokens = torch.empty((B, total), dtype=input_ids.dtype, device=input_ids.device)
    tokens[:, :T] = input_ids
    result = Decoded(tokens, torch.zeros((B, max_new_tokens), dtype=torch.bool, device=input_ids.device))
    if max_new_tokens == 0:
        return result
    caches = model.build_caches(B, total, kind=cache)
    e = model.shallow_exit
    tokens[:, T] = model(input_ids, caches, last_only=True)[:, -1].argmax(-1)
    done = 1
    while done < max_new_tokens:
        k = min(draft_tokens, max_new_tokens - done)
        pos = T + done - 1  # the newest token, not yet run through the model
        hs = []
        offset = caches.state.offset
        for j in range(k):
            step = span_step(pos + j, 1, offset)  # drafts fill the shallow caches only
            x, rope = model.embed(tokens[:, pos + j : pos + j + 1], step.positions)
            h = model.run_layers(x, rope, caches, layers=slice(0, e), step=step)
            hs.append(h)
            tokens[:, pos + j + 1] = model.shallow_head(h[:, 0]).argmax(-1)
        mid = torch.cat(hs, dim=1)  # (B, k, C)
        verify = span_step(pos, k, offset)
        deep = model.run_layers(mid, model.rope(verify.positions, mid), caches, layers=slice(e, None), step=verify)
        verified = model.head(deep)
        caches.state.set_length(pos + k)
        full = verified.argmax(-1)  # (B, k): the full model's tokens for positions pos+1 .. pos+k
        drafts = tokens[:, pos + 1 : pos + k + 1]
        runs = (drafts == full).int().cumprod(dim=1).sum(dim=1)  # accepted drafts per row
        result.drafted += B * k
        result.accepted += int(runs.sum())
        a = int(runs.min())
        if a < k:  # the first rejected position takes the full model's token; drop what came after it
            tokens[:, pos + a + 1] = full[:, a]
            truncate(caches, pos + a + 1)
        done += min(a + 1, k)
    return result
