"""Training each planned run in its own folder (a subprocess), and reusing the finished ones."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from kvcompress.reproduce.protocol import RunSpec
from kvcompress.utils import atomic_write_json

RUN_FILE = "reproduce.json"  # what the run folder was trained with (its overrides), next to metrics.json
LOCK_FILE = ".reproduce.lock"  # in the output folder, holding the owner's pid
STOP_GRACE_S = 300.0  # how long an interrupted run may take to save its checkpoint
log = logging.getLogger("kvcompress.reproduce")


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """One reproduce at a time on an output folder: a second one waits for the first (then reuses its finished
    runs) instead of colliding on its stage locks. An `fcntl` lock, dropped by the kernel when its owner dies."""
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            log.info(
                "%s is in use by another reproduce (pid %s): waiting for it to finish, then reusing its runs",
                out,
                owner,
            )
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def finished(spec: RunSpec) -> bool:
    """A finished run: metrics.json beside a record of the same overrides."""
    record, metrics = spec.folder / RUN_FILE, spec.folder / "metrics.json"
    if not (record.is_file() and metrics.is_file()):
        return False
    try:
        return json.loads(record.read_text()).get("overrides") == list(spec.overrides)
    except json.JSONDecodeError:
        return False


def stop(run: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> int:
    """Stop a training run as Ctrl-C would (it writes `last.ckpt` and exits), killing it only past `grace_s`."""
    if run.poll() is None:
        run.send_signal(signal.SIGINT)
        try:
            run.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            log.warning("run %d did not stop within %.0f s of its Ctrl-C: killed", run.pid, grace_s)
            run.kill()
    return run.wait()


def execute(spec: RunSpec, stage_dir: Path) -> tuple[str, float]:
    """Train one run (a subprocess, output in its folder's console.log): ('reused'|'ok'|'failed', seconds)."""
    if finished(spec):
        return "reused", 0.0
    spec.folder.mkdir(parents=True, exist_ok=True)
    (spec.folder / "metrics.json").unlink(missing_ok=True)  # from other overrides
    start = time.perf_counter()
    with open(spec.folder / "console.log", "a") as console:
        # Its own session: a Ctrl-C reaches only this process, which passes it on once (a second one would
        # stop the run before it saves) and waits for the run's checkpoint.
        run = subprocess.Popen(
            spec.command(stage_dir), stdout=console, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = run.wait()
        except BaseException:
            stop(run)
            raise
    seconds = time.perf_counter() - start
    if rc != 0 or not (spec.folder / "metrics.json").is_file():
        return "failed", seconds
    atomic_write_json(spec.folder / RUN_FILE, {"overrides": list(spec.overrides), "seconds": seconds})
    return "ok", seconds
