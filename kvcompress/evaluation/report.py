"""Aggregate runs over seeds into tables and plots.

    python -m kvcompress.report outputs/multirun/train/2026-11-23_10-00-00-123 [more folders] [--out DIR] [--wandb]

Every `metrics.json` under the folders is one run. Runs are grouped by configuration (their Hydra
overrides without `seed=` and folders) and each metric is reported as mean ± std over seeds, with n.
Writes `report.md`, `report.csv` and PNGs (`kvcompress.evaluation.plots`): position-wise PPL, PPL vs cache bytes
per token (with the Pareto front), decode TPOT per cache, training loss and validation curves (from each run's CSV
log).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvcompress.records import FAILURE_FILE
from kvcompress.utils import atomic_write_text

IGNORED_OVERRIDES = ("seed=", "hydra.", "paths.", "task_name=", "print_config=")


@dataclass
class RunResult:
    path: Path  # the run folder
    label: str  # its configuration (runs with one label are seeds of one configuration)
    seed: int | None
    metrics: dict[str, Any]


@dataclass
class Aggregate:
    label: str
    n: int
    values: dict[str, list[float]] = field(default_factory=dict)  # flattened metric -> one value per seed

    def mean(self, key: str) -> float:
        xs = self.values.get(key, [])
        return statistics.fmean(xs) if xs else math.nan

    def std(self, key: str) -> float:
        xs = self.values.get(key, [])
        return statistics.stdev(xs) if len(xs) > 1 else math.nan

    def text(self, key: str, digits: int = 1) -> str:
        xs = self.values.get(key, [])
        if not xs:
            return "—"
        return f"{self.mean(key):.{digits}f}" + (f" ± {self.std(key):.{digits}f}" if len(xs) > 1 else "")


def default_label(metrics: dict[str, Any]) -> str:
    overrides = [o for o in metrics.get("overrides") or [] if not o.startswith(IGNORED_OVERRIDES)]
    return " ".join(overrides) or str((metrics.get("config") or {}).get("task_name", "run"))


def find_run_folders(folders: Sequence[str | os.PathLike]) -> tuple[list[Path], list[Path]]:
    """(folders with a metrics.json, failed job folders: a failure.txt and no metrics.json)."""
    done, failed = set(), set()
    for folder in map(Path, folders):
        if not folder.exists():
            raise FileNotFoundError(f"no such run or multirun folder: {folder}")
        done |= {p.parent for p in folder.rglob("metrics.json")}
        failed |= {p.parent for p in folder.rglob(FAILURE_FILE)}
    return sorted(done), sorted(failed - done)


def load_runs(
    folders: Sequence[str | os.PathLike], label: Callable[[dict[str, Any]], str] = default_label
) -> list[RunResult]:
    runs = []
    for folder in find_run_folders(folders)[0]:
        metrics = json.loads((folder / "metrics.json").read_text())
        seed = (metrics.get("config") or {}).get("seed")
        runs.append(RunResult(folder, label(metrics), seed if isinstance(seed, int) else None, metrics))
    return runs


def flatten(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves with dotted names; the stages list by stage name (`stages.lm.val_ppl`)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if key in ("config", "data", "code", "versions", "device", "overrides", "command", "params"):
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, list) and key == "stages":
            for stage in value:
                out.update(flatten(stage, f"{name}.{stage.get('name')}."))
        elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
    return out


def aggregate(runs: Sequence[RunResult]) -> list[Aggregate]:
    """One row per label, in first-seen order."""
    rows: dict[str, Aggregate] = {}
    for run in runs:
        row = rows.setdefault(run.label, Aggregate(run.label, 0))
        row.n += 1
        for key, value in flatten(run.metrics).items():
            row.values.setdefault(key, []).append(value)
    return list(rows.values())


def buckets(rows: Sequence[Aggregate], key: str = "val_pos_ppl") -> list[str]:
    names = [k[len(key) + 1 :] for row in rows for k in row.values if k.startswith(key + ".")]
    return list(dict.fromkeys(names))


def cache_kinds(rows: Sequence[Aggregate]) -> list[str]:
    return list(dict.fromkeys(k.split(".")[1] for row in rows for k in row.values if k.startswith("caches.")))


# ----------------------------------------------------------------------------- tables


def markdown(rows: Sequence[Aggregate], failed: Sequence[Path] = ()) -> str:
    pos = buckets(rows)
    head = ["configuration", "n", "val PPL", "AR PPL", *[f"PPL {b}" for b in pos], "cache B/token", "TPOT ms"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in rows:
        tpot = Aggregate(row.label, row.n, {"t": [x * 1e3 for x in row.values.get("tpot_s", [])]})
        cells = [
            f"`{row.label}`",
            str(row.n),
            row.text("val_ppl"),
            row.text("autoregressive_ppl"),
            *[row.text(f"val_pos_ppl.{b}") for b in pos],
            row.text("cache.bytes_per_token", 0),
            tpot.text("t", 2),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("mean ± sample std over seeds (n runs each).")
    if failed:
        lines += ["", "Failed runs (no metrics.json): " + ", ".join(f"`{p}`" for p in failed)]
    return "\n".join(lines) + "\n"


def csv_text(rows: Sequence[Aggregate]) -> str:
    keys = list(dict.fromkeys(k for row in rows for k in row.values))
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["configuration", "n", *[f"{k}_{s}" for k in keys for s in ("mean", "std")]])
    for row in rows:
        cells = [getattr(row, s)(k) for k in keys for s in ("mean", "std")]
        writer.writerow([row.label, row.n, *["" if math.isnan(x) else f"{x:.6g}" for x in cells]])  # n=1: no std
    return buf.getvalue()


# ----------------------------------------------------------------------------- report


def write_report(
    runs: Sequence[RunResult], out_dir: str | os.PathLike, wandb: bool = False, failed: Sequence[Path] = ()
) -> dict[str, Path]:
    import matplotlib

    from kvcompress.evaluation import plots

    matplotlib.use("Agg")
    out = Path(out_dir)
    rows = aggregate(runs)
    notes = plots.cache_notes(runs)
    written = {"markdown": out / "report.md", "csv": out / "report.csv"}
    atomic_write_text(written["markdown"], markdown(rows, failed) + plots.cache_notes_markdown(runs))
    atomic_write_text(written["csv"], csv_text(rows))
    written["position_ppl"] = plots.plot_position_ppl(rows, out / "position_ppl.png")
    written["ppl_vs_bytes"] = plots.plot_ppl_vs_bytes(rows, out / "ppl_vs_bytes.png", notes)
    written["tpot"] = plots.plot_tpot(rows, out / "tpot.png", notes)
    written["training_curves"] = plots.plot_training_curves(runs, out / "training_curves.png")
    if wandb:
        plots.log_to_wandb(written, runs)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvcompress.report", description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", help="run or multirun folders (searched for metrics.json)")
    p.add_argument("--out", default=None, help="output folder (default: <first folder>/report)")
    p.add_argument("--wandb", action="store_true", help="also log the table and plots to W&B")
    args = p.parse_args(argv)
    runs = load_runs(args.folders)
    failed = find_run_folders(args.folders)[1]
    if not runs:
        raise SystemExit(f"no metrics.json under {', '.join(args.folders)}")
    written = write_report(runs, args.out or Path(args.folders[0]) / "report", wandb=args.wandb, failed=failed)
    print(Path(written["markdown"]).read_text())
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
