"""Small helpers: atomic writes, stable hashing, file hashes."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

TEMP_SUFFIX = ".tmp"


def atomic_write(path: str | os.PathLike, write: Callable[[IO[Any]], object], mode: str = "w") -> None:
    """Write via a temp file beside `path` (never in $TMPDIR, which may be another filesystem), fsync, then
    `os.replace`, so readers never see half a file. A kill leaves only a `.<name>.*.tmp` file, which
    `remove_stale_temp_files` deletes on the next start."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    os.fchmod(fd, 0o644)  # mkstemp makes 0600; outputs are world-readable like any other file
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temp files that killed `atomic_write` calls left under `folder`; returns them."""
    stale = [p for p in Path(folder).rglob(f".*{TEMP_SUFFIX}") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def stable_hash(obj: Any, length: int = 12) -> str:
    """Hash of a JSON-serialisable object, independent of dict order."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def window_ids_sha256(ids: Any) -> str:
    """sha256 of window ids (a sequence of ints) as little-endian int64 bytes, in their order: two runs scored the
    same windows (of the same split, seq_len and tokenizer) when these agree."""
    import numpy as np

    return hashlib.sha256(np.ascontiguousarray(np.asarray(ids, dtype="<i8")).tobytes()).hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
