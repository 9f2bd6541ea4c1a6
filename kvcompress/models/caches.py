"""Decode caches: fixed buffers per layer, a shared decode state, and the cache registry.

A cache owns preallocated buffers whose shapes never change while decoding (so a decode step can be
compiled, and captured in a CUDA graph). New tokens are written with `index_copy_` at the buffer slots
of the current `Step`; reads cover the whole buffer under the step's boolean mask (or, in eager
prefill, the first `step.n_read` slots). Every cache reports its exact size from its tensors (`nbytes`).

Cache kinds register by name for the cache layouts they can hold: `@register_cache("int8", layouts=("kv",))`.
A layout is what an attention writes per token (`Attention.cache_layout`: `kv` for standard attention, `ka`,
`vdproj`, ...), so a new cache kind for K/V serves every attention that writes K/V without naming any of them.
`models/` defines the standard `kv` cache only; methods register theirs when imported.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "CACHES",
    "CacheKind",
    "Caches",
    "DecodeState",
    "KVCache",
    "LayerCache",
    "Step",
    "cannot_serve",
    "caches_for",
    "eager_step",
    "group_mean",
    "grouped_matmul",
    "register_cache",
    "sdpa",
    "span_step",
    "static_step",
]


def sdpa(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
    """`scaled_dot_product_attention` of q (B, nh, T, hs) over k, v (B, g, L, d) with g dividing nh: query head h reads
    K/V head h // (nh / g) (SDPA's `enable_gqa`: on this project's 2-core CPU, 4 heads of 32, T=128, batch 16, it
    took 1.1-1.6x less time than `repeat_interleave` of K/V for forward + backward, 2.1-2.6x less for a decode step)."""
    gqa = q.shape[-3] != k.shape[-3]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=gqa)


def group_mean(a: Tensor, n_groups: int) -> Tensor:
    """(B, nh, T, d) -> (B, n_groups, T, d): the mean over each group of nh / n_groups consecutive heads
    (the identity when n_groups == nh)."""
    B, nh, T, d = a.shape
    if n_groups == nh:
        return a
    return a.view(B, n_groups, nh // n_groups, T, d).mean(dim=2)


def grouped_matmul(x: Tensor, y: Tensor) -> Tensor:
    """x (B, nh, T, d) @ y (B, g, d, L) with g dividing nh, query head h times y's head h // (nh / g): (B, nh, T, L).
    The plain `x @ y` when g == nh."""
    B, nh, T, d = x.shape
    g = y.shape[-3]
    if g == nh:
        return x @ y
    return (x.reshape(B, g, (nh // g) * T, d) @ y).view(B, nh, T, y.shape[-1])


@dataclass
class DecodeState:
    """Where decoding stands, shared by all layers' caches.

    `slot` is the buffer slot of the next token (a (1,) device tensor, advanced in place); `offset` is
    each row's left padding (B,), so a row's position is `slot - offset`. `length` is the host copy of
    `slot`: overflow is checked on the host, never by reading the device.
    """

    slot: Tensor  # (1,) long
    offset: Tensor  # (B,) long
    max_len: int
    length: int = 0

    def set_length(self, length: int) -> None:
        """Roll back (or forward) to the first `length` slots: what a slot holds depends on no later slot."""
        self.length = length
        self.slot.fill_(length)

    def reset(self, offset: Tensor | None = None) -> None:
        self.slot.zero_()
        if offset is None:
            self.offset.zero_()
        else:
            self.offset.copy_(offset)
        self.length = 0

    def take(self, n_new: int) -> int:
        """Reserve n_new slots (host check); returns the first."""
        if self.length + n_new > self.max_len:
            raise ValueError(f"cache overflow: {self.length} + {n_new} tokens > max_len={self.max_len}")
        start = self.length
        self.length += n_new
        return start


@dataclass
class Step:
    """One forward over new tokens: where they are written and what they may read.

    `slots` (T,): buffer slots of the new tokens. `mask` (B, 1, T, n): which slots each new token sees
    (n = `n_read`, or the whole buffer when `n_read` is None, as in the compiled decode step).
    `positions` (B, T): each token's position, for rope. `offset` (B,): each row's left padding (a token at a
    slot below it is padding), for caches that keep their own slots (eviction).
    """

    slots: Tensor
    mask: Tensor
    positions: Tensor
    n_read: int | None = None
    offset: Tensor | None = None


def eager_step(state: DecodeState, n_new: int) -> Step:
    """A step over n_new tokens continuing the cache (prefill, chunks): reads the first filled slots only.

    A token sees the earlier slots of its row that are not left padding; a padding token sees only
    itself (so nothing is ever computed over an empty row).
    """
    step = span_step(state.take(n_new), n_new, state.offset)
    state.slot.fill_(state.length)
    return step


def span_step(start: int, n_new: int, offset: Tensor) -> Step:
    """Slots start..start+n_new-1, reading the first start+n_new slots; `offset` (B,) is each row's left padding.

    For loops that fill layers to different depths (early exit, self-speculation); `eager_step` also
    advances the shared state.
    """
    device = offset.device
    slots = torch.arange(start, start + n_new, device=device)  # (T,)
    cols = torch.arange(start + n_new, device=device)  # (n,)
    causal = cols[None, :] <= slots[:, None]  # (T, n)
    real = cols[None, None, :] >= offset[:, None, None]  # (B, 1, n)
    mask = causal & (real | (cols[None, :] == slots[:, None]))  # (B, T, n)
    positions = (slots[None, :] - offset[:, None]).clamp_min(0)  # (B, T)
    return Step(slots, mask.unsqueeze(1), positions, n_read=start + n_new, offset=offset)


def static_step(state: DecodeState) -> Step:
    """The one-token step of the compiled decode loop: static shapes, the whole buffers read under a mask.

    Reads only device tensors (no host state), so a compiled graph never sees a changing int.
    """
    slots = state.slot  # (1,)
    cols = torch.arange(state.max_len, device=slots.device)
    mask = (cols[None, :] >= state.offset[:, None]) & (cols[None, :] <= slots)  # (B, L)
    positions = (slots - state.offset)[:, None]  # (B, 1)
    return Step(slots, mask[:, None, None, :], positions, offset=state.offset)


class LayerCache:
    """Base class: preallocated buffers, sized `(batch_size, ..., max_len, d)` (slots on dim -2).

    `fillable` caches take `append(k, v, step)` without attention (an early exit fills the layers it skipped).
    """

    name: ClassVar[str]
    fillable: ClassVar[bool] = False

    def __init__(self, batch_size: int, max_len: int) -> None:
        self.batch_size = batch_size
        self.max_len = max_len
        self.buffers: dict[str, Tensor] = {}

    @classmethod
    def build(cls, attn: Any, batch_size: int, max_len: int, device=None, dtype=None, **kwargs: Any) -> LayerCache:
        """The cache for one layer of attention `attn` (its shapes; never a reference to it)."""
        shape = (attn.n_kv_head, attn.head_size)
        make: Callable[..., LayerCache] = cls  # subclasses take (batch_size, max_len, n_kv_head, head_size, ...)
        return make(batch_size, max_len, *shape, device=device, dtype=dtype, **kwargs)

    def nbytes(self) -> int:
        """Bytes held by this cache, measured from its tensors."""
        return sum(t.numel() * t.element_size() for t in self.buffers.values())

    def bytes_per_token(self) -> float:
        """Bytes per cached token (per sequence) for this layer."""
        return self.nbytes() / (self.batch_size * self.max_len)

    def equals(self) -> str | None:
        """The cache kind this one computes exactly the same as at its settings and length (e.g. a
        full-precision window that holds every token), if any: the evaluation warns about it."""
        return None

    def write(self, name: str, x: Tensor, step: Step) -> None:
        """Write the new tokens' entries x (..., T, d) at the step's slots."""
        buf = self.buffers[name]
        buf.index_copy_(buf.dim() - 2, step.slots, x.to(buf.dtype))

    def read(self, name: str, step: Step) -> Tensor:
        """The buffer, narrowed to the first `step.n_read` slots in eager prefill."""
        buf = self.buffers[name]
        return buf if step.n_read is None else buf.narrow(buf.dim() - 2, 0, step.n_read)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, step: Step) -> Tensor:
        """Store the new tokens and return their attention outputs; q, k, v are (B, nh, T, hs)."""
        raise NotImplementedError(f"{type(self).__name__} is read by its attention's decode, not by attend")


class Caches(list):
    """One cache per layer plus the decode state they share."""

    def __init__(self, caches: Sequence[LayerCache], state: DecodeState) -> None:
        super().__init__(caches)
        self.state = state

    def reset(self, offset: Tensor | None = None) -> None:
        self.state.reset(offset)

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self)


@dataclass(frozen=True)
class CacheKind:
    name: str
    build: Callable[..., LayerCache]
    layouts: tuple[str, ...]  # the cache layouts (what an attention writes per token) this kind can hold

    def serves(self, layout: str) -> bool:
        return layout in self.layouts


CACHES: dict[str, CacheKind] = {}


def register_cache(name: str, layouts: Sequence[str] = ("kv",)) -> Callable[[Any], Any]:
    """Register a cache class (its `build` classmethod) or a builder `(attn, batch, max_len, device, dtype, **kw)`
    for the cache `layouts` it can hold."""

    def wrap(obj: Any) -> Any:
        if isinstance(obj, type) and issubclass(obj, LayerCache):
            obj.name = name
            CACHES[name] = CacheKind(name, obj.build, tuple(layouts))
        else:
            CACHES[name] = CacheKind(name, obj, tuple(layouts))
        return obj

    return wrap


def caches_for(layout: str) -> list[str]:
    """The registered cache kinds that can hold `layout`, in registration order."""
    return [k for k, c in CACHES.items() if c.serves(layout)]


def cannot_serve(kind: str, attention: str, layout: str) -> ValueError:
    """The one error for a cache kind that does not fit an attention (which writes `layout`)."""
    fits = sorted(caches_for(layout))
    if kind not in CACHES:
        return ValueError(f"unknown cache {kind!r}; registered: {sorted(CACHES)} (attention {attention!r}: {fits})")
    return ValueError(
        f"cache {kind!r} cannot serve attention {attention!r} (it writes the {layout!r} layout); "
        f"caches that serve it: {fits}"
    )


@register_cache("kv", layouts=("kv",))
class KVCache(LayerCache):
    """The standard cache: keys and values, (B, n_kv_head, max_len, hs) each."""

    fillable: ClassVar[bool] = True

    def __init__(self, batch_size: int, max_len: int, n_head: int, head_size: int, device=None, dtype=None) -> None:
        super().__init__(batch_size, max_len)
        shape = (batch_size, n_head, max_len, head_size)
        self.buffers = {
            "k": torch.zeros(shape, device=device, dtype=dtype),
            "v": torch.zeros(shape, device=device, dtype=dtype),
        }

    def append(self, k: Tensor, v: Tensor, step: Step) -> None:
        """Write keys/values of new tokens (also used to fill layers an early exit skipped)."""
        self.write("k", k, step)
        self.write("v", v, step)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, step: Step) -> Tensor:
        self.append(k, v, step)
        return sdpa(q, self.read("k", step), self.read("v", step), attn_mask=step.mask)
