"""Per-window records: `windows.safetensors` in every run folder, so any two runs scored on the same validation
windows can be paired (`kvcompress.evaluation.stats.paired_ratio`, `python -m kvcompress.report compare`).

One row per validation window. Tensors (safetensors, no pickle), float64 mean token losses in nats:
- `ids` (N,) int64: the window ids (the window's number in its split's token stream), ascending;
- `val`: the window's mean loss under the run's final weights (teacher-forced), from the final validation of the
  last stage (exactly the losses behind metrics.json `val_ppl`: `exp(mean(val)) == val_ppl`);
- `bucket:<lo>-<hi>`: the mean loss over loss positions [lo, hi) (the position-PPL buckets, `val_pos_ppl`);
- `cache:<key>` and `cache:<key>:bucket:<lo>-<hi>`: the same, decoding token by token with each cache of the
  end-of-run evaluation (`eval.autoregressive.enabled`; `<key>` as in metrics.json `caches`), on the windows of
  `cache:<key>:ids` (the first `eval.autoregressive.max_batches` batches);
- `context:full` and `context:last<k>`: the context check (`eval.context_check`), on the windows of
  `context:ids` when it ran on other windows than `ids`.
A tensor `<group>:ids` gives the windows of every tensor of its group (`cache:<key>` or `context`); any other
tensor is aligned with `ids`.

String metadata: `format` ("kvcompress.windows/1"), `window_ids_sha256` (of `ids`, see
`kvcompress.utils.window_ids_sha256`), `data_origin` (the validation split's origin), `tokenizer_sha256`,
`seq_len`, `seed`, `eval_seed`, `buckets` (a JSON list of [lo, hi]).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvcompress.utils import atomic_write, window_ids_sha256

__all__ = [
    "FILE",
    "FORMAT",
    "add_window_losses",
    "buckets_of",
    "group_ids",
    "ids_of",
    "load_windows",
    "metric_tensor",
    "names",
    "window_losses",
    "window_meta",
    "write_windows",
]

FILE = "windows.safetensors"
FORMAT = "kvcompress.windows/1"


def window_losses(
    token_losses: torch.Tensor, buckets: Sequence[tuple[int, int]], prefix: str = ""
) -> dict[str, torch.Tensor]:
    """Per-window mean losses (float64) of per-token losses (windows, positions): `<prefix>` for all positions
    (`val` when there is no prefix) and `<prefix>:bucket:<lo>-<hi>` per bucket (clipped to the positions; buckets
    that start past them are left out)."""
    losses = token_losses.detach().double()
    T = losses.shape[-1]
    out = {prefix or "val": losses.mean(-1)}
    for lo, hi in buckets:
        if lo < T:
            out[f"{prefix}:bucket:{lo}-{hi}" if prefix else f"bucket:{lo}-{hi}"] = losses[:, lo : min(hi, T)].mean(-1)
    return out


def add_window_losses(
    records: dict[str, np.ndarray],
    group: str,
    ids: np.ndarray,
    token_losses: torch.Tensor,
    buckets: Sequence[tuple[int, int]],
) -> None:
    """Add the per-window losses of the cache or check `group` (e.g. `cache:int8`) on windows `ids` to
    `records`, with `<group>:ids` unless they are the records' `ids`."""
    for name, values in window_losses(token_losses, buckets, prefix=group).items():
        records[name] = values.cpu().numpy()
    ids = np.asarray(ids, dtype=np.int64)
    if "ids" not in records or not np.array_equal(records["ids"], ids):
        records[f"{group}:ids"] = ids


def buckets_of(records: Mapping[str, Any]) -> list[tuple[int, int]]:
    """The position buckets of the `bucket:<lo>-<hi>` tensors, in order."""
    out = []
    for name in records:
        if name.startswith("bucket:"):
            lo, hi = name[len("bucket:") :].split("-")
            out.append((int(lo), int(hi)))
    return sorted(out)


def group_ids(name: str) -> str:
    """The tensor that holds the window ids of tensor `name`: `cache:<key>:ids`, `context:ids`, or `ids`."""
    if name.startswith("cache:"):
        return f"cache:{name[len('cache:') :].split(':bucket:')[0]}:ids"
    if name.startswith("context:"):
        return "context:ids"
    return "ids"


def metric_tensor(metric: str) -> str:
    """The tensor of a compare metric: `val_ppl` -> `val`; `bucket:<lo>-<hi>`, `cache:<key>`,
    `cache:<key>:bucket:<lo>-<hi>`, `context:full`, `context:last<k>` -> themselves."""
    if metric in ("val", "val_ppl"):
        return "val"
    if metric.startswith(("bucket:", "cache:", "context:")) and not metric.endswith(":ids"):
        return metric
    raise ValueError(
        f"--metric {metric!r}: use val_ppl, bucket:<lo>-<hi>, cache:<key>, cache:<key>:bucket:<lo>-<hi>, "
        "context:full or context:last<k>"
    )


def ids_of(records: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    """The window ids of tensor `name` in `records`."""
    key = group_ids(name)
    return records[key] if key in records else records["ids"]


def write_windows(
    folder: str | os.PathLike, records: Mapping[str, Any], meta: Mapping[str, Any], filename: str = FILE
) -> Path:
    """Write `records` (see the module docstring) and `meta` to `<folder>/<filename>` (`windows.safetensors`),
    atomically.

    Checks the shapes: every tensor 1-D, as long as its ids. Adds `format` and `window_ids_sha256`."""
    from safetensors.numpy import save

    tensors: dict[str, np.ndarray] = {}
    for name, value in records.items():
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        dtype = np.int64 if name == "ids" or name.endswith(":ids") else np.float64
        tensors[name] = np.ascontiguousarray(array, dtype=dtype)
        if tensors[name].ndim != 1:
            raise ValueError(f"window record {name!r} must be 1-D, got shape {tensors[name].shape}")
    if "ids" not in tensors or "val" not in tensors:
        raise ValueError(f"window records need `ids` and `val`, got {sorted(tensors)}")
    for name, array in tensors.items():
        if not name.endswith("ids") and len(array) != len(ids_of(tensors, name)):
            raise ValueError(f"window record {name!r} has {len(array)} rows, its ids {len(ids_of(tensors, name))}")
    metadata = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items() if v is not None}
    metadata.update(format=FORMAT, window_ids_sha256=window_ids_sha256(tensors["ids"]))
    path = Path(folder) / filename
    blob = save(tensors, metadata=metadata)
    atomic_write(path, lambda f: f.write(blob), mode="wb")
    return path


def _file(run_folder: str | os.PathLike) -> Path:
    folder = Path(run_folder)
    path = folder if folder.suffix == ".safetensors" else folder / FILE  # a run folder, or a records file
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no per-window records (runs made before they were written have none)")
    return path


def window_meta(run_folder: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a run's `windows.safetensors` (a run folder, or the file itself)."""
    from safetensors import safe_open

    path = _file(run_folder)
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = dict(f.metadata() or {})
    except Exception as err:  # noqa: BLE001 - truncated or not a safetensors file
        raise ValueError(f"{path}: unreadable per-window records ({type(err).__name__}: {err})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def load_windows(run_folder: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a run's `windows.safetensors` (see the module docstring), as numpy arrays; raises a
    ValueError naming the file when it is unreadable, of another format, or its ids do not match their hash."""
    from safetensors.numpy import load_file

    path = _file(run_folder)
    meta = window_meta(path)
    try:
        records = load_file(str(path))
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"{path}: unreadable per-window records ({type(err).__name__}: {err})") from None
    if "ids" not in records or window_ids_sha256(records["ids"]) != meta.get("window_ids_sha256"):
        raise ValueError(f"{path}: the window ids do not match their recorded sha256 (a damaged file)")
    return records


def names(records: Iterable[str]) -> list[str]:
    """The loss tensors (not ids) of a record, in a stable order."""
    return sorted(n for n in records if not (n == "ids" or n.endswith(":ids")))
