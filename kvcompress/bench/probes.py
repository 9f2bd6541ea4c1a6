"""Probes of the machine: device and dtype, CPU name, resident memory, read and matrix-vector bandwidth."""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import statistics
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from kvcompress.evaluation.metrics import synchronize, timed  # the project's one timer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
__all__ = [
    "DTYPES",
    "alternate",
    "cpu_name",
    "dtype_name",
    "measure_bandwidth",
    "median",
    "release_free_memory",
    "reset_peak_rss",
    "resolve_device",
    "resolve_dtype",
    "rss_bytes",
    "synchronize",
    "timed",
    "weights_read_per_step",
]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but CUDA is not available")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def cpu_name() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    return platform.processor() or platform.machine()


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def alternate(names: list[str], r: int) -> Iterator[str]:
    """Systems in order on even repeats, reversed on odd ones (cancels slow drift)."""
    return iter(names if r % 2 == 0 else names[::-1])


def rss_bytes(field: str = "VmRSS") -> int:
    """This process's resident memory (VmRSS) or its peak since the last reset (VmHWM), from /proc."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc), so RSS shows what is live."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux: `5` into /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def weights_read_per_step(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter but the input embedding (B rows of it)."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not n.startswith("embed_in."))


def measure_bandwidth(device: torch.device, dtype: torch.dtype, n_embd: int, vocab: int) -> dict[str, float]:
    """Bytes/s of a plain read (`x.sum()` over 512 MiB) and of a matrix-vector product (the head at batch 1)."""
    x = torch.ones(128 * 2**20, device=device)  # 512 MiB fp32
    w = torch.randn(vocab, n_embd, device=device, dtype=dtype)
    v = torch.randn(1, n_embd, device=device, dtype=dtype)
    read = [x.numel() * 4 / timed(lambda: x.sum(), device)[0] for _ in range(7)]
    matvec = [w.numel() * w.element_size() / timed(lambda: F.linear(v, w), device)[0] for _ in range(7)]
    return {"read_bytes_per_s": median(read[1:]), "matvec_bytes_per_s": median(matvec[1:])}
