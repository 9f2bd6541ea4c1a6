"""REPRODUCTION.md: per table the seed report's numbers next to ours, each claim's verdict (the report's number, ours
with its 95% CI, the threshold and its source), the protocol's deviations from the report, and the plots."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kvcompress.records import git_state
from kvcompress.reproduce.claims import NOT_COMPARABLE, STAGE_RECORDS, TABLES, Judgement, Runs, Table, fmt, values
from kvcompress.reproduce.next_steps import NEXT_STEPS
from kvcompress.reproduce.protocol import RunSpec
from kvcompress.reproduce.runs import RUN_FILE, finished
from kvcompress.utils import atomic_write_text, file_sha256

log = logging.getLogger("kvcompress.reproduce")
STATISTICS = (
    "Each claim compares PPLs as ratios on the same validation windows, paired window by window and pooled over "
    "seeds: `kvcompress.evaluation.stats.paired_ratio`, a hierarchical paired bootstrap (2,000 resamples; each draws "
    "the seeds of each row and one shared set of windows, with replacement), 95% percentile intervals. Verdicts: "
    "**reproduced** (the interval lies on the claim's side of its threshold), **not reproduced** (on the other "
    "side), **inconclusive** (it straddles the threshold); *not comparable* when what the claim needs was not "
    "recorded. A claim over k comparisons (an ordering: each adjacent pair; every bucket) is reproduced when each "
    "is, and not reproduced when one lies on the wrong side at the Bonferroni level 1 - 0.05/k. 'Within x%' claims "
    "use TOST: the 90% interval inside the margin. Position claims are judged only where the model measurably uses "
    "context (the context check: PPL with the last 16 tokens of context / PPL with the full context, CI above 1). "
    "With 2 seeds the bootstrap's seed draw is coarse (it sees about half the seed-to-seed variance); the window "
    "pairing carries most of the precision."
)


ALL_TABLES: dict[str, Table] = {**TABLES, "000n": NEXT_STEPS}  # the seed reports' tables and 000's next steps


def _metrics_of(spec: RunSpec) -> list[dict[str, Any]]:
    """The finished run's metrics.json with `_folder`, `_windows` and `_stages` (see `claims`), or nothing."""
    if not finished(spec):
        return []
    try:
        metrics = json.loads((spec.folder / "metrics.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        log.warning("skipping %s: unreadable metrics.json (%s)", spec.folder / "metrics.json", err)
        return []
    return [
        {**metrics, "_folder": str(spec.folder), "_windows": run_windows(spec.folder), "_stages": stages_of(metrics)}
    ]


def run_windows(folder: Path) -> dict[str, np.ndarray] | None:
    """The run's per-window records (`windows.safetensors`), or None when it has none."""
    from kvcompress.evaluation.windows import FILE, load_windows

    if not (folder / FILE).is_file():
        return None
    try:
        return load_windows(folder)
    except ValueError as err:  # damaged: named, and the claims that need it are not comparable
        log.warning("%s", err)
        return None


def stages_of(metrics: dict[str, Any]) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """The per-window and per-token records each stage kept in its folder (`claims.STAGE_RECORDS`)."""
    from safetensors.numpy import load_file

    out: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for stage in metrics.get("stages") or []:
        if not stage.get("weights"):
            continue
        folder = Path(stage["weights"]).parent
        for stem in STAGE_RECORDS:
            path = folder / f"{stem}.safetensors"
            if path.is_file():
                try:
                    out.setdefault(stage["name"], {})[stem] = load_file(str(path))
                except Exception as err:  # noqa: BLE001 - damaged: named, the claims needing it not comparable
                    log.warning("skipping %s: unreadable (%s)", path, err)
    return out


def load_table_runs(specs: Sequence[RunSpec]) -> Runs:
    runs: Runs = {}
    for spec in specs:
        for metrics in _metrics_of(spec):
            runs.setdefault(spec.name, []).append(metrics)
    return runs


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def flat(items: Any) -> list[str]:
    """A protocol list whose items may be lists (a YAML alias of a shared list): spliced."""
    return [str(x) for item in items or [] for x in (item if isinstance(item, list) else [item])]


def run_seconds(spec: RunSpec) -> float:
    """The run's training wall time (recorded by `execute` in reproduce.json)."""
    return float(json.loads((spec.folder / RUN_FILE).read_text()).get("seconds", 0.0))


def table_section(
    table: str, specs: Sequence[RunSpec], out: Path, plots: dict[str, Path], entry: dict[str, Any] | None = None
) -> list[str]:
    """One table's section; `entry` is the protocol's table (its `deviations` and `thresholds`)."""
    spec_table, entry = ALL_TABLES[table], entry or {}
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
        digits = 3 if seed_value is not None and seed_value < 1 else 1
        report = "—" if seed_value is None else f"{seed_value:g}"
        lines.append(f"| {label} | {report} | {fmt(values(runs, run, path), digits)} |")
    lines += [
        "",
        "| claim | verdict | the report (its checkpoint) | ours, 95% CI | threshold and its source | note |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for claim in spec_table.claims:
        judged = claim.judge(runs, entry.get("thresholds")) if runs else Judgement(NOT_COMPARABLE, note="no run")
        cells = [claim.text, f"**{judged.verdict}**", judged.report, judged.ours, judged.threshold, judged.note]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    deviations = flat(entry.get("deviations"))
    lines += ["", "Deviations from the report (this protocol):", ""]
    lines += [f"- {d}" for d in deviations] or ["- none declared"]
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
        f"- Statistics: {STATISTICS}",
    ]
    changes = flat(protocol.get("changes"))
    if changes:
        lines.append("- Changed versus the previous protocol of this scale:")
        lines += [f"  - {c}" for c in changes]
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
        entry = protocol["tables"].get(table, {})
        lines += table_section(table, table_specs, out, table_plots(out, table, table_specs), entry)
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
