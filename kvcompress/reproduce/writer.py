"""REPRODUCTION.md: per table the seed report's numbers next to ours, each claim's verdict, and the plots."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvcompress.records import git_state
from kvcompress.reproduce.claims import NOT_COMPARABLE, POSITION_CLAIM, TABLES, Runs, fmt, values
from kvcompress.reproduce.protocol import RunSpec
from kvcompress.reproduce.runs import RUN_FILE, finished
from kvcompress.utils import atomic_write_text, file_sha256


def _metrics_of(spec: RunSpec) -> list[dict[str, Any]]:
    """The finished run's metrics.json (with `_folder`), or nothing."""
    if not finished(spec):
        return []
    metrics = json.loads((spec.folder / "metrics.json").read_text())
    return [{**metrics, "_folder": str(spec.folder)}]


def load_table_runs(specs: Sequence[RunSpec]) -> Runs:
    runs: Runs = {}
    for spec in specs:
        for metrics in _metrics_of(spec):
            runs.setdefault(spec.name, []).append(metrics)
    return runs


def run_seconds(spec: RunSpec) -> float:
    """The run's training wall time (recorded by `execute` in reproduce.json)."""
    return float(json.loads((spec.folder / RUN_FILE).read_text()).get("seconds", 0.0))


def table_section(table: str, specs: Sequence[RunSpec], out: Path, plots: dict[str, Path]) -> list[str]:
    spec_table = TABLES[table]
    runs = load_table_runs(specs)
    names = list(dict.fromkeys(s.name for s in specs))
    seconds = sum(run_seconds(s) for s in specs if finished(s))
    lines = [f"## Table {table}: {spec_table.title}", "", f"Training time: {seconds / 60:.1f} min (all its runs).", ""]
    lines += ["| run | seeds finished | overrides |", "| --- | --- | --- |"]
    for name in names:
        first = next(s for s in specs if s.name == name)
        n = len(runs.get(name, []))
        note = f" ({first.note})" if first.note else ""
        lines.append(f"| {name}{note} | {n} of {sum(s.name == name for s in specs)} | `{' '.join(first.overrides)}` |")
    lines += ["", "| row | seed report | ours (mean ± std over seeds) |", "| --- | --- | --- |"]
    for label, run, path, seed_value in spec_table.seed_rows:
        lines.append(f"| {label} | {seed_value:g} | {fmt(values(runs, run, path), 3 if seed_value < 1 else 1)} |")
    lines += ["", "| claim | verdict | evidence |", "| --- | --- | --- |"]
    for claim in [*spec_table.claims, POSITION_CLAIM]:
        if not runs:
            verdict, evidence = NOT_COMPARABLE, "no finished run"
        else:
            try:
                verdict, evidence = claim.check(runs)
            except (KeyError, ValueError, ZeroDivisionError, StopIteration) as err:
                verdict, evidence = NOT_COMPARABLE, f"{type(err).__name__}: {err}"
        lines.append(f"| {claim.text} | **{verdict}** | {evidence} |")
    if plots:
        lines += ["", "Plots: " + ", ".join(f"[{k}]({p.relative_to(out)})" for k, p in plots.items())]
    return [*lines, ""]


def write_reproduction(
    out: Path, protocol: dict[str, Any], specs: Sequence[RunSpec], status: dict[RunSpec, tuple[str, float]],
    tokenizer: Path | None, wall_s: float,
) -> Path:  # fmt: skip
    code = git_state() or {}
    scale = protocol["scale"]
    reused = sum(verdict == "reused" for verdict, _ in status.values())
    times = [run_seconds(s) for s in specs if finished(s)]
    train_s, n_done = sum(times), len(times)
    lines = [
        f"# REPRODUCTION ({scale} scale)",
        "",
        f"- Command: `python -m kvcompress.reproduce {' '.join(sys.argv[1:])}`",
        f"- Code: commit `{code.get('commit')}`" + (" (uncommitted changes)" if code.get("dirty") else ""),
        f"- Training time (each run's own wall time, summed): {train_s / 60:.1f} min over {n_done} finished runs; "
        f"this invocation: {wall_s / 60:.1f} min, {reused} runs reused",
        f"- Seeds: {sorted({s.seed for s in specs})}; machine: {os.cpu_count()} CPU cores",
        f"- Protocol: `conf/reproduce/{scale}.yaml`. {protocol.get('description', '').strip()}",
    ]
    if tokenizer is not None:
        lines.append(f"- Tokenizer: `{tokenizer}` (sha256 `{file_sha256(tokenizer)[:16]}…`), trained by this run")
    commits = sorted({str((m.get("code") or {}).get("commit", "?"))[:10] for s in specs for m in _metrics_of(s)})
    lines.append(f"- Code the runs trained on (their metrics.json `code.commit`): {', '.join(commits) or '—'}")
    failed = [s for s, (v, _) in status.items() if v == "failed"]
    if failed:
        lines.append(
            "- Failed runs (see their console.log): " + ", ".join(f"`{s.folder.relative_to(out)}`" for s in failed)
        )
    lines.append("")
    for table in dict.fromkeys(s.table for s in specs):
        table_specs = [s for s in specs if s.table == table]
        lines += table_section(table, table_specs, out, table_plots(out, table, table_specs))
    path = out / "REPRODUCTION.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def table_plots(out: Path, table: str, specs: Sequence[RunSpec]) -> dict[str, Path]:
    """The table's report (markdown, CSV, PNGs) by `kvcompress.report`, labelled by run name."""
    folders = [s.folder for s in specs if finished(s)]
    if not folders:
        return {}
    from kvcompress.evaluation import report

    runs = report.load_runs(folders)
    label = {str(s.folder.resolve()): s.name for s in specs}
    for run in runs:
        run.label = label.get(str(Path(run.path).resolve()), run.label)
    failed = [s.folder for s in specs if not finished(s) and s.folder.is_dir()]
    written = report.write_report(runs, out / table / "report", failed=failed)
    return {k: Path(p) for k, p in written.items() if str(p).endswith(".png")}
