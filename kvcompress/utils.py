"""Small helpers: atomic writes, stable hashing, file hashes."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, cast

TEMP_SUFFIX = ".tmp"


class DiskFullError(OSError):
    """A write that the disk (or the file-size limit) refused: names the file and the bytes it needed."""

    def __str__(self) -> str:
        return str(self.strerror)


_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


class _CountingWriter:
    """Wraps the temp file: counts the bytes written; when the disk refuses one, keeps counting what the serializer
    still writes (and drops it), so the error can say exactly how many bytes the file needed."""

    def __init__(self, f: IO[Any]) -> None:
        self._f = f
        self.requested = 0
        self.failed: OSError | None = None

    def write(self, data: Any) -> int:
        n = len(data.encode()) if isinstance(data, str) else memoryview(data).nbytes
        self.requested += n
        if self.failed is None:
            try:
                self._f.write(data)
            except OSError as err:
                if err.errno not in _FULL:
                    raise
                self.failed = err
        return len(data) if isinstance(data, str) else n

    def flush(self) -> None:
        if self.failed is None:
            self._f.flush()

    def tell(self) -> int:
        return self.requested

    def writable(self) -> bool:
        return True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[Any]], object], mode: str = "w") -> None:
    """Write via a temp file beside `path` (never in $TMPDIR, which may be another filesystem), fsync, then
    `os.replace`, so readers never see half a file. A kill leaves only a `.<name>.*.tmp` file, which
    `remove_stale_temp_files` deletes on the next start. A full disk (or file-size limit) raises DiskFullError,
    one line naming `path` and the bytes it needed; the temp file is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    os.fchmod(fd, 0o644)  # mkstemp makes 0600; outputs are world-readable like any other file
    f = os.fdopen(fd, mode)
    counter = _CountingWriter(f)
    try:
        try:
            write(cast(IO[Any], counter))  # a file for the serializer: it counts writes, forwards the rest
            if counter.failed is None:
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:
            if err.errno not in _FULL:
                raise
            counter.failed = counter.failed or err
        except Exception:
            if counter.failed is None:
                raise  # (after a refused write a serializer may fail on its own: the disk is the reason)
        finally:
            try:
                f.close()  # (after a refused write, what is still buffered is refused again)
            except OSError as err:
                if err.errno not in _FULL:
                    raise
                counter.failed = counter.failed or err
        if counter.failed is not None:
            reason = os.strerror(counter.failed.errno or errno.ENOSPC)
            raise DiskFullError(
                counter.failed.errno,
                f"cannot write {path}: {reason} (it needed {counter.requested:,} bytes; the file was left as it was)",
            ) from None
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


def content_sha256(path: str | os.PathLike, patterns: tuple[str, ...] = ("*",)) -> str:
    """sha256 of a file, or of a folder's files matching `patterns` (their names and sha256s, sorted)."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    files = sorted({p for pattern in patterns for p in path.glob(pattern) if p.is_file()})
    return stable_hash({p.name: file_sha256(p) for p in files}, length=64)
