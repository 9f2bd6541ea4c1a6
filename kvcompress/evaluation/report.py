"""Aggregate runs over seeds into tables and plots.

    python -m kvcompress.report outputs/multirun/train/2026-11-23_10-00-00-123 [more folders] [--out DIR] [--wandb]
    python -m kvcompress.report compare <runs of A...> -- <runs of B...> [--metric M] [--json]   (see compare.py)

Every `metrics.json` under the folders is one run (an unreadable or truncated one is skipped with a warning
naming it). Runs are grouped by everything that changes their numbers, seed aside: the data (split origins,
tokenizer hash, window settings) and the result-changing config (`kvcompress.records.result_config`); a group is
labelled by its Hydra overrides without `seed=` and folders (plus what tells apart groups with one label). Each
metric is reported as mean ± std over seeds, with n; a seed whose value is NaN/inf (a diverged run) is counted and
flagged ("n=3 (1 diverged)", "diverged" when none is finite), never dropped silently. Runs that trained on a test
split say so above the table and in the CSV (`train_on_test`). Writes `report.md`, `report.csv` and PNGs
(`kvcompress.evaluation.plots`: position-wise PPL, PPL vs cache bytes per token with the Pareto front, decode TPOT
per cache, training loss and validation curves from each run's CSV log) as one set: into a temporary sibling folder
swapped into place by renames, so an interrupted report never leaves a new table beside old plots. Also `pareto.md`
with its plots: every cache of every run against its measured bytes, with paired 95% CIs
(kvcompress.evaluation.pareto).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvcompress.evaluation.pareto import write_pareto
from kvcompress.records import FAILURE_FILE, data_identity, result_config
from kvcompress.utils import atomic_write_text, stable_hash

log = logging.getLogger(__name__)
IGNORED_OVERRIDES = ("seed=", "hydra.", "paths.", "task_name=", "print_config=")


@dataclass
class RunResult:
    path: Path  # the run folder
    label: str  # its configuration as the overrides say it (for display)
    seed: int | None
    metrics: dict[str, Any]
    group: str = ""  # what the run is, seed aside (data and result config): runs of one group are seeds of it

    def __post_init__(self) -> None:
        self.group = self.group or group_key(self.metrics, self.label)

    @property
    def train_on_test(self) -> bool:
        return bool((self.metrics.get("data") or {}).get("train_on_test"))


@dataclass
class Aggregate:
    label: str
    n: int
    values: dict[str, list[float]] = field(default_factory=dict)  # flattened metric -> its finite values
    nonfinite: dict[str, int] = field(default_factory=dict)  # flattened metric -> seeds with NaN / inf there
    diverged: int = 0  # seeds whose val PPL is NaN / inf
    train_on_test: int = 0  # seeds that trained on a test split
    group: str = ""

    def mean(self, key: str) -> float:
        xs = self.values.get(key, [])
        return statistics.fmean(xs) if xs else math.nan

    def std(self, key: str) -> float:
        xs = self.values.get(key, [])
        return statistics.stdev(xs) if len(xs) > 1 else math.nan

    def text(self, key: str, digits: int = 1) -> str:
        xs, bad = self.values.get(key, []), self.nonfinite.get(key, 0)
        if not xs:
            return "diverged" if bad else "—"
        text = f"{self.mean(key):.{digits}f}" + (f" ± {self.std(key):.{digits}f}" if len(xs) > 1 else "")
        return text + (f" ({bad} of {len(xs) + bad} diverged)" if bad else "")

    def n_text(self) -> str:
        return f"{self.n} ({self.diverged} diverged)" if self.diverged else str(self.n)


def default_label(metrics: dict[str, Any]) -> str:
    overrides = [o for o in metrics.get("overrides") or [] if not o.startswith(IGNORED_OVERRIDES)]
    return " ".join(overrides) or str((metrics.get("config") or {}).get("task_name", "run"))


def group_key(metrics: dict[str, Any], label: str = "") -> str:
    """A hash of what a run is, seed aside: its data identity and result-changing config (the label when the run
    records no config)."""
    config = metrics.get("config")
    if not isinstance(config, dict):
        return "label:" + label
    return stable_hash({"data": data_identity(metrics), "config": result_config(config)})


def find_run_folders(folders: Sequence[str | os.PathLike]) -> tuple[list[Path], list[Path]]:
    """(folders with a metrics.json, failed job folders: a failure.txt and no metrics.json)."""
    done, failed = set(), set()
    for folder in map(Path, folders):
        if not folder.exists():
            raise FileNotFoundError(f"no such run or multirun folder: {folder}")
        done |= {p.parent for p in folder.rglob("metrics.json")}
        failed |= {p.parent for p in folder.rglob(FAILURE_FILE)}
    return sorted(done), sorted(failed - done)


def read_metrics(path: Path) -> dict[str, Any] | None:
    """A run's metrics.json, or None (with a warning naming it) when it is unreadable, truncated or not a record."""
    try:
        metrics = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        log.warning("skipping %s: unreadable (%s: %s)", path, type(err).__name__, err)
        print(f"warning: skipping {path}: unreadable ({type(err).__name__})", file=sys.stderr)
        return None
    if not isinstance(metrics, dict):
        log.warning("skipping %s: not a run record", path)
        print(f"warning: skipping {path}: not a run record", file=sys.stderr)
        return None
    return metrics


def load_runs(
    folders: Sequence[str | os.PathLike],
    label: Callable[[dict[str, Any]], str] = default_label,
    skipped: list[Path] | None = None,
) -> list[RunResult]:
    """The runs under `folders`; unreadable metrics.json files are skipped with a warning (and added to
    `skipped` when given)."""
    runs = []
    for folder in find_run_folders(folders)[0]:
        metrics = read_metrics(folder / "metrics.json")
        if metrics is None:
            if skipped is not None:
                skipped.append(folder / "metrics.json")
            continue
        seed = (metrics.get("config") or {}).get("seed")
        runs.append(RunResult(folder, label(metrics), seed if isinstance(seed, int) else None, metrics))
    return runs


def flatten(metrics: dict[str, Any], prefix: str = "", finite: bool = True) -> dict[str, float]:
    """Numeric leaves with dotted names; the stages list by stage name (`stages.lm.val_ppl`). NaN / inf leaves
    are left out unless `finite=False`."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if key in ("config", "data", "code", "versions", "device", "overrides", "command", "params", "windows"):
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}.", finite))
        elif isinstance(value, list) and key == "stages":
            for stage in value:
                out.update(flatten(stage, f"{name}.{stage.get('name')}.", finite))
        elif isinstance(value, int | float) and not isinstance(value, bool) and (math.isfinite(value) or not finite):
            out[name] = float(value)
    return out


def diverged(metrics: dict[str, Any]) -> bool:
    """A run that finished with a NaN / inf validation PPL."""
    value = metrics.get("val_ppl")
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isfinite(value)


def aggregate(runs: Sequence[RunResult]) -> list[Aggregate]:
    """One row per group (data and result config, seed aside), in first-seen order. Groups that share a label
    get what tells them apart appended to it."""
    rows: dict[str, Aggregate] = {}
    for run in runs:
        row = rows.setdefault(run.group, Aggregate(run.label, 0, group=run.group))
        row.n += 1
        row.diverged += diverged(run.metrics)
        row.train_on_test += run.train_on_test
        for key, value in flatten(run.metrics, finite=False).items():
            if math.isfinite(value):
                row.values.setdefault(key, []).append(value)
            else:
                row.nonfinite[key] = row.nonfinite.get(key, 0) + 1
    _disambiguate(list(rows.values()), {run.group: run for run in runs})
    return list(rows.values())


def _disambiguate(rows: list[Aggregate], example: dict[str, RunResult]) -> None:
    by_label: dict[str, list[Aggregate]] = {}
    for row in rows:
        by_label.setdefault(row.label, []).append(row)
    for same in by_label.values():
        if len(same) < 2:
            continue
        for row in same:
            metrics = example[row.group].metrics
            origin = ((metrics.get("data") or {}).get("splits") or {}).get("validation", {}).get("origin")
            where = f"data: {Path(str(origin)).name}, " if origin else ""
            row.label = f"{row.label} [{where}config {row.group[:6]}]"


def buckets(rows: Sequence[Aggregate], key: str = "val_pos_ppl") -> list[str]:
    names = [k[len(key) + 1 :] for row in rows for k in row.values if k.startswith(key + ".")]
    return list(dict.fromkeys(names))


def cache_kinds(rows: Sequence[Aggregate]) -> list[str]:
    return list(dict.fromkeys(k.split(".")[1] for row in rows for k in row.values if k.startswith("caches.")))


# ----------------------------------------------------------------------------- tables


def train_on_test_line(rows: Sequence[Aggregate]) -> str | None:
    """The warning every table made from runs that trained on a test split carries (None when none did)."""
    marked = [row for row in rows if row.train_on_test]
    if not marked:
        return None
    which = ", ".join(f"`{row.label}` ({row.train_on_test} of {row.n})" for row in marked)
    return f"**train_on_test: these runs trained on a test split** (offline WikiText-2 trains on test.txt): {which}."


def markdown(rows: Sequence[Aggregate], failed: Sequence[Path] = (), skipped: Sequence[Path] = ()) -> str:
    pos = buckets(rows)
    head = ["configuration", "n", "val PPL", "AR PPL", *[f"PPL {b}" for b in pos], "cache B/token", "TPOT ms"]
    warning = train_on_test_line(rows)
    lines = [warning, ""] if warning else []
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in rows:
        ms = [x * 1e3 for x in row.values.get("tpot_s", [])]
        tpot = Aggregate(row.label, row.n, {"t": ms}, {"t": row.nonfinite.get("tpot_s", 0)})
        cells = [
            f"`{row.label}`",
            row.n_text(),
            row.text("val_ppl"),
            row.text("autoregressive_ppl"),
            *[row.text(f"val_pos_ppl.{b}") for b in pos],
            row.text("cache.bytes_per_token", 0),
            tpot.text("t", 2),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "mean ± sample std over seeds (n runs each); a seed whose value is NaN / inf is counted in n and flagged "
        "(diverged), not averaged."
    )
    if failed:
        lines += ["", "Failed runs (no metrics.json): " + ", ".join(f"`{p}`" for p in failed)]
    if skipped:
        lines += ["", "Skipped (unreadable metrics.json): " + ", ".join(f"`{p}`" for p in skipped)]
    return "\n".join(lines) + "\n"


def csv_text(rows: Sequence[Aggregate]) -> str:
    """One line per row: n, the seeds whose val PPL diverged, the seeds that trained on a test split, and per metric
    mean and std over its finite values (plus `<metric>_diverged`, the NaN / inf seeds, where a row has any)."""
    keys = list(dict.fromkeys([*(k for row in rows for k in row.values), *(k for row in rows for k in row.nonfinite)]))
    flagged = {k for row in rows for k in row.nonfinite}
    columns = [(k, s) for k in keys for s in ("mean", "std", *(("diverged",) if k in flagged else ()))]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["configuration", "n", "diverged", "train_on_test", *[f"{k}_{s}" for k, s in columns]])
    for row in rows:
        cells = [
            str(row.nonfinite.get(k, 0)) if s == "diverged" else _number(getattr(row, s)(k))  # n=1: no std
            for k, s in columns
        ]
        writer.writerow([row.label, row.n, row.diverged, row.train_on_test, *cells])
    return buf.getvalue()


def _number(x: float) -> str:
    return "" if math.isnan(x) else f"{x:.6g}"


# ----------------------------------------------------------------------------- report


def run_windows(folder: Path) -> dict[str, Any]:
    """A run's per-window records (`windows.safetensors`), or nothing when it has none or they are damaged."""
    from kvcompress.evaluation.windows import FILE, load_windows

    if not (Path(folder) / FILE).is_file():
        return {}
    try:
        return load_windows(folder)
    except ValueError as err:
        log.warning("%s", err)
        return {}


def write_report(
    runs: Sequence[RunResult],
    out_dir: str | os.PathLike,
    wandb: bool = False,
    failed: Sequence[Path] = (),
    skipped: Sequence[Path] = (),
) -> dict[str, Path]:
    """Write the report set (report.md, report.csv, the plots) into `out_dir`, replacing a previous set as a whole:
    everything is written into a temporary sibling folder, which then takes the place of `out_dir` by renames (see
    `swap_into_place`). Returns the files' final paths."""
    import matplotlib

    from kvcompress.evaluation import plots

    matplotlib.use("Agg")
    out = Path(out_dir)
    if out.exists() and not is_report_folder(out):
        raise FileExistsError(f"--out {out} exists and is not a report folder (no report.md): choose another folder")
    rows = aggregate(runs)
    labels = {row.group: row.label for row in rows}
    for run in runs:  # the plots name runs as the table does
        run.label = labels.get(run.group, run.label)
    notes = plots.cache_notes(runs)
    out.parent.mkdir(parents=True, exist_ok=True)
    recover_report_folder(out)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=STAGING_SUFFIX))
    try:
        written = {"markdown": staging / "report.md", "csv": staging / "report.csv"}
        atomic_write_text(written["markdown"], markdown(rows, failed, skipped) + plots.cache_notes_markdown(runs))
        atomic_write_text(written["csv"], csv_text(rows))
        written["position_ppl"] = plots.plot_position_ppl(rows, staging / "position_ppl.png")
        written["ppl_vs_bytes"] = plots.plot_ppl_vs_bytes(rows, staging / "ppl_vs_bytes.png", notes)
        written["tpot"] = plots.plot_tpot(rows, staging / "tpot.png", notes)
        written["training_curves"] = plots.plot_training_curves(runs, staging / "training_curves.png")
        with_windows = [(run.label, {**run.metrics, "_windows": run_windows(run.path)}) for run in runs]
        written.update(write_pareto(with_windows, staging))  # pareto.md and its plots
        swap_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    written = {name: out / path.relative_to(staging) for name, path in written.items()}
    if wandb:
        plots.log_to_wandb(written, runs)
    return written


STAGING_SUFFIX = ".report-tmp"


def is_report_folder(folder: Path) -> bool:
    """A folder a report may replace: an empty one, or one that holds a report."""
    return folder.is_dir() and ((folder / "report.md").is_file() or not any(folder.iterdir()))


def _previous(out: Path) -> Path:
    return out.with_name(f".{out.name}.previous{STAGING_SUFFIX}")


def swap_into_place(staging: Path, out: Path) -> None:
    """Put the finished set `staging` at `out`: the old set is renamed aside, the new one renamed in, the old one
    removed. A kill at any point leaves the old set, or the new set, never a mix (between the two renames only the
    aside copy exists; `recover_report_folder` puts it back)."""
    previous = _previous(out)
    if previous.exists():
        shutil.rmtree(previous)
    if out.exists():
        os.rename(out, previous)
    os.rename(staging, out)
    shutil.rmtree(previous, ignore_errors=True)


def recover_report_folder(out: Path) -> None:
    """After an interrupted report: put back a set left aside between the two renames, and delete unfinished sets."""
    previous = _previous(out)
    if previous.is_dir() and not out.exists():
        os.rename(previous, out)
        log.warning("restored the previous report %s (a report was interrupted while replacing it)", out)
    for stale in out.parent.glob(f".{out.name}.*{STAGING_SUFFIX}"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["compare"]:
        from kvcompress.evaluation.compare import main as compare_main

        return compare_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m kvcompress.report", description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", help="run or multirun folders (searched for metrics.json)")
    p.add_argument("--out", default=None, help="output folder (default: <first folder>/report)")
    p.add_argument("--wandb", action="store_true", help="also log the table and plots to W&B")
    args = p.parse_args(argv)
    skipped: list[Path] = []
    runs = load_runs(args.folders, skipped=skipped)
    failed = find_run_folders(args.folders)[1]
    if not runs:
        raise SystemExit(f"no readable metrics.json under {', '.join(args.folders)}")
    out = args.out or Path(args.folders[0]) / "report"
    try:
        written = write_report(runs, out, wandb=args.wandb, failed=failed, skipped=skipped)
    except FileExistsError as err:
        raise SystemExit(f"error: {err}") from None
    print(Path(written["markdown"]).read_text())
    if "pareto" in written:
        print(Path(written["pareto"]).read_text())
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
