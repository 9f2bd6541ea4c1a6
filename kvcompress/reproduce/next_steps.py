"""Seed report 000's open next steps as one reported table (conf/reproduce/next_steps.yaml): grouped K/V heads
(GQA-2, MQA) converted from the trained baseline and uptrained, the KA cache with and without them (PPL against
bytes), and the adapter variants' autoregressive PPL per epoch. These are new results, so every comparison is
"reported" (with its paired 95% interval and which side of 1 it lies on), never "reproduced".

Runs may start from an earlier run of the same seed: `{run:<name>}` in an override is that run's folder
(`resolve_run_references`, applied to the plan). Each run records per-window losses (`eval=windows`; the GQA
stage also records its pooled start, `stages.gqa.start_windows`), so two rows are compared on the same
validation windows: `paired_ratio` on units (seed, window) of the seeds both rows finished (each seed draws its
own validation windows, so windows pair within a seed only; the hashes of the windows must agree).
"""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kvcompress.evaluation.stats import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED, paired_ratio, verdict_less
from kvcompress.reproduce.protocol import RunSpec
from kvcompress.utils import atomic_write_text

REPORTED = "reported"
TITLE = "Seed report 000's next steps: GQA / MQA with the KA cache, and the adapter variants (new results)"
REFERENCE = re.compile(r"\{run:([A-Za-z0-9_]+)\}")


def resolve_run_references(specs: Sequence[RunSpec]) -> list[RunSpec]:
    """Replace `{run:<name>}` in each run's overrides by the folder of run <name> of the same table and seed, which
    must come earlier in the plan (runs train in plan order)."""
    done: dict[tuple[str, str, int], Path] = {}
    out = []
    for spec in specs:

        def folder(match: re.Match[str], spec: RunSpec = spec) -> str:
            key = (spec.table, match.group(1), spec.seed)
            if key not in done:
                raise ValueError(
                    f"table {spec.table} run {spec.name}: {match.group(0)} names no earlier run of seed {spec.seed}"
                )
            return str(done[key])

        overrides = tuple(REFERENCE.sub(folder, o) for o in spec.overrides)
        out.append(replace(spec, overrides=overrides))
        done[(spec.table, spec.name, spec.seed)] = spec.folder
    return out


@dataclass(frozen=True)
class Row:
    """A (model, cache) point: its per-window losses and cache bytes in each seed's metrics.json."""

    label: str
    run: str
    windows: str  # dotted path to a per-window loss list, e.g. "windows.parallel", "windows.autoregressive.ka"
    bytes: str | None  # dotted path to the cache's bytes per token, e.g. "caches.kv.bytes_per_token"


def windows_record(path: str) -> str:
    """The record a row's windows path points into ("windows", "stages.gqa.start_windows"): it holds the hash."""
    return path.partition(".parallel")[0] if ".parallel" in path else path.partition(".autoregressive")[0]


KV, KA_PLAIN, KA = (f"caches.{kind}.bytes_per_token" for kind in ("native", "ka_plain", "ka"))  # native: kv
PARALLEL, START = "windows.parallel", "stages.gqa.start_windows.parallel"
AR_PLAIN, AR_KA = "windows.autoregressive.ka_plain", "windows.autoregressive.ka"
ROWS = [
    Row("MHA, KV cache", "baseline", PARALLEL, KV),
    Row("MHA, KA cache (no adapter)", "baseline", AR_PLAIN, KA_PLAIN),
    Row("MHA, KA cache + adapter", "ka_adapter", AR_KA, KA),
    Row("GQA-2 pooled, before uptraining, KV", "gqa2", START, KV),
    Row("GQA-2 uptrained, KV cache", "gqa2", PARALLEL, KV),
    Row("GQA-2, KA cache (no adapter)", "gqa2", AR_PLAIN, KA_PLAIN),
    Row("GQA-2, KA cache + adapter", "gqa2_ka_adapter", AR_KA, KA),
    Row("MQA pooled, before uptraining, KV", "mqa", START, KV),
    Row("MQA uptrained, KV cache", "mqa", PARALLEL, KV),
    Row("MQA, KA cache (no adapter)", "mqa", AR_PLAIN, KA_PLAIN),
    Row("MQA, KA cache + adapter", "mqa_ka_adapter", AR_KA, KA),
    Row("MHA, KA + adapter, bottleneck 128", "ka_adapter_wide", AR_KA, KA),
    Row("MHA, KA + adapter, 2 layers", "ka_adapter_deep", AR_KA, KA),
    Row("MHA, KA + adapter, unrolled loss", "ka_adapter_unrolled", AR_KA, KA),
]
ROWS_BY_LABEL = {row.label: row for row in ROWS}
BASE = "MHA, KV cache"
# (B, A): PPL(B) / PPL(A) on paired windows.
COMPARISONS = [
    *[(row.label, BASE) for row in ROWS if row.label != BASE],
    ("GQA-2 uptrained, KV cache", "GQA-2 pooled, before uptraining, KV"),
    ("MQA uptrained, KV cache", "MQA pooled, before uptraining, KV"),
    ("GQA-2, KA cache + adapter", "MHA, KA cache + adapter"),
    ("MQA, KA cache + adapter", "MHA, KA cache + adapter"),
    ("GQA-2, KA cache + adapter", "GQA-2 uptrained, KV cache"),
    ("MHA, KA + adapter, bottleneck 128", "MHA, KA cache + adapter"),
    ("MHA, KA + adapter, 2 layers", "MHA, KA cache + adapter"),
    ("MHA, KA + adapter, unrolled loss", "MHA, KA cache + adapter"),
]
ADAPTER_RUNS = [row.run for row in ROWS if row.windows == AR_KA]


def get(metrics: dict[str, Any], path: str) -> Any:
    """A dotted path into metrics.json (the `stages` list is indexed by stage name)."""
    node: Any = metrics
    for key in path.split("."):
        if isinstance(node, list):
            node = next((s for s in node if isinstance(s, dict) and s.get("name") == key), None)
        elif isinstance(node, dict):
            node = node.get(key)
        if node is None:
            return None
    return node


Runs = dict[str, dict[int, dict[str, Any]]]  # run name -> seed -> metrics.json (with `_folder`)


def load_runs(specs: Sequence[RunSpec]) -> Runs:
    """The finished runs' metrics.json by run and seed (a run is finished when its metrics.json exists)."""
    runs: Runs = {}
    for spec in specs:
        path = spec.folder / "metrics.json"
        if path.is_file():
            runs.setdefault(spec.name, {})[spec.seed] = {**json.loads(path.read_text()), "_folder": str(spec.folder)}
    return runs


def window_losses(runs: Runs, row: Row) -> dict[int, tuple[str, list[float]]]:
    """Per seed: (the windows' hash, the per-window mean losses) of a row."""
    head = windows_record(row.windows)
    out = {}
    for seed, metrics in runs.get(row.run, {}).items():
        losses, digest = get(metrics, row.windows), get(metrics, f"{head}.sha256")
        if isinstance(losses, list) and losses:
            out[seed] = (str(digest), [float(x) for x in losses])
    return out


def seed_ppls(runs: Runs, row: Row) -> list[float]:
    return [math.exp(statistics.fmean(losses)) for _, losses in window_losses(runs, row).values()]


def compare(runs: Runs, b: Row, a: Row, resamples: int = 2000) -> tuple[str, str]:
    """(PPL(b) / PPL(a) [95% CI] text, its side of 1) on units (seed, window) of the seeds both rows have."""
    wa, wb = window_losses(runs, a), window_losses(runs, b)
    seeds = sorted(set(wa) & set(wb))
    if not seeds:
        return "—", "no paired seeds"
    mismatched = [s for s in seeds if wa[s][0] != wb[s][0]]
    if mismatched:
        return "—", f"not the same windows (seeds {mismatched})"
    units_a = [x for s in seeds for x in wa[s][1]]
    units_b = [x for s in seeds for x in wb[s][1]]
    cmp = paired_ratio([units_a], [units_b], resamples=resamples)
    side = {REPRODUCED: "lower", NOT_REPRODUCED: "not lower", INCONCLUSIVE: "inconclusive"}[verdict_less(cmp, 1.0)]
    if side == "not lower" and cmp.ci[0] > 1.0:
        side = "higher"
    return f"{cmp.text(3)} (n = {len(seeds)} seeds x {len(wa[seeds[0]][1])} windows)", side


def fmt(xs: list[float], digits: int = 1) -> str:
    if not xs:
        return "—"
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f} (n=1)"
    return f"{statistics.fmean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f} (n={len(xs)})"


def adapter_curve(folder: Path, stage: str = "adapter") -> list[dict[str, float]]:
    """Per validation of the adapter stage (epoch order): `val_ar_ppl` and the logged adapter losses, from the CSV."""
    rows: list[dict[str, float]] = []
    for path in sorted(folder.rglob("metrics.csv")):
        with open(path) as f:
            for row in csv.DictReader(f):
                if row.get(f"{stage}/val_ar_ppl"):
                    rows.append(
                        {
                            k.split("/", 1)[1]: float(v)
                            for k, v in row.items()
                            if k.startswith(f"{stage}/val_") and v and "/val_pos_ppl" not in k
                        }
                    )
    return rows


def adapter_section(runs: Runs) -> list[str]:
    lines = ["### Adapter variants: autoregressive KA-cache PPL by epoch (mean ± std over seeds)", ""]
    curves = {run: [adapter_curve(Path(m["_folder"])) for m in runs.get(run, {}).values()] for run in ADAPTER_RUNS}
    n_epochs = max((len(c) for cs in curves.values() for c in cs), default=0)
    if not n_epochs:
        return [*lines, "No adapter run has finished.", ""]
    lines += [
        "| run | "
        + " | ".join(f"epoch {i + 1}" for i in range(n_epochs))
        + " | seeds where AR PPL rose after epoch 1 while the training objective fell |"
    ]  # noqa: E501
    lines.append("| --- " * (n_epochs + 2) + "|")
    for run, cs in curves.items():
        if not cs:
            continue
        cells = [fmt([c[i]["val_ar_ppl"] for c in cs if len(c) > i]) for i in range(n_epochs)]
        loss = "val_unrolled" if any("val_unrolled" in r for c in cs for r in c) else "val_adapter"
        diverged = [c for c in cs if len(c) > 1 and loss in c[0] and loss in c[1]]
        rose = sum(c[1][loss] < c[0][loss] and c[1]["val_ar_ppl"] > c[0]["val_ar_ppl"] for c in diverged)
        lines.append(f"| {run} | " + " | ".join(cells) + f" | {rose} of {len(diverged)} ({loss}) |")
    lines += ["", "Each adapter stage keeps its best epoch by `val_ar_ppl` (early stopping, patience 1).", ""]
    return lines


def section(specs: Sequence[RunSpec], resamples: int = 2000) -> list[str]:
    """The table's markdown: PPL against bytes per row, the paired comparisons, the adapter curves, wall times."""
    runs = load_runs(specs)
    lines = [f"## {TITLE}", "", f"Status of every comparison: **{REPORTED}** (new results, not a seed report's).", ""]
    lines += [
        "| row | run | cache bytes / token (all layers) | PPL (mean ± std over seeds) |",
        "| --- | --- | --- | --- |",
    ]  # noqa: E501
    for row in ROWS:
        sizes = [get(m, row.bytes) for m in runs.get(row.run, {}).values()] if row.bytes else []
        size = f"{statistics.fmean(sizes):.0f}" if sizes and all(isinstance(s, int | float) for s in sizes) else "—"
        lines.append(f"| {row.label} | {row.run} | {size} | {fmt(seed_ppls(runs, row))} |")
    lines += ["", "| B | A | PPL(B) / PPL(A) [95% CI] | B is | status |", "| --- | --- | --- | --- | --- |"]
    for b, a in COMPARISONS:
        text, side = compare(runs, ROWS_BY_LABEL[b], ROWS_BY_LABEL[a], resamples)
        lines.append(f"| {b} | {a} | {text} | {side} | {REPORTED} |")
    lines += [
        "",
        "Intervals: hierarchical paired bootstrap (`kvcompress.evaluation.stats.paired_ratio`) over units (seed, "
        "validation window), pairing each window with itself (each seed draws its own windows); a row's windows "
        "are the first `eval.autoregressive.max_batches` validation batches.",
        "",
        *adapter_section(runs),
        "### Wall time per run on this machine",
        "",
        "| run | seconds per seed (training + evaluation) |",
        "| --- | --- |",
    ]
    for name in dict.fromkeys(s.name for s in specs):
        secs = []
        for s in specs:
            record = s.folder / "reproduce.json"
            if s.name == name and record.is_file():
                secs.append(float(json.loads(record.read_text()).get("seconds", 0.0)))
        lines.append(f"| {name} | {fmt(secs, 0)} |")
    return [*lines, ""]


def write_next_steps(out: Path, specs: Sequence[RunSpec], resamples: int = 2000) -> Path:
    """`<out>/NEXT_STEPS.md` from the finished runs of the plan."""
    path = out / "NEXT_STEPS.md"
    atomic_write_text(path, "\n".join(["# " + TITLE, "", *section(specs, resamples)[2:]]) + "\n")
    return path
