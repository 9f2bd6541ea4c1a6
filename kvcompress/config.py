"""Structured configs: typed schemas for config groups, registered in Hydra's ConfigStore.

`conf/eval/default.yaml` starts from the `eval/schema` node, so a misspelled key or a wrong type fails at
composition, and the defaults below are the only ones (code reads them from the dataclass, never restates them).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore


def require_int(value: Any, setting: str, minimum: int) -> None:
    """A ValueError naming `setting` unless `value` is an integer >= minimum (checked when a config becomes a
    dataclass: `OmegaConf.to_object`, in `run.prepare`)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{setting} must be an integer >= {minimum}, got {value!r}")


@dataclass
class CacheConfig:
    """A cache kind and its own settings: the `cache` group (conf/cache/<kind>.yaml) and each item of
    `eval.caches`. `label` names its results (default: the kind, plus its settings when it has any)."""

    name: str = "native"
    kwargs: dict[str, Any] = field(default_factory=dict)
    label: str | None = None

    @property
    def key(self) -> str:
        if self.label:
            return self.label
        if not self.kwargs:
            return self.name
        return f"{self.name}(" + ",".join(f"{k}={v}" for k, v in sorted(self.kwargs.items())) + ")"

    @classmethod
    def parse(cls, item: Any, setting: str = "eval.caches") -> CacheConfig:
        """A kind's name, a mapping {name, kwargs, label}, or a CacheConfig."""
        if isinstance(item, CacheConfig):
            return item
        if isinstance(item, str):
            return cls(item)
        if isinstance(item, Mapping) and isinstance(item.get("name"), str):
            unknown = set(item) - {"name", "kwargs", "label"}
            if unknown:
                raise ValueError(f"{setting}: {item!r} has unknown keys {sorted(unknown)} (use name, kwargs, label)")
            return cls(str(item["name"]), dict(item.get("kwargs") or {}), item.get("label"))
        raise ValueError(f"{setting}: {item!r} is neither a cache kind's name nor {{name: ..., kwargs: {{...}}}}")


@dataclass
class DecodeConfig:
    """Decode speed: `new_tokens` tokens after a `prompt_len` prompt, `batch_size` sequences (< 2 tokens: skip).

    TTFT (prefill) and TPOT (median decode step), medians of `repeats` generations, as in the bench;
    `compile` times the torch.compile'd decode step.
    """

    batch_size: int = 1
    prompt_len: int = 64
    new_tokens: int = 64
    repeats: int = 3
    compile: bool = False

    def __post_init__(self) -> None:
        for name, minimum in (("batch_size", 1), ("prompt_len", 1), ("new_tokens", 0), ("repeats", 1)):
            require_int(getattr(self, name), f"eval.decode.{name}", minimum)


@dataclass
class AutoregressiveConfig:
    """PPL decoding token by token with the cache (for caches that are not exact), on `max_batches` val batches."""

    enabled: bool = False
    max_batches: int = 8

    def __post_init__(self) -> None:
        if self.enabled:
            require_int(self.max_batches, "eval.autoregressive.max_batches (with eval.autoregressive.enabled)", 1)


@dataclass
class ReversalConfig:
    """The reversal-curse probe on `n_facts` synthetic facts."""

    enabled: bool = False
    n_facts: int = 100

    def __post_init__(self) -> None:
        require_int(self.n_facts, "eval.reversal.n_facts", 1)


@dataclass
class ContextCheckConfig:
    """Does the model use context beyond its last `window` tokens? On the validation windows (the first
    `max_batches` batches; null: all), the mean loss at loss positions [lo, hi) of `positions` (position p predicts
    token p + 1; null: the last quarter of the window) with the full context, and with only the last `window`
    tokens (the sub-window `ids[p - window + 1 : p + 2]`, re-run from position 0: with rotary positions, standard
    attention scores it as at position p). metrics.json `context_check`, windows.safetensors `context:*`."""

    enabled: bool = False
    window: int = 16
    positions: list[int] | None = None
    max_batches: int | None = None

    def span(self, seq_len: int) -> tuple[int, int]:
        """The loss positions [lo, hi) for windows of `seq_len` positions; a ValueError naming the setting when
        the settings do not fit them."""
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"eval.context_check.window must be an integer >= 1, got {self.window!r}")
        if self.max_batches is not None and self.max_batches < 1:
            raise ValueError(f"eval.context_check.max_batches must be null or >= 1, got {self.max_batches!r}")
        if self.positions is None:
            lo, hi = seq_len - seq_len // 4, seq_len
        elif len(self.positions) != 2:
            raise ValueError(f"eval.context_check.positions must be [lo, hi] or null, got {list(self.positions)}")
        else:
            lo, hi = int(self.positions[0]), min(int(self.positions[1]), seq_len)
        if not self.window <= lo < hi:
            raise ValueError(
                f"eval.context_check.positions [{lo}, {hi}) (clipped to seq_len={seq_len}) must be a non-empty range "
                f"starting at or after eval.context_check.window={self.window} (earlier positions have no context "
                "to cut)"
            )
        return lo, hi


@dataclass
class LongContextConfig:
    """Position-wise PPL past the training context: `windows` contiguous validation windows of each length in
    `lengths` (at most the model's position limit), decoded token by token through each cache (`caches`, or every
    cache of eval.caches when empty), in log-scale position buckets (kvcompress.evaluation.long_context)."""

    enabled: bool = False
    lengths: list[int] = field(default_factory=lambda: [512])
    windows: int = 8
    caches: list[Any] = field(default_factory=list)


@dataclass
class PasskeyConfig:
    """Passkey retrieval: a `digits`-digit key at each relative depth of filler text of each length, `trials` keys
    a cell; greedy accuracy and the key's mean log-probability per cache (`caches`, or every cache of eval.caches
    when empty)."""

    enabled: bool = False
    lengths: list[int] = field(default_factory=lambda: [256, 500])
    depths: list[float] = field(default_factory=lambda: [0.1, 0.5, 0.9])
    trials: int = 4
    digits: int = 5
    caches: list[Any] = field(default_factory=list)


@dataclass
class EvalConfig:
    """After training: measured cache size, decode speed and optional extra evaluations."""

    cache: CacheConfig = field(default_factory=CacheConfig)  # the run's cache (conf/eval/default.yaml: ${cache})
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    autoregressive: AutoregressiveConfig = field(default_factory=AutoregressiveConfig)
    reversal: ReversalConfig = field(default_factory=ReversalConfig)
    context_check: ContextCheckConfig = field(default_factory=ContextCheckConfig)
    long_context: LongContextConfig = field(default_factory=LongContextConfig)
    passkey: PasskeyConfig = field(default_factory=PasskeyConfig)
    # More caches to measure side by side: kinds' names or {name, kwargs, label}, e.g. [kv, {name: int4, kwargs:
    # {group_size: 16}}]; each gets its own settings (CacheConfig.parse).
    caches: list[Any] = field(default_factory=list)
    # More evaluations by name: {name: {_target_: fn(net=, datamodule=) -> metrics}}, e.g. eval=lego.
    extra: dict[str, Any] = field(default_factory=dict)

    def all_caches(self) -> dict[str, CacheConfig]:
        """By result key: the run's cache first, under its label or name, then the others under theirs (a key
        given twice is measured once)."""
        out = {self.cache.label or self.cache.name: self.cache}
        for item in self.caches:
            cache = CacheConfig.parse(item)
            out.setdefault(cache.key, cache)
        return out

    def caches_for(self, chosen: list[Any], setting: str) -> dict[str, CacheConfig]:
        """The caches `chosen` for one evaluation (by key), or every cache when `chosen` is empty."""
        if not chosen:
            return self.all_caches()
        return {c.key: c for c in (CacheConfig.parse(item, setting) for item in chosen)}


def register_configs() -> None:
    ConfigStore.instance().store(group="eval", name="schema", node=EvalConfig)


register_configs()
