"""Paired comparison of two configurations scored on the same validation windows.

    python -m kvcompress.report compare <runs of A...> -- <runs of B...> [--metric val_ppl] [--method bootstrap]
                                        [--level 0.95] [--json] [--allow-mixed]

Each side is one or more run folders or multirun folders (searched for `windows.safetensors`); a side's runs are
seeds of one configuration. The ratio PPL(B) / PPL(A) of `--metric` (`val_ppl`, `bucket:<lo>-<hi>`,
`cache:<key>`, `cache:<key>:bucket:<lo>-<hi>`, `context:full`, `context:last<k>`) comes with a confidence
interval from the per-window paired differences, combined over seeds (`kvcompress.evaluation.stats.paired_ratio`:
`bootstrap`, a hierarchical paired bootstrap over seeds and windows, or `t`, a t interval over windows).

Refused, in one line: runs scored on different windows (always); runs on different data (settings that choose
windows and tokens, split origins, tokenizer hash), and runs of one side whose result-changing config differs
(anything but the seed, see `kvcompress.records.result_config`), unless `--allow-mixed`. Between the sides, the
model, attention, phase, cache and eval settings may differ: that is what is compared.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kvcompress.evaluation.stats import METHODS, Comparison, paired_ratio
from kvcompress.evaluation.windows import FILE, ids_of, load_windows, metric_tensor
from kvcompress.records import data_identity, result_config
from kvcompress.utils import window_ids_sha256

__all__ = ["CompareRefused", "Run", "compare", "find_runs", "first_difference", "load_side", "main"]


class CompareRefused(ValueError):
    """Runs that cannot be compared (one line saying why)."""


@dataclass
class Run:
    folder: Path
    metrics: dict[str, Any]
    windows: dict[str, np.ndarray]

    @property
    def seed(self) -> int | None:
        seed = (self.metrics.get("config") or {}).get("seed")
        return seed if isinstance(seed, int) else None


def find_runs(folders: Sequence[str | os.PathLike]) -> list[Path]:
    """The run folders under `folders` (themselves included) that hold per-window records; a folder with a
    metrics.json but no records is refused (it was made before records were written)."""
    found: set[Path] = set()
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise CompareRefused(f"no such run or multirun folder: {folder}")
        runs = {p.parent for p in folder.rglob(FILE)} | ({folder} if (folder / FILE).is_file() else set())
        bare = {p.parent for p in folder.rglob("metrics.json")} - runs
        if bare:
            raise CompareRefused(f"{sorted(bare)[0]} has a metrics.json but no {FILE} (re-run or re-evaluate it)")
        if not runs:
            raise CompareRefused(f"no {FILE} under {folder}")
        found |= runs
    return sorted(found)


def load_side(folders: Sequence[str | os.PathLike]) -> list[Run]:
    """The runs of one side, ordered by seed (then folder)."""
    runs = []
    for folder in find_runs(folders):
        path = folder / "metrics.json"
        try:
            metrics = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise CompareRefused(f"{path}: unreadable ({type(err).__name__}); the run cannot be compared") from None
        try:
            windows = load_windows(folder)
        except ValueError as err:
            raise CompareRefused(str(err)) from None
        runs.append(Run(folder, metrics, windows))
    return sorted(runs, key=lambda r: (r.seed if r.seed is not None else -1, str(r.folder)))


def first_difference(a: Any, b: Any, where: str = "") -> str | None:
    """The first setting where two nested configs differ, as `name: a vs b`; None when they are equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            name = f"{where}.{key}" if where else str(key)
            if key not in a or key not in b:
                return f"{name}: {a.get(key, '(unset)')!r} vs {b.get(key, '(unset)')!r}"
            found = first_difference(a[key], b[key], name)
            if found:
                return found
        return None
    return None if a == b else f"{where or '(value)'}: {a!r} vs {b!r}"


def _metric_rows(runs: Sequence[Run], tensor: str, side: str) -> tuple[np.ndarray, np.ndarray]:
    rows, ids = [], None
    for run in runs:
        if tensor not in run.windows:
            have = sorted(n for n in run.windows if not n.endswith("ids"))
            raise CompareRefused(f"{run.folder} has no per-window {tensor!r} (it has {have})")
        run_ids = ids_of(run.windows, tensor)
        if ids is None:
            ids, first = run_ids, run
        elif not np.array_equal(ids, run_ids):
            raise CompareRefused(
                f"different windows: {first.folder} (window ids sha256 {window_ids_sha256(ids)[:12]}) vs "
                f"{run.folder} ({window_ids_sha256(run_ids)[:12]}) on side {side}"
            )
        rows.append(run.windows[tensor])
    assert ids is not None
    return ids, np.stack(rows)


def check_comparable(a: Sequence[Run], b: Sequence[Run], allow_mixed: bool = False) -> None:
    """Refuse runs on different data (any two runs) or of different configurations (within a side)."""
    everyone = [*a, *b]
    reference = everyone[0]
    if not allow_mixed:
        for run in everyone[1:]:
            diff = first_difference(data_identity(reference.metrics), data_identity(run.metrics))
            if diff:
                raise CompareRefused(
                    f"different data: {reference.folder} vs {run.folder} ({diff}); pass --allow-mixed to compare anyway"
                )
        for side, runs in (("A", a), ("B", b)):
            for run in runs[1:]:
                diff = first_difference(result_config(runs[0].metrics.get("config") or {}),
                                        result_config(run.metrics.get("config") or {}))  # fmt: skip
                if diff:
                    raise CompareRefused(
                        f"side {side} mixes configurations: {runs[0].folder} vs {run.folder} ({diff}); its runs must "
                        "differ only in the seed (pass --allow-mixed to pool them anyway)"
                    )


def compare(
    a_folders: Sequence[str | os.PathLike],
    b_folders: Sequence[str | os.PathLike],
    metric: str = "val_ppl",
    method: str = "bootstrap",
    level: float = 0.95,
    allow_mixed: bool = False,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[Comparison, dict[str, Any]]:
    """PPL(B) / PPL(A) of `metric` over the runs in `a_folders` and `b_folders` (see the module docstring), and
    what it was computed from (metric, runs, seeds, window ids sha256). Raises `CompareRefused`."""
    tensor = metric_tensor(metric)
    if method not in METHODS:
        raise CompareRefused(f"--method must be one of {list(METHODS)}, got {method!r}")
    if not 0 < level < 1:
        raise CompareRefused(f"--level must be in (0, 1), got {level}")
    a, b = load_side(a_folders), load_side(b_folders)
    check_comparable(a, b, allow_mixed)
    ids_a, rows_a = _metric_rows(a, tensor, "A")
    ids_b, rows_b = _metric_rows(b, tensor, "B")
    if not np.array_equal(ids_a, ids_b):
        raise CompareRefused(
            f"different windows: A {a[0].folder} (window ids sha256 {window_ids_sha256(ids_a)[:12]}) vs B "
            f"{b[0].folder} ({window_ids_sha256(ids_b)[:12]})"
        )
    for side, runs, rows in (("A", a, rows_a), ("B", b, rows_b)):
        bad = [str(r.folder) for r, row in zip(runs, rows, strict=True) if not np.isfinite(row).all()]
        if bad:
            raise CompareRefused(f"side {side}: {bad[0]} has NaN/inf window losses (diverged); it cannot be compared")
    try:
        result = paired_ratio(rows_a, rows_b, level=level, method=method, resamples=resamples, seed=seed)
    except ValueError as err:
        raise CompareRefused(str(err)) from None
    info = {
        "metric": metric,
        "window_ids_sha256": window_ids_sha256(ids_a),
        "seeds": {"A": [r.seed for r in a], "B": [r.seed for r in b]},
        "runs": {"A": [str(r.folder) for r in a], "B": [str(r.folder) for r in b]},
        "ppl": {"A": math.exp(float(rows_a.mean())), "B": math.exp(float(rows_b.mean()))},
    }
    return result, info


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m kvcompress.report compare",
        usage="%(prog)s <runs of A...> -- <runs of B...> [--metric M] [--method M] [--level L] [--json] "
        "[--allow-mixed]",
        description="PPL(B) / PPL(A) on paired validation windows, with a confidence interval.",
    )
    p.add_argument("folders", nargs="*", help="run or multirun folders (searched for windows.safetensors)")
    p.add_argument("--metric", default="val_ppl", help="val_ppl | bucket:<lo>-<hi> | cache:<key>[:bucket:<lo>-<hi>]")
    p.add_argument("--method", default="bootstrap", choices=METHODS, help="interval method (see stats.paired_ratio)")
    p.add_argument("--level", type=float, default=0.95, help="confidence level (default 0.95)")
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (default 2000)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--allow-mixed", action="store_true", help="compare runs of different data or configurations")
    argv = list(argv)
    if "--" not in argv:
        p.error("give the runs of A, then --, then the runs of B")
    cut = argv.index("--")
    args = p.parse_args(argv[:cut])
    a_folders = args.folders
    args = p.parse_args(argv[cut + 1 :], namespace=args)  # options may follow B's runs too
    b_folders = args.folders
    if not a_folders or not b_folders:
        p.error("give at least one run on each side of --")
    try:
        result, info = compare(
            a_folders, b_folders, args.metric, args.method, args.level, args.allow_mixed, args.resamples
        )
    except (CompareRefused, ValueError) as err:
        raise SystemExit(f"compare: refused: {' '.join(str(err).split())}") from None
    if args.json:
        print(json.dumps({**result.to_dict(), **info}, sort_keys=True))
    else:
        lo, hi = result.ci
        print(
            f"{info['metric']}: B/A = {result.ratio:.4f}, {result.level:.0%} CI [{lo:.4f}, {hi:.4f}] "
            f"({result.method}; {result.n_windows} windows; seeds A={result.n_seeds[0]}, B={result.n_seeds[1]}; "
            f"PPL A {info['ppl']['A']:.4g}, B {info['ppl']['B']:.4g})"
        )
    return 0
