"""Model configuration: a dataclass with a name table (litgpt-style)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

# Shapes of the released Pythia models, plus tiny shapes for tests.
NAMED_SHAPES: dict[str, dict[str, Any]] = {
    "pythia-14m": dict(n_layer=6, n_embd=128, n_head=4, intermediate_size=512),
    "pythia-70m": dict(n_layer=6, n_embd=512, n_head=8, intermediate_size=2048),
    "pythia-160m": dict(n_layer=12, n_embd=768, n_head=12, intermediate_size=3072),
    # Test shapes: small vocab, few layers, still 25% rotary over >= 4 head dims.
    "tiny": dict(n_layer=2, n_embd=64, n_head=4, intermediate_size=128, vocab_size=512, max_position_embeddings=256),
    "tiny-sequential": dict(
        n_layer=2,
        n_embd=64,
        n_head=4,
        intermediate_size=128,
        vocab_size=512,
        max_position_embeddings=256,
        use_parallel_residual=False,
    ),
}


@dataclass
class ModelConfig:
    name: str = "pythia-70m"
    vocab_size: int = 50304
    n_layer: int = 6
    n_embd: int = 512
    n_head: int = 8
    # Grouped K/V heads (GQA): None = n_head (multi-head), 1 = MQA; must divide n_head.
    n_kv_head: int | None = None
    intermediate_size: int = 2048
    rotary_pct: float = 0.25
    rotary_base: float = 10000.0
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5
    use_parallel_residual: bool = True
    # Which registered attention each layer uses, and its extra settings (e.g. {"rank": 320}).
    attention: str = "standard"
    attention_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_kv_head is not None and (
            isinstance(self.n_kv_head, bool)
            or not isinstance(self.n_kv_head, int)
            or not 1 <= self.n_kv_head <= self.n_head
            or self.n_head % self.n_kv_head
        ):
            raise ValueError(
                f"model n_kv_head={self.n_kv_head!r} must be null or a divisor of n_head={self.n_head} "
                "(1 = MQA, n_head = multi-head)"
            )
        if not 0.0 <= self.rotary_pct <= 1.0:
            raise ValueError(f"rotary_pct must be in [0, 1], got {self.rotary_pct}")
        self.attention_kwargs = dict(self.attention_kwargs)

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        """The number of K/V heads (n_kv_head, or n_head when it is None)."""
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def rotary_ndims(self) -> int:
        return int(self.head_size * self.rotary_pct)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in NAMED_SHAPES:
            raise ValueError(f"unknown model name {name!r}; known: {sorted(NAMED_SHAPES)}")
        return cls(name=name, **{**NAMED_SHAPES[name], **overrides})

    def with_(self, **changes: Any) -> ModelConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
