"""Autoregressive decoding: an eager `prefill`, a static-shape `decode_step` (compiled), and `generate`.

    caches = model.build_caches(B, T + new)
    logits = prefill(model, prompt, caches, attention_mask)      # eager, (B, V)
    logits = decode_step(model, next_ids, caches)                 # one token per row, static shapes

`decode_step` reads only device tensors (the slot, the per-row offsets, the full buffers under a mask), so
`compiled_decode_step()` traces it once per model and cache kind; on CUDA, mode "reduce-overhead" turns it
into a CUDA graph. Ragged batches are left-padded: `attention_mask` (B, T) marks real tokens, and each
row's positions start at 0 at its first real token, as in Hugging Face `generate`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, overload

import torch
from torch import Tensor

from kvcompress.models.caches import Caches, static_step
from kvcompress.models.gpt_neox import GPTNeoX

__all__ = [
    "compiled_decode_step",
    "decode_step",
    "generate",
    "left_padding",
    "mark_static",
    "prefill",
    "sample_next",
]

StepFn = Callable[[GPTNeoX, Tensor, Caches], Tensor]


def sample_next(
    logits: Tensor, temperature: float = 0.0, top_k: int | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """Next token ids (B,) from last-position logits (B, V): greedy at temperature 0."""
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def left_padding(attention_mask: Tensor) -> Tensor:
    """Pad count per row (B,) of a left-padded (B, T) mask of 0s then 1s; anything else is an error."""
    mask = attention_mask.to(torch.long)
    pads = mask.shape[1] - mask.sum(dim=1)
    expected = torch.arange(mask.shape[1], device=mask.device)[None, :] >= pads[:, None]
    if not torch.equal(mask.bool(), expected) or bool((pads == mask.shape[1]).any()):
        raise ValueError("attention_mask must be left padding (0s then 1s) with at least one real token per row")
    return pads


@torch.no_grad()
def prefill(model: GPTNeoX, input_ids: Tensor, caches: Caches, attention_mask: Tensor | None = None) -> Tensor:
    """Reset `caches`, run the prompt (B, T) through them eagerly; returns the last position's logits (B, V)."""
    offset = None if attention_mask is None else left_padding(attention_mask.to(input_ids.device))
    caches.reset(offset)
    return model(input_ids, caches, last_only=True)[:, -1]


def _decode_step(model: GPTNeoX, ids: Tensor, caches: Caches) -> Tensor:
    step = static_step(caches.state)
    x, rope = model.embed(ids, step.positions)
    x = model.run_layers(x, rope, caches, step=step)
    caches.state.slot.add_(1)
    return model.head(x)[:, -1]


def decode_step(model: GPTNeoX, ids: Tensor, caches: Caches, step_fn: StepFn | None = None) -> Tensor:
    """Logits (B, V) after one new token per row, ids (B, 1); `step_fn` is e.g. `compiled_decode_step()`."""
    caches.state.take(1)  # the host-side overflow check; the device slot advances inside the step
    with torch.no_grad():
        return (step_fn or _decode_step)(model, ids, caches)


_COMPILED: dict[str, StepFn] = {}


def compiled_decode_step(mode: str | None = None) -> StepFn:
    """`torch.compile`d decode step (one per mode; default: "reduce-overhead" on CUDA, inductor's default else).

    Buffers must be marked static for CUDA graphs: `mark_static(caches)` before the first call.
    """
    if mode is None:
        mode = "reduce-overhead" if torch.cuda.is_available() else "default"
    if mode not in _COMPILED:
        # One graph per model and cache kind in this process (tests and benches build several).
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _COMPILED[mode] = torch.compile(_decode_step, mode=mode, fullgraph=True, dynamic=False)
    return _COMPILED[mode]


def mark_static(caches: Caches) -> None:
    """Tell the compiler the buffers keep their addresses (CUDA graphs replay on them)."""
    for cache in caches:
        for buf in cache.buffers.values():
            torch._dynamo.mark_static_address(buf)
    torch._dynamo.mark_static_address(caches.state.slot)
    torch._dynamo.mark_static_address(caches.state.offset)


@overload
def generate(
    model: GPTNeoX,
    input_ids: Tensor,
    max_new_tokens: int,
    *,
    attention_mask: Tensor | None = ...,
    temperature: float = ...,
    top_k: int | None = ...,
    generator: torch.Generator | None = ...,
    use_cache: bool = ...,
    cache: str = ...,
    caches: Caches | None = ...,
    compile: bool = ...,
    return_logits: Literal[False] = ...,
) -> Tensor: ...


@overload
def generate(
    model: GPTNeoX,
    input_ids: Tensor,
    max_new_tokens: int,
    *,
    attention_mask: Tensor | None = ...,
    temperature: float = ...,
    top_k: int | None = ...,
    generator: torch.Generator | None = ...,
    use_cache: bool = ...,
    cache: str = ...,
    caches: Caches | None = ...,
    compile: bool = ...,
    return_logits: Literal[True],
) -> tuple[Tensor, Tensor]: ...


@torch.no_grad()
def generate(
    model: GPTNeoX,
    input_ids: Tensor,
    max_new_tokens: int,
    *,
    attention_mask: Tensor | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    cache: str = "native",
    caches: Caches | None = None,
    compile: bool = False,
    return_logits: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Append `max_new_tokens` tokens to `input_ids` (B, T).

    With `use_cache`, the prompt is prefilled once and each new token is one `decode_step` (compiled with
    `compile=True`); `caches` may be reused across calls (they are reset). `attention_mask` (B, T) marks the
    real tokens of left-padded prompts. `return_logits` also returns the logits each new token was drawn
    from, (B, max_new_tokens, V).
    """
    if max_new_tokens < 0:
        raise ValueError("max_new_tokens must be >= 0")
    B, T = input_ids.shape
    if attention_mask is not None and not use_cache:
        raise ValueError("attention_mask (ragged batches) needs use_cache=True")
    tokens = torch.empty((B, T + max_new_tokens), dtype=input_ids.dtype, device=input_ids.device)
    tokens[:, :T] = input_ids
    step_logits = []
    if use_cache:
        if caches is None:
            caches = model.build_caches(B, T + max_new_tokens, kind=cache)
        if T + max_new_tokens > caches.state.max_len:  # checked once, before any work
            raise ValueError(f"cache overflow: {T} + {max_new_tokens} tokens > max_len={caches.state.max_len}")
        step_fn = compiled_decode_step() if compile else None
        if compile and caches.state.slot.is_cuda:
            mark_static(caches)
        logits = prefill(model, input_ids, caches, attention_mask)
    else:
        logits = model(input_ids, last_only=True)[:, -1]
    for i in range(max_new_tokens):
        if return_logits:
            step_logits.append(logits)
        nxt = sample_next(logits, temperature, top_k, generator)
        tokens[:, T + i] = nxt
        if i + 1 == max_new_tokens:
            break
        if use_cache:
            assert caches is not None  # built above
            logits = decode_step(model, nxt[:, None], caches, step_fn)
        else:
            logits = model(tokens[:, : T + i + 1], last_only=True)[:, -1]
    if return_logits:
        empty = input_ids.new_zeros((B, 0, model.cfg.vocab_size), dtype=torch.float)
        return tokens, torch.stack(step_logits, dim=1) if step_logits else empty
    return tokens
