"""Structured configs: typed schemas for config groups, registered in Hydra's ConfigStore.

`conf/eval/default.yaml` starts from the `eval/schema` node, so a misspelled key or a wrong type fails at
composition, and the defaults below are the only ones (code reads them from the dataclass, never restates them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore


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


@dataclass
class AutoregressiveConfig:
    """PPL decoding token by token with the cache (for caches that are not exact), on `max_batches` val batches."""

    enabled: bool = False
    max_batches: int = 8


@dataclass
class ReversalConfig:
    """The reversal-curse probe on `n_facts` synthetic facts."""

    enabled: bool = False
    n_facts: int = 100


@dataclass
class EvalConfig:
    """After training: measured cache size, decode speed and optional extra evaluations."""

    cache: str = "native"  # the run's cache (conf/eval/default.yaml: ${cache.name})
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    autoregressive: AutoregressiveConfig = field(default_factory=AutoregressiveConfig)
    reversal: ReversalConfig = field(default_factory=ReversalConfig)
    caches: list[str] = field(default_factory=list)  # more cache kinds to measure side by side, e.g. [kv, ka]
    # More evaluations by name: {name: {_target_: fn(net=, datamodule=) -> metrics}}, e.g. eval=lego.
    extra: dict[str, Any] = field(default_factory=dict)
    cache_kwargs: dict[str, Any] = field(default_factory=dict)  # the run's cache settings (train.py: cache.kwargs)


def register_configs() -> None:
    ConfigStore.instance().store(group="eval", name="schema", node=EvalConfig)


register_configs()
