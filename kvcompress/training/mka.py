"""PretrainedMKA's stage hooks (`phase=mka_frozen_base`, `phase=mka_base_then_frozen_base`).

- `silence_ka_layers` (before a base stage): zero every KA layer's v projection, so ka(A) = 0 and the base trains
  as a plain model whatever `model.attention_kwargs.zero_init` says.
- `StartKALayers(zero_init)` (before the MKA stage): scores the frozen base alone (the KA layers silenced) on the
  validation windows, as `start_base_val_ppl`, `start_base_val_pos_ppl` and per window in the stage folder
  (`windows_base.safetensors`), then starts the KA layers: their v projection at zero (`zero_init=True`: MKA starts
  exactly at the base) or N(0, std) like every other Linear (`zero_init=False`, report 001's start), drawn from the
  run's seed. The stage's `validate_before` then records MKA at its start (`start_val_*`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from kvcompress.data.batch import split_batch
from kvcompress.evaluation.metrics import DEFAULT_BUCKETS
from kvcompress.evaluation.windows import window_losses, write_windows
from kvcompress.methods.mka import KALayer, MKAAttention
from kvcompress.training.module import token_cross_entropy

BASE_WINDOWS = "windows_base.safetensors"


def ka_layers(net: Any) -> list[KALayer]:
    layers = [m.mka for m in net.modules() if isinstance(m, MKAAttention) and m.mka is not None]
    if not layers:
        raise TypeError(f"phase=mka_* needs a model with KA layers (attention=mka), got {type(net).__name__}")
    return layers


@torch.no_grad()
def _silence(layers: Sequence[KALayer]) -> None:
    for layer in layers:
        layer.v_proj.weight.zero_()
        layer.v_proj.bias.zero_()


def silence_ka_layers(*, runner: Any, stage: Any, net: Any, datamodule: Any) -> dict[str, Any]:
    """Before a base stage: ka(A) = 0 in every KA layer (which the stage freezes), so the base trains alone."""
    layers = ka_layers(net)
    _silence(layers)
    return {"ka_layers_silenced": len(layers)}


@torch.no_grad()
def token_losses(net: Any, loader: Any) -> Tensor:
    """Per-token losses (windows, seq_len) of `net` on every batch of `loader`, in loader order."""
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    parts = []
    for batch in loader:
        ids = split_batch(batch)[0].to(device)
        parts.append(token_cross_entropy(net(ids[:, :-1]), ids[:, 1:]).double().cpu())
    net.train(was_training)
    return torch.cat(parts)


class StartKALayers:
    """Before the MKA stage: score the frozen base alone, then start the KA layers (see the module docstring)."""

    def __init__(self, zero_init: bool = True, std: float = 0.02, buckets: Sequence[Sequence[int]] | None = None):
        if not isinstance(zero_init, bool):
            raise ValueError(f"model.attention_kwargs.zero_init must be true or false, got {zero_init!r}")
        if not (isinstance(std, int | float) and 0 < std < math.inf):
            raise ValueError(f"StartKALayers: std must be a positive number, got {std!r}")
        self.zero_init = zero_init
        self.std = float(std)
        self.buckets = [(int(lo), int(hi)) for lo, hi in (buckets or DEFAULT_BUCKETS)]

    def __call__(self, *, runner: Any, stage: Any, net: Any, datamodule: Any) -> dict[str, Any]:
        layers = ka_layers(net)
        _silence(layers)
        losses = token_losses(net, datamodule.val_dataloader(shard=False))
        ids = torch.as_tensor(datamodule.val_dataset.indices, dtype=torch.int64)
        records = {"ids": ids, **window_losses(losses, self.buckets)}
        if runner.is_writer:
            write_windows(runner.folder, records, {"stage": stage.name, "weights": "base"}, filename=BASE_WINDOWS)
        if not self.zero_init:  # the run's seed draws the start, so a rerun starts alike
            generator = torch.Generator().manual_seed(int(runner.fingerprint.get("seed", 0)))
            with torch.no_grad():
                for layer in layers:
                    weight = layer.v_proj.weight
                    weight.copy_(torch.randn(weight.shape, generator=generator, dtype=weight.dtype) * self.std)
        pos = {k.split(":", 1)[1]: math.exp(float(v.mean())) for k, v in records.items() if k.startswith("bucket:")}
        loss = float(losses.mean())
        return {
            "start_base_val_loss": loss,
            "start_base_val_ppl": math.exp(loss),
            "start_base_val_pos_ppl": pos,
            "ka_init": "zero" if self.zero_init else f"normal(0, {self.std})",
        }
