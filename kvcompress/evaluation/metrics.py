"""Evaluation metrics, model-agnostic plain PyTorch (METHODS.md "Metrics used across the reports").

- `token_losses`: per-token CE of one teacher-forced (parallel) forward.
- `autoregressive_token_losses`: the same tokens fed one at a time against a cache; for a lossy cache
  (KA) this is where the train/eval gap shows.
- `perplexity`, `position_ppl`: PPL and position-bucketed PPL of a (B, T-1) loss tensor.
- `timed` (the one timer: wall seconds with the device drained), `time_decode`, `decode_speed` (TTFT and
  TPOT), `cache_bytes_per_token`, `kv_bytes_per_token`: speed and size of a cache.
- `reversal_probe`: PPL of synthetic "A is the R of B." facts vs their reversals.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from kvcompress.models.caches import Caches, KVCache
from kvcompress.models.generate import StepFn, compiled_decode_step, decode_step, prefill
from kvcompress.models.gpt_neox import GPTNeoX

R = TypeVar("R")

__all__ = [
    "DEFAULT_BUCKETS",
    "autoregressive_token_losses",
    "cache_bytes_per_token",
    "decode_speed",
    "kv_bytes_per_token",
    "perplexity",
    "position_ppl",
    "reversal_facts",
    "reversal_probe",
    "time_decode",
    "timed",
    "token_losses",
]

DEFAULT_BUCKETS: tuple[tuple[int, int], ...] = ((0, 16), (16, 32), (32, 64), (64, 96), (96, 128))


def _device(model: GPTNeoX) -> torch.device:
    return next(model.parameters()).device


def _per_token_ce(logits: Tensor, targets: Tensor) -> Tensor:
    """(B, T, V) logits, (B, T) targets -> (B, T) CE (fp32 for half types, else the logits' dtype)."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")


@torch.no_grad()
def token_losses(model: GPTNeoX, input_ids: Tensor) -> Tensor:
    """Per-token CE (B, T-1) of a teacher-forced forward: inputs ids[:, :-1], targets ids[:, 1:]."""
    input_ids = input_ids.to(_device(model))
    return _per_token_ce(model(input_ids[:, :-1]), input_ids[:, 1:])


@torch.no_grad()
def autoregressive_token_losses(
    model: GPTNeoX, input_ids: Tensor, cache: str = "native", **cache_kwargs: Any
) -> Tensor:
    """Per-token CE (B, T-1), decoding token by token with `cache`.

    Every forward takes exactly one new position against the cache (teacher-forced: the true tokens are
    fed, one at a time); the logits of step t are scored against token t+1.
    """
    input_ids = input_ids.to(_device(model))
    B, T = input_ids.shape
    caches = model.build_caches(B, T - 1, kind=cache, **cache_kwargs)
    logits = [model(input_ids[:, t : t + 1], caches)[:, -1] for t in range(T - 1)]  # each (B, V)
    return _per_token_ce(torch.stack(logits, dim=1), input_ids[:, 1:])


def perplexity(losses: Tensor) -> float:
    """exp(mean CE) over all given token losses."""
    return math.exp(losses.double().mean().item())


def position_ppl(losses: Tensor, buckets: Sequence[tuple[int, int]] = DEFAULT_BUCKETS) -> dict[str, float]:
    """PPL per bucket [lo, hi) of loss positions (column t = loss of predicting token t+1), keys "lo-hi".

    Buckets that start at or beyond the number of positions are skipped; a bucket running past the end is
    clipped (e.g. 127 losses of a 128-token sequence: "96-128" covers positions 96..126).
    """
    n = losses.shape[-1]
    return {f"{lo}-{hi}": perplexity(losses[..., lo : min(hi, n)]) for lo, hi in buckets if lo < n}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], R], device: torch.device) -> tuple[float, R]:
    """Wall seconds of `fn()` (the device drained before and after) and its result: the project's one timer."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, out


@torch.no_grad()
def time_decode(
    model: GPTNeoX, prompt: Tensor, new_tokens: int, caches: Caches, step_fn: StepFn | None = None
) -> dict[str, float]:
    """One greedy generation, timed in its two parts (the device drained around each timed region).

    TTFT: seconds of `prefill` (cache reset and prompt forward, up to the first token's logits). TPOT: the
    median seconds of one `decode_step` (one token for every row) over the `new_tokens - 1` steps.
    """
    if new_tokens < 2:
        raise ValueError("time_decode needs new_tokens >= 2 (one prefill token, then decode steps)")
    device = prompt.device
    ttft, logits = timed(lambda: prefill(model, prompt, caches), device)
    steps = []
    for _ in range(new_tokens - 1):
        nxt = logits.argmax(dim=-1, keepdim=True)
        seconds, logits = timed(lambda: decode_step(model, nxt, caches, step_fn), device)  # noqa: B023
        steps.append(seconds)
    return {"ttft_s": ttft, "tpot_s": statistics.median(steps)}


@torch.no_grad()
def decode_speed(
    model: GPTNeoX,
    batch_size: int,
    prompt_len: int,
    new_tokens: int,
    cache: str = "native",
    warmup: int = 1,
    repeats: int = 3,
    seed: int = 0,
    compile: bool = False,
    **cache_kwargs: Any,
) -> dict[str, float]:
    """TTFT and TPOT (medians over `repeats` generations after `warmup` untimed ones) of greedy decoding
    with `cache`, from random prompts (seeded); `decode_tokens_per_s` = batch_size / TPOT.

    The same definition as `python -m kvcompress.bench`.
    """
    if new_tokens < 2 or repeats < 1:
        raise ValueError("new_tokens must be >= 2 and repeats >= 1")
    device = _device(model)
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.cfg.vocab_size, (batch_size, prompt_len), generator=gen).to(device)
    caches = model.build_caches(batch_size, prompt_len + new_tokens, kind=cache, **cache_kwargs)
    step_fn = compiled_decode_step() if compile else None
    for _ in range(warmup):
        time_decode(model, prompt, new_tokens, caches, step_fn)
    runs = [time_decode(model, prompt, new_tokens, caches, step_fn) for _ in range(repeats)]
    ttft = statistics.median(r["ttft_s"] for r in runs)
    tpot = statistics.median(r["tpot_s"] for r in runs)
    return {"ttft_s": ttft, "tpot_s": tpot, "decode_tokens_per_s": batch_size / tpot}


def cache_bytes_per_token(model: GPTNeoX, cache: str = "native", max_len: int = 128, **cache_kwargs: Any) -> float:
    """Cache bytes per token per sequence, all layers, measured from the cache tensors (batch 1)."""
    max_len = min(max_len, model.cfg.max_position_embeddings)
    caches = model.build_caches(1, max_len, kind=cache, **cache_kwargs)
    return sum(c.nbytes() for c in caches) / max_len


# --- Reversal-curse probe --------------------------------------------------------------------------

FIRST_NAMES = (
    "Alice", "Ben", "Clara", "David", "Elena", "Felix", "Grace", "Hugo", "Iris", "Jonas",
    "Keira", "Liam", "Maya", "Noah", "Olive", "Pablo", "Quinn", "Rosa", "Simon", "Tara",
    "Umar", "Vera", "Wes", "Xena", "Yusuf", "Zoe",
)  # fmt: skip
LAST_NAMES = (
    "Moreno", "Tally", "Ashford", "Brennan", "Castillo", "Dunmore", "Everly", "Fairbanks", "Galloway",
    "Hartwell", "Ingram", "Jarvis", "Kessler", "Lindqvist", "Marlowe", "Northcott", "Okafor", "Pemberton",
    "Quimby", "Rourke", "Stanway", "Thorne", "Underhill", "Vasquez", "Whitlock", "Yardley",
)  # fmt: skip
# (relation of A to B, relation of B to A)
RELATIONS = (
    ("mother", "child"),
    ("father", "child"),
    ("teacher", "student"),
    ("employer", "employee"),
    ("doctor", "patient"),
    ("mentor", "apprentice"),
    ("landlord", "tenant"),
    ("coach", "player"),
    ("grandmother", "grandchild"),
    ("guardian", "ward"),
)


def kv_bytes_per_token(net: GPTNeoX) -> float:
    """The multi-head [K, V] cache's bytes per token for this shape (n_head K/V heads, whatever `n_kv_head` is: the
    reference a reduction is against, so grouped heads count as one), measured from KVCache tensors."""
    param = net.embed_out.weight
    cfg = net.cfg
    caches = [KVCache(1, 8, cfg.n_head, cfg.head_size, param.device, param.dtype) for _ in net.layers]
    return sum(c.nbytes() for c in caches) / 8


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...


def reversal_facts(n_facts: int = 100, seed: int = 0) -> list[tuple[str, str]]:
    """(forward, backward) statement pairs, e.g. ("Alice Moreno is the mother of Ben Tally.",
    "Ben Tally is the child of Alice Moreno."); deterministic under `seed`, distinct people per fact."""
    rng = random.Random(seed)
    people = [f"{first} {last}" for first in FIRST_NAMES for last in LAST_NAMES]
    if 2 * n_facts > len(people):
        raise ValueError(f"n_facts={n_facts} needs {2 * n_facts} distinct names; only {len(people)} exist")
    chosen = rng.sample(people, 2 * n_facts)
    facts = []
    for i in range(n_facts):
        a, b = chosen[2 * i], chosen[2 * i + 1]
        rel, inverse = rng.choice(RELATIONS)
        facts.append((f"{a} is the {rel} of {b}.", f"{b} is the {inverse} of {a}."))
    return facts


def _statement_ppl(
    model: GPTNeoX, tokenizer: Tokenizer, statements: Sequence[str], cache: str | None, cache_kwargs: dict[str, Any]
) -> float:
    """PPL over all predicted tokens of the statements (each scored alone, its first token unpredicted)."""
    total, count = 0.0, 0
    for text in statements:
        ids = torch.tensor([tokenizer.encode(text)], dtype=torch.long)
        if ids.shape[1] < 2:
            continue
        if cache is None:
            losses = token_losses(model, ids)
        else:
            losses = autoregressive_token_losses(model, ids, cache, **cache_kwargs)
        total += losses.sum().item()
        count += losses.numel()
    if count == 0:
        raise ValueError("no statement encodes to 2 or more tokens")
    return math.exp(total / count)


def reversal_probe(
    model: GPTNeoX,
    tokenizer: Tokenizer,
    n_facts: int = 100,
    seed: int = 0,
    cache: str | None = None,
    cache_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """PPL of "A is the R of B." (forward) vs "B is the R' of A." (backward) statements.

    Teacher-forced with `cache=None`, else autoregressive with that cache. Returns forward_ppl,
    backward_ppl, ratio = forward / backward, gap = backward - forward (report 000: 14222.9, 7364.4,
    1.9313, -6858.5).
    """
    facts = reversal_facts(n_facts, seed)
    kwargs = dict(cache_kwargs or {})
    forward = _statement_ppl(model, tokenizer, [f for f, _ in facts], cache, kwargs)
    backward = _statement_ppl(model, tokenizer, [b for _, b in facts], cache, kwargs)
    return {"forward_ppl": forward, "backward_ppl": backward, "ratio": forward / backward, "gap": backward - forward}
