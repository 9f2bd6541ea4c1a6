"""LEGO (METHODS.md section 6, report 002): a GPT-NeoX with a shallow and a deep exit, trained in two phases.

- Phase 1 trains the embedding, the layers below the shallow exit and its head (`shallow_*` names).
- Hard-example mining: every training token's shallow confidence (max softmax probability); the lowest
  `ratio` of them are hard (`hard_mask`, exact count, ties broken by position).
- Phase 2 trains the deep layers and the final head (`deep_layers.*`, `final_layer_norm.*`, `embed_out.*`) on the
  hard tokens; the shallow part, its head included, stays as phase 1 left it.
- Two-stage inference: a token whose shallow confidence >= `threshold` takes the shallow exit, else the deep one.
  `calibrate_threshold` picks the confidence that routes exactly `ratio` of the calibration tokens deep. The
  threshold is a buffer, so checkpoints carry it. Compute cost = (shallow * L_s + deep * L_d) / (N * L_d).

Decoding (`generate_early_exit`) skips the deep layers for confident tokens. The deep layers' caches then miss
those positions; `fill` decides how they are filled:
- `propagate` (CALM): the exit hidden state goes through each skipped layer's K/V projection (cheap, approximate);
- `recompute`: when a later token goes deep, the deep layers first run over the pending positions from the
  stored exit hidden states (exact: the deep caches equal the full model's).
`generate_self_speculative` (LayerSkip) drafts with the shallow exit and verifies with the full model in one
forward; its greedy tokens are the full model's.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from kvcompress.models.caches import Caches, Step, eager_step, span_step
from kvcompress.models.config import ModelConfig
from kvcompress.models.generate import generate, sample_next
from kvcompress.models.gpt_neox import GPTNeoX

__all__ = [
    "FILL_POLICIES",
    "LegoGPTNeoX",
    "build_lego",
    "calibrate_threshold",
    "check_ratio",
    "check_threshold",
    "compute_cost",
    "confidence",
    "decode_speed",
    "generate_early_exit",
    "generate_self_speculative",
    "hard_mask",
]

FILL_POLICIES = ("recompute", "propagate")
SHALLOW_PARAMS = ["embed_in.*", "shallow_layers.*", "shallow_head.*"]  # what phase 1 trains


def check_ratio(ratio: float, setting: str = "hard_example_ratio") -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0.0 < ratio < 1.0:
        raise ValueError(f"{setting} must be in (0, 1), got {ratio!r}")
    return float(ratio)


def check_threshold(threshold: float, setting: str = "threshold") -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"{setting} must be in [0, 1] (a max-softmax confidence), got {threshold!r}")
    return float(threshold)


def check_exits(exits: Sequence[int] | None, n_layer: int) -> tuple[int, int]:
    """(shallow, deep) exit layers: default (n_layer // 2, n_layer); the deep exit is the last layer."""
    if exits is None:
        exits = (n_layer // 2, n_layer)
    exits = tuple(exits)
    if len(exits) != 2 or not all(isinstance(e, int) and not isinstance(e, bool) for e in exits):
        raise ValueError(f"model.exits must be two layer numbers [shallow, deep], got {list(exits)}")
    shallow, deep = exits
    if not 1 <= shallow < deep:
        raise ValueError(f"model.exits={list(exits)} must be strictly increasing and start at layer >= 1")
    if deep != n_layer:
        raise ValueError(
            f"model.exits={list(exits)}: the deep exit must be the last layer, n_layer={n_layer} "
            f"({'past n_layer' if deep > n_layer else 'layers after it would never run'}); "
            f"set model.overrides.n_layer={deep} or change the exits"
        )
    return shallow, deep


def confidence(logits: Tensor) -> Tensor:
    """Max softmax probability over the last dimension (computed in fp32 at least)."""
    return torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1).amax(dim=-1)


class ExitHead(nn.Module):
    """An exit: its own final LayerNorm and output projection."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.out = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.norm(x))


class LegoGPTNeoX(GPTNeoX):
    """GPT-NeoX with a shallow exit after layer `exits[0]` and the deep (final) exit after the last layer.

    `forward` is the plain full-depth model (the deep exit uses the base `final_layer_norm` / `embed_out`), so
    `generate` and every evaluation treat it as one. The blocks live in `shallow_layers` and `deep_layers`
    (the names stage patterns match); `self.layers` lists them all, in order, for `run_layers` and caches.
    """

    def __init__(self, cfg: ModelConfig, exits: Sequence[int] | None = None, threshold: float = 0.5) -> None:
        super().__init__(cfg)
        self.shallow_exit, self.deep_exit = check_exits(exits, cfg.n_layer)
        blocks = list(self.layers)
        del self.layers
        self.shallow_layers = nn.ModuleList(blocks[: self.shallow_exit])
        self.deep_layers = nn.ModuleList(blocks[self.shallow_exit :])
        # A plain list: the blocks are registered once, under the names above.
        self.layers = blocks  # type: ignore[assignment]
        self.shallow_head = ExitHead(cfg)
        self.shallow_head.apply(self._init_weights)
        self.register_buffer("threshold", torch.tensor(check_threshold(threshold)))

    @property
    def exits(self) -> tuple[int, int]:
        return self.shallow_exit, self.deep_exit

    def exit_logits(self, exit_layer: int, x: Tensor) -> Tensor:
        if exit_layer == self.shallow_exit:
            return self.shallow_head(x)
        if exit_layer == self.deep_exit:
            return self.head(x)
        raise ValueError(f"layer {exit_layer} has no exit; exits are {list(self.exits)}")

    def forward_exits(
        self, input_ids: Tensor, upto: int | None = None, caches: Caches | None = None
    ) -> dict[int, Tensor]:
        """Logits of every exit up to layer `upto` (default: both), running only the layers they need."""
        upto = self.deep_exit if upto is None else upto
        if upto not in self.exits:
            raise ValueError(f"upto={upto} is not an exit; exits are {list(self.exits)}")
        step = None if caches is None else eager_step(caches.state, input_ids.shape[1])
        x, rope = self.embed(input_ids, None if step is None else step.positions)
        x = self.run_layers(x, rope, caches, layers=slice(0, self.shallow_exit), step=step)
        out = {self.shallow_exit: self.shallow_head(x)}
        if upto == self.deep_exit:
            deep = self.run_layers(x, rope, caches, layers=slice(self.shallow_exit, None), step=step)
            out[self.deep_exit] = self.head(deep)
        return out

    def route(self, shallow_logits: Tensor, threshold: float | Tensor | None = None) -> Tensor:
        """True where a token takes the shallow exit: its shallow confidence >= the threshold."""
        return confidence(shallow_logits) >= (self.threshold if threshold is None else threshold)  # type: ignore[operator]

    def routed(self, input_ids: Tensor, threshold: float | None = None) -> tuple[Tensor, Tensor]:
        """Two-stage output (the report's form: both exits computed, one picked per token), and the shallow mask."""
        out = self.forward_exits(input_ids)
        shallow, deep = out[self.shallow_exit], out[self.deep_exit]
        take = self.route(shallow, threshold)
        return torch.where(take[..., None], shallow, deep), take


def build_lego(
    name: str = "pythia-14m",
    exits: Sequence[int] | None = None,
    threshold: float = 0.5,
    attention: str = "standard",
    attention_kwargs: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
) -> LegoGPTNeoX:
    """A fresh LEGO model of a named shape (`overrides` changes any `ModelConfig` field)."""
    cfg = ModelConfig.from_name(
        name, attention=attention, attention_kwargs=dict(attention_kwargs or {}), **dict(overrides or {})
    )
    return LegoGPTNeoX(cfg, exits, threshold)


# --- mining, calibration, cost -----------------------------------------------------------------------------------


def hard_mask(conf: Tensor, ratio: float) -> Tensor:
    """The round(ratio * N) least confident entries of `conf` (any shape): exact count, ties broken by position."""
    check_ratio(ratio)
    flat = conf.flatten()
    k = round(ratio * flat.numel())
    order = torch.sort(flat, stable=True).indices
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask.view(conf.shape)


def hard_windows(conf: Tensor, ratio: float) -> Tensor:
    """Sample-level selection: positions of the round(ratio * N) windows with the lowest mean confidence."""
    return torch.nonzero(hard_mask(conf.mean(dim=1), ratio)).flatten()


def calibrate_threshold(conf: Tensor, ratio: float) -> float:
    """The threshold that routes exactly round(ratio * N) of these tokens deep (confidence < threshold), when
    the confidences are distinct: the smallest confidence that still goes shallow."""
    check_ratio(ratio)
    flat = torch.sort(conf.flatten().double()).values
    k = round(ratio * flat.numel())
    if k >= flat.numel():
        return 1.0
    return float(flat[k])


def compute_cost(shallow_share: float, shallow_layers: int, deep_layers: int) -> float:
    """(shallow * L_s + deep * L_d) / (N * L_d): the share of full-depth layer work two-stage inference does."""
    return (shallow_share * shallow_layers + (1 - shallow_share) * deep_layers) / deep_layers


# --- decoding ----------------------------------------------------------------------------------------------------


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
        layer = model.layers[i]
        _, k, v = layer.attention.split_qkv(layer.input_layernorm(h), rope)  # type: ignore[union-attr,operator]
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
    threshold = float(model.threshold) if threshold is None else check_threshold(threshold)  # type: ignore[arg-type]
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
        shallow, deep = model.shallow_head(h[:, 0]), None  # type: ignore[assignment]
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
    logits = torch.stack(step_logits, dim=1) if step_logits else None  # type: ignore[assignment]
    return Decoded(tokens, shallow_taken, logits)


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


# --- speed -------------------------------------------------------------------------------------------------------


def _timed(fn, repeats: int) -> tuple[float, Any]:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    return (time.perf_counter() - start) / repeats, out


@torch.no_grad()
def decode_speed(
    model: LegoGPTNeoX,
    prompts: Sequence[Tensor],
    new_tokens: int,
    *,
    fills: Sequence[str] = FILL_POLICIES,
    draft_tokens: int = 4,
    repeats: int = 1,
    cache: str = "native",
) -> dict[str, Any]:
    """Tokens/s of full-depth greedy decoding, of early exit (each fill policy, the model's threshold) and of
    greedy self-speculation, each over all `prompts` (batches of ids), timed back to back after a warm-up.

    `compute_cost` (and `theoretical_speedup` = 1 / compute_cost) counts layers at the decode's own shallow share.
    """
    n = sum(p.shape[0] for p in prompts) * new_tokens

    def over_prompts(decode):
        return lambda: [decode(p) for p in prompts]

    full_s, full = _timed(over_prompts(lambda p: generate(model, p, new_tokens, cache=cache)), repeats)
    out: dict[str, Any] = {"new_tokens": new_tokens, "sequences": n // new_tokens, "full_tokens_per_s": n / full_s}
    for fill in fills:
        decode = over_prompts(lambda p, f=fill: generate_early_exit(model, p, new_tokens, fill=f, cache=cache))
        secs, runs = _timed(decode, repeats)
        share = float(torch.cat([r.shallow.flatten() for r in runs]).float().mean())
        cost = compute_cost(share, model.shallow_exit, model.deep_exit)
        out[fill] = {
            "tokens_per_s": n / secs,
            "speedup": full_s / secs,
            "shallow_share": share,
            "compute_cost": cost,
            "theoretical_speedup": 1 / cost,
            "speedup_vs_theoretical": full_s / secs * cost,
            "same_tokens_as_full": sum(bool(torch.equal(r.tokens, f)) for r, f in zip(runs, full)) / len(runs),
        }
    decode = over_prompts(
        lambda p: generate_self_speculative(model, p, new_tokens, draft_tokens=draft_tokens, cache=cache)
    )
    secs, runs = _timed(decode, repeats)
    drafted, accepted = sum(r.drafted for r in runs), sum(r.accepted for r in runs)
    out["self_speculative"] = {
        "tokens_per_s": n / secs,
        "speedup": full_s / secs,
        "acceptance_rate": accepted / drafted if drafted else 0.0,
        "draft_tokens": draft_tokens,
        "same_tokens_as_full": float(all(torch.equal(r.tokens, f) for r, f in zip(runs, full))),
    }
    return out
