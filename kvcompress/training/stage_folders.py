"""Stage folders on disk: what each holds, when it was last used, which runs reference it, and removing the ones no
run references (`python -m kvcompress.stages`).

A run references a stage through its `metrics.json` (`stages[i].name` and `.key`: the folder is `<name>-<key>`).
A stage whose lock a live process holds is in use and never removed; an unfinished stage (no `done.json`: a
stopped run can resume from its `last.ckpt`) is removed only when asked (`unfinished=True`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kvcompress.training.checkpoints import lock_path
from kvcompress.training.phases import CHECKPOINTS, DONE


@dataclass
class StageFolder:
    path: Path
    size: int  # bytes of every file in it
    last_use: float  # mtime of its lock (beside it; written by every run that trained or reused it), else newest file
    finished: bool  # has done.json
    in_use: bool  # a live process holds its lock
    runs: list[Path] = field(default_factory=list)  # the metrics.json files that reference it

    @property
    def state(self) -> str:
        return "in use" if self.in_use else "finished" if self.finished else "unfinished"


def _is_stage_folder(path: Path) -> bool:
    if path.name.startswith(".") or not path.is_dir():  # a retrain's unfinished sibling, a lock file
        return False
    return lock_path(path).is_file() or any((path / name).exists() for name in (DONE, CHECKPOINTS))


def _held_by_another(lock: Path) -> bool:
    if not lock.is_file():
        return False
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing drops the lock we may have taken
    return False


def describe_folder(path: Path) -> StageFolder:
    files = [p for p in path.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    lock = lock_path(path)
    last = lock.stat().st_mtime if lock.is_file() else max((p.stat().st_mtime for p in files), default=0.0)
    return StageFolder(path, size, last, (path / DONE).is_file(), _held_by_another(lock))


def stage_references(runs_dirs: Sequence[Path]) -> dict[str, list[Path]]:
    """Stage folder name (`<name>-<key>`) -> the metrics.json files under `runs_dirs` that list it."""
    refs: dict[str, list[Path]] = {}
    for root in runs_dirs:
        for metrics_file in sorted(Path(root).rglob("metrics.json")) if Path(root).is_dir() else []:
            try:
                stages = json.loads(metrics_file.read_text()).get("stages") or []
            except (OSError, ValueError):
                continue
            for stage in stages:
                if isinstance(stage, dict) and stage.get("name") and stage.get("key"):
                    refs.setdefault(f"{stage['name']}-{stage['key']}", []).append(metrics_file)
    return refs


def list_stage_folders(stage_dirs: Sequence[Path], runs_dirs: Sequence[Path]) -> list[StageFolder]:
    refs = stage_references(runs_dirs)
    folders = []
    for root in stage_dirs:
        for path in sorted(Path(root).iterdir()) if Path(root).is_dir() else []:
            if _is_stage_folder(path):
                folder = describe_folder(path)
                folder.runs = refs.get(path.name, [])
                folders.append(folder)
    return folders


def removable(folders: Sequence[StageFolder], unfinished: bool = False) -> list[StageFolder]:
    """No run references them, no process uses them; unfinished ones (resumable) only when asked."""
    return [f for f in folders if not f.runs and not f.in_use and (f.finished or unfinished)]


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[bool]:
    """Hold the folder's lock while removing it (False: a run took it meanwhile)."""
    lock = lock_path(folder)
    if not lock.is_file():
        yield True
        return
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        yield False
        return
    try:
        yield True
    finally:
        os.close(fd)


def remove_folder(folder: StageFolder) -> bool:
    with _locked(folder.path) as ours:
        if ours:
            shutil.rmtree(folder.path)
            lock_path(folder.path).unlink(missing_ok=True)
        return ours


def size_text(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def table(folders: Sequence[StageFolder]) -> str:
    lines = [f"{'size':>9}  {'last use':16}  {'state':10}  {'runs':>4}  folder (a referencing run)"]
    for f in folders:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(f.last_use))
        first = f"  ({f.runs[0].parent})" if f.runs else ""
        lines.append(f"{size_text(f.size):>9}  {when:16}  {f.state:10}  {len(f.runs):>4}  {f.path}{first}")
    total = sum(f.size for f in folders)
    lines.append(f"{len(folders)} stage folders, {size_text(total)}")
    return "\n".join(lines)
