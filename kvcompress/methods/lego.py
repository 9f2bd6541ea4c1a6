"""LEGO (METHODS.md section 6, report 002): a GPT-NeoX with a shallow and a deep exit, trained in two phases.

- Phase 1 trains the embedding, the layers below the shallow exit and its head (`shallow_*` names).
- Hard-example mining: every training token's shallow confidence (max softmax probability); the lowest
  `ratio` of them are hard (`hard_mask`, exact count, ties broken by position).
- Phase 2 trains the deep layers and the final head (`deep_layers.*`, `final_layer_norm.*`, `embed_out.*`) on the
  hard tokens; the shallow part, its head included, stays as phase 1 left it.
- Two-stage inference: a token whose shallow confidence >= `threshold` takes the shallow exit, else the deep one.
  `calibrate_threshold` picks the confidence that routes exactly `ratio` of the calibration tokens deep. The
  threshold is a buffer, so checkpoints carry it. Compute cost = (shallow * L_s + deep * L_d) / (N * L_d).

The decode loops (true early exit, self-speculation) are in `kvcompress.methods.lego_decode`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from kvcompress.models.caches import Caches, eager_step
from kvcompress.models.config import ModelConfig
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
    "hard_mask",
    "hard_windows",
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

    threshold: Tensor  # a buffer: the shallow confidence at or above which a token exits early

    def __init__(self, cfg: ModelConfig, exits: Sequence[int] | None = None, threshold: float = 0.5) -> None:
        super().__init__(cfg)
        self.shallow_exit, self.deep_exit = check_exits(exits, cfg.n_layer)
        blocks = list(self.layers)
        del self.layers
        self.shallow_layers = nn.ModuleList(blocks[: self.shallow_exit])
        self.deep_layers = nn.ModuleList(blocks[self.shallow_exit :])
        # A plain list (GPTNeoX declares a ModuleList): the blocks are registered once, under the names above.
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
        return confidence(shallow_logits) >= (self.threshold if threshold is None else threshold)

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
