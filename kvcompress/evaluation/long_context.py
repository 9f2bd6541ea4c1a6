"""Evaluation past the training context: position-wise PPL on long contiguous windows, and a passkey probe.

- `long_context`: windows of `length + 1` consecutive tokens of the validation token stream (documents
  concatenated, as the datamodule stores them), evenly spaced over it, decoded token by token through each cache
  (`autoregressive_token_losses`); PPL overall and in buckets of positions on a log scale (0-16, 16-32, 32-64,
  ...), the cache's measured bytes per token at that length, and each window's mean loss (for paired intervals).
- `passkey_probe`: a random number of `digits` digits hidden at a relative `depth` of filler text `length` tokens
  long, asked for at the end ("What is the pass key? The pass key is"). Per cache, length and depth over `trials`
  keys: `accuracy` (greedy decoding gives exactly the key's tokens) and `logprob` (the mean log-probability of the
  key's tokens, teacher-forced through the cache after the prompt's prefill: informative where accuracy is 0).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from kvcompress.config import CacheConfig, EvalConfig
from kvcompress.evaluation import metrics
from kvcompress.models import GPTNeoX
from kvcompress.models.generate import generate, prefill

__all__ = ["check_long_context", "log_buckets", "long_context", "long_windows", "passkey_probe", "passkey_prompt"]


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...


def log_buckets(length: int, first: int = 16) -> list[tuple[int, int]]:
    """[0, first), then doubling, the last clipped at `length`: (0, 16), (16, 32), ..., (256, 512)."""
    edges = [0, min(first, length)]
    while edges[-1] < length:
        edges.append(min(2 * edges[-1], length))
    return list(zip(edges[:-1], edges[1:], strict=True))


def check_long_context(cfg: EvalConfig, max_positions: int) -> None:
    """The long-context and passkey settings against the model's position limit (before any work)."""
    lc, pk = cfg.long_context, cfg.passkey
    if lc.enabled:
        bad = [n for n in lc.lengths if not 2 <= n <= max_positions]
        if bad or lc.windows < 2:
            raise ValueError(
                f"eval.long_context.lengths={list(lc.lengths)} must lie in [2, max_position_embeddings="
                f"{max_positions}] and eval.long_context.windows={lc.windows} be >= 2"
            )
    if pk.enabled:
        if any(not 32 <= n <= max_positions - pk.digits - 1 for n in pk.lengths):
            raise ValueError(
                f"eval.passkey.lengths={list(pk.lengths)} must lie in [32, max_position_embeddings - digits - 1 = "
                f"{max_positions - pk.digits - 1}] (the key's tokens follow the prompt)"
            )
        if any(not 0.0 <= d <= 1.0 for d in pk.depths) or pk.trials < 1 or not 1 <= pk.digits <= 12:
            raise ValueError(
                f"eval.passkey: depths={list(pk.depths)} must lie in [0, 1], trials={pk.trials} be >= 1 and "
                f"digits={pk.digits} in [1, 12]"
            )


def long_windows(tokens: np.ndarray, length: int, n: int) -> torch.Tensor:
    """`n` non-overlapping windows of `length + 1` consecutive tokens, evenly spaced over the stream."""
    size = length + 1
    available = tokens.size // size
    if available < n:
        raise ValueError(f"the validation stream has {tokens.size} tokens: {available} windows of {size}, not {n}")
    starts = [round(i * (available - 1) / max(n - 1, 1)) * size for i in range(n)]
    return torch.from_numpy(np.stack([tokens[s : s + size] for s in starts]).astype(np.int64))


@torch.no_grad()
def long_context(
    net: GPTNeoX, tokens: np.ndarray, caches: dict[str, CacheConfig], lengths: Sequence[int], windows: int
) -> dict[str, Any]:
    """{length: {cache key: {ppl, pos_ppl, bytes_per_token, window_loss}}} (see the module docstring)."""
    device = net.embed_out.weight.device
    out: dict[str, Any] = {}
    for length in lengths:
        ids = long_windows(tokens, length, windows).to(device)
        per_cache = {}
        for key, cache in caches.items():
            losses = metrics.autoregressive_token_losses(net, ids, cache.name, **cache.kwargs)  # (n, length)
            per_cache[key] = {
                "kind": cache.name,
                "ppl": metrics.perplexity(losses),
                "pos_ppl": metrics.position_ppl(losses, log_buckets(length)),
                "bytes_per_token": metrics.cache_bytes_per_token(net, cache.name, length, **cache.kwargs),
                "window_loss": losses.float().mean(dim=1).tolist(),
            }
        out[str(length)] = per_cache
    return out


FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"


def passkey_prompt(tokenizer: Tokenizer, length: int, depth: float, key: str) -> tuple[list[int], list[int]]:
    """(prompt ids of `length` tokens with the needle at relative `depth` of the filler, the key's ids)."""
    needle, question = tokenizer.encode(NEEDLE.format(key=key)), tokenizer.encode(QUESTION)
    block = tokenizer.encode(FILLER)
    n_filler = length - len(needle) - len(question)
    if n_filler < 0:
        raise ValueError(f"eval.passkey.lengths: {length} tokens cannot hold the needle and the question")
    filler = (block * (n_filler // len(block) + 1))[:n_filler]
    at = round(depth * n_filler / len(block)) * len(block)  # at a filler block's boundary
    at = min(at, n_filler)
    return filler[:at] + needle + filler[at:] + question, tokenizer.encode(" " + key)


@torch.no_grad()
def _score_key(net: GPTNeoX, prompt: list[int], answer: list[int], cache: CacheConfig) -> tuple[bool, float]:
    device = net.embed_out.weight.device
    ids = torch.tensor([prompt], device=device)
    target = torch.tensor(answer, device=device)
    n = len(answer)
    caches = net.build_caches(1, len(prompt) + n, kind=cache.name, **cache.kwargs)
    tokens = generate(net, ids, n, caches=caches)
    correct = bool(torch.equal(tokens[0, len(prompt) :], target))
    logits = [prefill(net, ids, caches)]  # teacher-forced: the key's tokens fed one at a time after the prompt
    for t in range(n - 1):
        logits.append(net(target[None, t : t + 1], caches, last_only=True)[:, -1])
    logp = F.log_softmax(torch.cat(logits).float(), dim=-1).gather(1, target[:, None])
    return correct, logp.mean().item()


@torch.no_grad()
def passkey_probe(
    net: GPTNeoX,
    tokenizer: Tokenizer,
    caches: dict[str, CacheConfig],
    lengths: Sequence[int],
    depths: Sequence[float],
    trials: int,
    digits: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """{"caches": {cache key: {accuracy, logprob (means over all cells), cells: {"length@depth": {accuracy,
    logprob}}}}, "chance_logprob": -log(vocab)}; the same keys for every cache (seeded)."""
    rng = random.Random(seed)
    keys = {
        (n, d): [str(rng.randrange(10 ** (digits - 1), 10**digits)) for _ in range(trials)]
        for n in lengths
        for d in depths
    }
    out: dict[str, Any] = {}
    for name, cache in caches.items():
        cells = {}
        for (n, d), cell_keys in keys.items():
            scores = [_score_key(net, *passkey_prompt(tokenizer, n, d, key), cache) for key in cell_keys]
            cells[f"{n}@{d}"] = {
                "accuracy": sum(c for c, _ in scores) / len(scores),
                "logprob": sum(lp for _, lp in scores) / len(scores),
            }
        out[name] = {
            "kind": cache.name,
            "bytes_per_token": metrics.cache_bytes_per_token(net, cache.name, max(lengths), **cache.kwargs),
            "accuracy": sum(c["accuracy"] for c in cells.values()) / len(cells),
            "logprob": sum(c["logprob"] for c in cells.values()) / len(cells),
            "cells": cells,
        }
    return {"caches": out, "chance_logprob": -math.log(net.cfg.vocab_size)}
