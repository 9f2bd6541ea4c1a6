"""The batch type every loader yields and every module reads."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

# A batch: (B, T + 1) token ids, or a dict with "ids" and optional per-token loss weights "weight" (B, T).
Batch = Tensor | Mapping[str, Tensor]


def split_batch(batch: Batch) -> tuple[Tensor, Tensor | None]:
    """(ids, weight or None) of a batch."""
    if isinstance(batch, Mapping):
        return batch["ids"], batch.get("weight")
    return batch, None
