"""The method table: one row per attention x cache kind, and every shared test runs over every row
(`tests/test_methods.py`). A new method or cache kind adds a row here, not a test file of copies.

Columns:
- `attention`, `attention_kwargs`: the layer, at the `tiny` shape (widths as the method takes them);
- `overrides`: `ModelConfig` fields on top of the shape, here and at Pythia-70M's (e.g. `{"n_kv_head": 2}`: GQA);
- `cache`, `cache_kwargs`: the cache kind decoding uses (`native`: the attention's own);
- `exact`: cached decoding equals the uncached model (to 1e-10 in fp64); else the cache is lossy, and its logits
  must stay within `lossy_bound` x max |logit| of the exact ones (and differ from them);
- `ragged_exact`: a left-padded row decodes as the prompt alone; `chunk_consistent`: prefilling in two chunks
  equals prefilling at once (with the same cache);
- `bytes_per_token(cfg, element_size, max_len)`: the formula the measured cache bytes per token (all layers, one
  sequence) must equal, checked at the tiny shape in fp32 and bf16 and at Pythia-70M's shape in fp32;
- `degenerate`: a setting of the method that must reproduce the base model exactly (`kwargs` applied to the
  method's model after loading the base's weights; `set_identity` calls that method on every attention);
- `params_70m`: (attention kwargs at Pythia-70M, the expected parameter count);
- `smoke`: overrides of a `debug=smoke` training run whose metrics.json cache bytes must equal the formula;
- `compiled_in_make_test`: the compiled decode step is compared with eager in `make test` (slow elsewhere);
- `slow`: the row's whole battery runs under the `slow` marker (a combination whose parts cheaper rows cover).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvcompress.models import ModelConfig

PYTHIA_70M = 70_426_624
BytesFormula = Callable[[ModelConfig, int, int], float]


def kv_bytes(cfg: ModelConfig, e: int, max_len: int) -> float:
    return cfg.n_layer * 2 * cfg.kv_heads * cfg.head_size * e  # K and V of the n_kv_head heads


@dataclass(frozen=True)
class Degenerate:
    """The method's model with the base's weights, `kwargs` as its attention kwargs, and `set_identity` called on
    every attention when asked: it must equal the base model."""

    kwargs: dict[str, Any]
    set_identity: bool = False


@dataclass(frozen=True)
class Row:
    name: str
    attention: str = "standard"
    attention_kwargs: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)
    cache: str = "native"
    cache_kwargs: dict[str, Any] = field(default_factory=dict)
    exact: bool = True
    lossy_bound: float = 0.0
    ragged_exact: bool = True
    chunk_consistent: bool = True
    bytes_per_token: BytesFormula = kv_bytes
    degenerate: Degenerate | None = None
    params_70m: tuple[dict[str, Any], int] | None = None
    smoke: tuple[str, ...] | None = None
    compiled_in_make_test: bool = False
    slow: bool = False

    def __str__(self) -> str:
        return self.name


def int8_bytes(cfg: ModelConfig, e: int, max_len: int) -> float:
    return cfg.n_layer * 2 * cfg.kv_heads * (cfg.head_size + e)  # int8 codes + one scale per token and K/V head


def int4_bytes(group: int, window: int) -> BytesFormula:
    def formula(cfg: ModelConfig, e: int, max_len: int) -> float:
        hs, G, R = cfg.head_size, group, window
        n_groups = -(-max_len // G)
        k = (n_groups * G * hs // 2 + n_groups * 2 * hs * e) / max_len  # packed codes (whole groups), scale + zero
        v = hs // 2 + 2 * (hs // min(G, hs)) * e  # packed codes, scale + zero per channel group
        win = 2 * R * hs * e / max_len  # the full-precision window, spread over the slots
        return cfg.n_layer * cfg.kv_heads * (k + v + win)

    return formula


def vdproj_bytes(cfg: ModelConfig, e: int, max_len: int) -> float:
    """[K, V_c] (or [K_rot, K_c, V_c] with compress_k), widths from the model's attention kwargs; with grouped heads
    K has n_kv_head heads and a share `rank` is a share of V's n_kv_head x head_size width."""
    kw, g = cfg.attention_kwargs, cfg.kv_heads
    width = lambda w, full: round(w * full) if isinstance(w, float) else w  # noqa: E731
    v = width(kw["rank"], g * cfg.head_size)
    if not kw.get("compress_k"):
        return cfg.n_layer * (g * cfg.head_size + v) * e
    k = width(kw["k_rank"], g * (cfg.head_size - cfg.rotary_ndims))
    return cfg.n_layer * (g * cfg.rotary_ndims + k + v) * e


def vdproj_quant_bytes(group: int | None = None) -> BytesFormula:
    """Palu: vdproj_bytes with the latents V_c (and K_c) as int8 + a scale per token (group None), or as packed
    4-bit codes + a scale and a zero point per token and group of `group` channels."""

    def latent(w: int, e: int) -> float:
        if group is None:
            return w + e
        n_groups = next(n for n in range(-(-w // group), w + 1) if w % n == 0)  # the fewest equal groups <= group
        return w // 2 + 2 * n_groups * e

    def formula(cfg: ModelConfig, e: int, max_len: int) -> float:
        kw = cfg.attention_kwargs
        width = lambda w, full: round(w * full) if isinstance(w, float) else w  # noqa: E731
        v = latent(width(kw["rank"], cfg.n_embd), e)
        if not kw.get("compress_k"):
            return cfg.n_layer * (cfg.n_embd * e + v)
        k = latent(width(kw["k_rank"], cfg.n_head * (cfg.head_size - cfg.rotary_ndims)), e)
        return cfg.n_layer * (cfg.n_head * cfg.rotary_ndims * e + k + v)

    return formula


def mka_bytes(cfg: ModelConfig, e: int, max_len: int) -> float:
    # [K, V] (n_kv_head heads) everywhere, plus the KA layer's own [K, A] (n_head heads) in the last
    return (cfg.n_layer * 2 * cfg.kv_heads * cfg.head_size + 2 * cfg.n_embd) * e


def gqa_params(n_kv_head: int, base: int = PYTHIA_70M) -> int:
    """Pythia-70M's parameters with n_kv_head of its 8 K/V heads: the fused QKV loses (8 - g) x 2 x 64 rows of
    512 weights + 1 bias in each of the 6 layers."""
    return base - 6 * (8 - n_kv_head) * 2 * 64 * (512 + 1)


def eviction_bytes(budget: int, per_slot: int = 0, per_row: int = 0) -> BytesFormula:
    """`budget` slots per head of K, V (the model's dtype) and an int32 position, plus `per_slot` state bytes per
    slot (H2O's scores, Knorm's norms) and `per_row` bytes per row (SnapKV's frozen boundary), per layer."""

    def formula(cfg: ModelConfig, e: int, max_len: int) -> float:
        slots = min(budget, max_len)
        per_layer = cfg.n_head * slots * (2 * cfg.head_size * e + 4 + per_slot) + per_row
        return cfg.n_layer * per_layer / max_len

    return formula


def eviction_row(kind: str, per_slot: int = 0, per_row: int = 0, compiled: bool = False, **kwargs: Any) -> Row:
    """A budget of 6 slots: under the tests' contexts (7 to 17 tokens), so eviction really happens. Observed logit
    errors are 0.06-0.08 x max |logit|; the bound of 0.5 sits between them and a cache that reads garbage (~1)."""
    return Row(
        kind, cache=kind, cache_kwargs={"budget": 6, **kwargs}, exact=False, lossy_bound=0.5, chunk_consistent=False,
        bytes_per_token=eviction_bytes(6, per_slot, per_row), compiled_in_make_test=compiled,
    )  # fmt: skip


TINY_C, TINY_K = 64, 4 * (16 - 4)  # tiny: width 64, 4 heads of 16 with 4 rotary dims each
ROWS = [
    Row("kv", cache="kv", params_70m=({}, PYTHIA_70M), smoke=(), compiled_in_make_test=True),
    Row(
        "fp16", cache="fp16", exact=False, lossy_bound=1e-3,
        bytes_per_token=lambda cfg, e, max_len: cfg.n_layer * 2 * cfg.n_embd * 2, smoke=("cache=fp16",),
    ),
    Row("int8", cache="int8", exact=False, lossy_bound=0.05, bytes_per_token=int8_bytes, smoke=("cache=int8",)),
    # A small window and groups, so that decoding reads codes, the window and a group being filled.
    Row(
        "int4", cache="int4", cache_kwargs={"group_size": 4, "window": 6}, exact=False, lossy_bound=0.1,
        ragged_exact=False, chunk_consistent=False, bytes_per_token=int4_bytes(4, 6), compiled_in_make_test=True,
    ),
    Row(
        "vdproj", "vdproj", {"rank": 32}, bytes_per_token=vdproj_bytes,
        degenerate=Degenerate({"rank": TINY_C}, set_identity=True),
        params_70m=({"rank": 320}, PYTHIA_70M + 1_971_072),  # the report's total is 6,144 lower (METHODS.md)
        smoke=("model=vdproj", "phase=vdproj_end_to_end"),
    ),
    Row(
        "vdproj_k", "vdproj", {"rank": 32, "compress_k": True, "k_rank": 24}, bytes_per_token=vdproj_bytes,
        degenerate=Degenerate({"rank": TINY_C, "compress_k": True, "k_rank": TINY_K}, set_identity=True),
    ),
    Row(
        "vdproj_int8", "vdproj", {"rank": 32}, cache="vdproj_int8", exact=False, lossy_bound=0.05,
        bytes_per_token=vdproj_quant_bytes(), params_70m=({"rank": 320}, PYTHIA_70M + 1_971_072),
    ),
    Row(
        "vdproj_k_int8", "vdproj", {"rank": 32, "compress_k": True, "k_rank": 24}, cache="vdproj_int8", exact=False,
        lossy_bound=0.05, bytes_per_token=vdproj_quant_bytes(),
    ),
    Row(
        "vdproj_int4", "vdproj", {"rank": 32, "compress_k": True, "k_rank": 24}, cache="vdproj_int4",
        cache_kwargs={"group_size": 16}, exact=False, lossy_bound=0.1, bytes_per_token=vdproj_quant_bytes(16),
    ),
    Row("ka", "ka", params_70m=({}, PYTHIA_70M), smoke=("model=ka",)),
    Row("ka_plain", cache="ka_plain", exact=False, lossy_bound=1.0, ragged_exact=False),
    Row(
        "ka_adapter", "ka_adapter", cache="ka", exact=False, lossy_bound=1.0, ragged_exact=False,
        degenerate=None, params_70m=({}, PYTHIA_70M + 50_688),  # 6 x (LayerNorm(64) + 2 x Linear(64, 64))
    ),
    Row(
        "mka", "mka", {"layers": [-1], "zero_init": False}, bytes_per_token=mka_bytes,
        degenerate=Degenerate({"layers": [-1], "zero_init": True}),
        params_70m=({"layers": [-1]}, PYTHIA_70M + 788_992),  # LayerNorm(512) + 3 x Linear(512, 512)
    ),
    eviction_row("streaming_llm", sinks=2),
    eviction_row("h2o", per_slot=4, compiled=True, window=2),  # ~11 s compiled: state, protection, scatter
    eviction_row("snapkv", per_row=4, window=2, kernel_size=3),
    eviction_row("tova"),
    eviction_row("knorm", per_slot=2),
    # Grouped K/V heads (GQA; n_kv_head 1 = MQA) at the tiny shape's 4 heads, alone and with each method.
    Row(
        "gqa2_kv", cache="kv", overrides={"n_kv_head": 2}, params_70m=({}, gqa_params(2)),
        smoke=("++model.overrides.n_kv_head=2",),
    ),
    Row("mqa_kv", cache="kv", overrides={"n_kv_head": 1}, params_70m=({}, gqa_params(1))),
    Row(
        "gqa2_int8", cache="int8", overrides={"n_kv_head": 2}, exact=False, lossy_bound=0.05,
        bytes_per_token=int8_bytes,
    ),
    Row(
        "gqa2_int4", cache="int4", cache_kwargs={"group_size": 4, "window": 6}, overrides={"n_kv_head": 2},
        exact=False, lossy_bound=0.1, ragged_exact=False, chunk_consistent=False, bytes_per_token=int4_bytes(4, 6),
        slow=True,
    ),
    # KA-Attention with grouped K/V: one A per group (the mean of its heads' outputs), so the KA cache is exact.
    Row(
        "gqa2_ka", "ka", overrides={"n_kv_head": 2}, params_70m=({}, gqa_params(2)),
    ),
    Row("mqa_ka", "ka", overrides={"n_kv_head": 1}, slow=True),
    # The KA cache on a standard GQA model (report 000's lossy cache): per group, the mean of its heads' outputs.
    Row(
        "gqa2_ka_plain", cache="ka_plain", overrides={"n_kv_head": 2}, exact=False, lossy_bound=1.0,
        ragged_exact=False, slow=True,
    ),
    Row(
        "gqa2_ka_adapter", "ka_adapter", cache="ka", overrides={"n_kv_head": 2}, exact=False, lossy_bound=1.0,
        ragged_exact=False, params_70m=({}, gqa_params(2) + 50_688),
    ),
    # V-DProj with grouped K/V: V (n_kv_head x head_size wide) -> rank, shared by all heads; K keeps n_kv_head heads.
    Row(
        "gqa2_vdproj", "vdproj", {"rank": 16}, overrides={"n_kv_head": 2}, bytes_per_token=vdproj_bytes,
        degenerate=Degenerate({"rank": 32}, set_identity=True),
        # Linear(128, 80) + Linear(80, 128) in each of 6 layers
        params_70m=({"rank": 80}, gqa_params(2) + 6 * (2 * 80 * 128 + 80 + 128)),
    ),
    Row(
        "gqa2_vdproj_k", "vdproj", {"rank": 16, "compress_k": True, "k_rank": 12}, overrides={"n_kv_head": 2},
        bytes_per_token=vdproj_bytes,
        degenerate=Degenerate({"rank": 32, "compress_k": True, "k_rank": 24}, set_identity=True), slow=True,
    ),
    Row(
        "gqa2_mka", "mka", {"layers": [-1], "zero_init": False}, overrides={"n_kv_head": 2},
        bytes_per_token=mka_bytes, degenerate=Degenerate({"layers": [-1], "zero_init": True}), slow=True,
    ),
]  # fmt: skip
ROWS_BY_NAME = {row.name: row for row in ROWS}
