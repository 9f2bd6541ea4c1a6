"""Training each planned run in its own folder (a subprocess), and reusing the finished ones."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from kvcompress.reproduce.protocol import RunSpec
from kvcompress.utils import atomic_write_json

RUN_FILE = "reproduce.json"  # what the run folder was trained with (its overrides), next to metrics.json


def finished(spec: RunSpec) -> bool:
    """A finished run: metrics.json beside a record of the same overrides."""
    record, metrics = spec.folder / RUN_FILE, spec.folder / "metrics.json"
    if not (record.is_file() and metrics.is_file()):
        return False
    try:
        return json.loads(record.read_text()).get("overrides") == list(spec.overrides)
    except json.JSONDecodeError:
        return False


def execute(spec: RunSpec, stage_dir: Path) -> tuple[str, float]:
    """Train one run (a subprocess, output in its folder's console.log): ('reused'|'ok'|'failed', seconds)."""
    if finished(spec):
        return "reused", 0.0
    spec.folder.mkdir(parents=True, exist_ok=True)
    (spec.folder / "metrics.json").unlink(missing_ok=True)  # from other overrides
    start = time.perf_counter()
    with open(spec.folder / "console.log", "a") as console:
        rc = subprocess.call(spec.command(stage_dir), stdout=console, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if rc != 0 or not (spec.folder / "metrics.json").is_file():
        return "failed", seconds
    atomic_write_json(spec.folder / RUN_FILE, {"overrides": list(spec.overrides), "seconds": seconds})
    return "ok", seconds
