"""Load and save model weights without running code from the file.

Weights move as safetensors. Lightning `.ckpt` files (our stage checkpoints) are read with
`torch.load(weights_only=True)`, which refuses any pickle that would build an object other than tensors and
plain containers. Every loaded tensor must be finite: a NaN/inf weight is an error that names the file.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import Tensor

from kvcompress.utils import atomic_write

NET_PREFIX = "net."  # where LMModule keeps the model inside a Lightning checkpoint


class BadWeightsError(ValueError):
    """A weights file that cannot be read safely, or that holds non-finite values."""


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A Lightning checkpoint dict, unpickled with `weights_only=True` (no code can run)."""
    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated, garbled, or a pickle that wants to run code
        raise BadWeightsError(f"{path}: not a loadable checkpoint ({type(err).__name__}: {_first_line(err)})") from err
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise BadWeightsError(f"{path}: not a Lightning checkpoint (no state_dict)")
    return checkpoint


def load_weights(path: str | os.PathLike) -> dict[str, Tensor]:
    """The model weights in `path`: a `.safetensors` file, or a Lightning `.ckpt` (its `net.*` entries)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            state = load_file(str(path))
        except Exception as err:  # noqa: BLE001
            raise BadWeightsError(f"{path}: not a readable safetensors file ({_first_line(err)})") from err
    else:
        raw = load_checkpoint(path)["state_dict"]
        state = {k[len(NET_PREFIX) :]: v for k, v in raw.items() if k.startswith(NET_PREFIX)}
        if not state:
            raise BadWeightsError(f"{path}: the checkpoint holds no model weights (no '{NET_PREFIX}*' entries)")
    check_finite(state, path)
    return state


def check_finite(state: dict[str, Tensor], path: str | os.PathLike) -> None:
    """Raise BadWeightsError naming `path` and the first tensor holding NaN or inf."""
    for name, value in state.items():
        if not isinstance(value, Tensor):
            raise BadWeightsError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise BadWeightsError(f"{path}: weight {name!r} holds NaN or inf values")


def save_weights(state: dict[str, Tensor], path: str | os.PathLike) -> None:
    """Write weights as safetensors, atomically (a temp file beside the target, then a rename)."""
    blob = save({k: v.detach().contiguous().cpu() for k, v in state.items()})
    atomic_write(path, lambda f: f.write(blob), mode="wb")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
