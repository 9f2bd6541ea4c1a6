"""Per-window losses for paired comparisons (`kvcompress.evaluation.stats.paired_ratio`): the mean token loss of
each validation window, teacher-forced and decoded with each named cache, with a hash of the windows so that two
runs are paired only when they scored the same text.

`WindowLosses` is an evaluation (`eval.extra.<name>`, called with `net=` and `datamodule=` after training) and a
stage hook (`phase.stages.<stage>.before`: the starting weights, e.g. the mean-pooled model of phase=gqa_uptrain,
recorded under `start_windows` so that a reused stage keeps it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch

from kvcompress.evaluation import metrics
from kvcompress.models import GPTNeoX

__all__ = ["WindowLosses"]


class WindowLosses:
    """The first `max_batches` validation batches (all ranks' windows), scored per window: `parallel` (one
    teacher-forced forward) and `autoregressive.<cache>` (token by token with that cache kind)."""

    def __init__(self, caches: Sequence[str] = (), max_batches: int = 4, key: str | None = None) -> None:
        """`key`: the result under that name (a stage hook's, e.g. `start_windows`, joins the stage record), or
        the result itself (an evaluation's: `eval.extra.<name>` names it)."""
        if isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1:
            raise ValueError(f"WindowLosses max_batches must be an integer >= 1, got {max_batches!r}")
        self.caches = [str(c) for c in caches]
        self.max_batches = max_batches
        self.key = key

    def check(self, net: GPTNeoX) -> None:
        for cache in self.caches:  # raises (one line) for a kind that cannot serve the model
            net.build_caches(1, 2, kind=cache)

    @torch.no_grad()
    def __call__(self, *, net: GPTNeoX, datamodule: L.LightningDataModule, **_: Any) -> dict[str, Any]:
        was_training = net.training
        net.eval()
        device = net.embed_out.weight.device
        batches = []
        for i, batch in enumerate(datamodule.val_dataloader(shard=False)):  # type: ignore[call-arg]
            if i >= self.max_batches:
                break
            batches.append(batch.to(device))
        ids = torch.cat(batches)
        digest = hashlib.sha256(ids.cpu().numpy().tobytes()).hexdigest()[:16]
        out: dict[str, Any] = {
            "n_windows": int(ids.shape[0]),
            "sha256": digest,
            "parallel": torch.cat([metrics.token_losses(net, b).double().mean(1) for b in batches]).tolist(),
            "autoregressive": {
                cache: torch.cat(
                    [metrics.autoregressive_token_losses(net, b, cache).double().mean(1) for b in batches]
                ).tolist()
                for cache in self.caches
            },
        }
        net.train(was_training)
        return out if self.key is None else {self.key: out}
