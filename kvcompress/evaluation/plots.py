"""The report's figures (and its W&B run): position-wise PPL, PPL vs measured cache bytes with the Pareto front,
decode TPOT per cache, training loss and validation curves.

Made to be read: legends name the settings that differ between the configurations (the shared ones go in the
title), error bars are 95% confidence intervals of the mean over seeds (Student t) wherever n > 1 and say so,
axes show plain numbers (no offsets) and go logarithmic where the values span a decade, TPOT bars carry their
cache's name, and a cache the evaluation flagged (equal to another, larger than KV) is marked.

`rows` are `report.Aggregate`s (label, n, values by metric, mean(), std()); `runs` are `report.RunResult`s.
"""

from __future__ import annotations

import csv
import math
import os
import statistics
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from kvcompress.evaluation.report import buckets, cache_kinds
from kvcompress.utils import atomic_write

if TYPE_CHECKING:
    from kvcompress.evaluation.report import Aggregate, RunResult

MIN_HEIGHT = 3.5  # inches: no figure collapses to a strip
# Student t quantiles t_{0.975, df} for df = 1..30 (beyond: 1.96).
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045,
        2.042)  # fmt: skip
CI_TEXT = "error bars: 95% CI of the mean over seeds (t), where n > 1"
WandbMode = Literal["online", "offline", "disabled", "shared"]


def ci95(xs: Sequence[float]) -> float:
    """Half width of the 95% confidence interval of the mean of xs (0 for n < 2)."""
    n = len(xs)
    if n < 2:
        return 0.0
    return (T975[n - 2] if n - 1 <= len(T975) else 1.96) * statistics.stdev(xs) / math.sqrt(n)


# ----------------------------------------------------------------------------- labels


def settings(label: str) -> dict[str, str]:
    """The `key=value` settings of a configuration label (its overrides); a bare word is a setting of its own."""
    out: dict[str, str] = {}
    for token in label.split():
        key, sep, value = token.partition("=")
        out[key.lstrip("+~")] = value if sep else "on"
    return out


def legend_labels(labels: Sequence[str]) -> tuple[dict[str, str], str]:
    """({label: the settings in which it differs from the others}, the settings all share) — e.g.
    `rank=0.375` and `rank=0.625`, sharing `debug=smoke model=vdproj phase=two_stage`. A setting one
    configuration leaves out shows as `default`. Keys are shortened to their last part where that is unique.
    Labels that are names, not settings (a reproduction's run names), stay as they are."""
    if any("=" not in label for label in labels):
        return {label: label for label in labels}, ""
    parsed = {label: settings(label) for label in labels}
    keys = list(dict.fromkeys(k for s in parsed.values() for k in s))
    differing = [k for k in keys if len({s.get(k) for s in parsed.values()}) > 1]
    common = " ".join(f"{k}={v}" if v != "on" else k for k, v in next(iter(parsed.values()), {}).items()
                      if k not in differing)  # fmt: skip
    tails = [k.rsplit(".", 1)[-1] for k in differing]
    short = {k: t if tails.count(t) == 1 else k for k, t in zip(differing, tails, strict=True)}
    out = {}
    for label, s in parsed.items():
        out[label] = ", ".join(f"{short[k]}={s.get(k, 'default')}" for k in differing) or "all runs"
    return out, common


def _title(ax: Any, title: str, common: str, width: int = 110) -> None:
    subtitle = "\n".join(textwrap.wrap(f"all runs: {common}", width)) if common else ""
    ax.set_title(title + ("\n" if subtitle else ""), fontsize=10, loc="left")
    if subtitle:
        ax.text(0, 1.01, subtitle, transform=ax.transAxes, fontsize=6.5, va="bottom", color="0.35")


def _n_text(n: int) -> str:
    return f" (n={n})"


# ----------------------------------------------------------------------------- axes


def _number(value: float, _: Any = None) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def _minor_number(value: float, _: Any = None) -> str:
    mantissa = value / 10 ** math.floor(math.log10(value)) if value > 0 else 0
    return _number(value) if round(mantissa) in (2, 5) and abs(mantissa - round(mantissa)) < 1e-6 else ""


def plain_axis(ax: Any, which: str, values: Sequence[float]) -> None:
    """Plain tick labels, never an offset; a log scale where the positive values span a decade or more."""
    from matplotlib.ticker import FuncFormatter, ScalarFormatter

    axis = ax.yaxis if which == "y" else ax.xaxis
    positive = [v for v in values if v > 0 and math.isfinite(v)]
    if positive and max(positive) / min(positive) >= 10:
        (ax.set_yscale if which == "y" else ax.set_xscale)("log")
        axis.set_major_formatter(FuncFormatter(_number))
        axis.set_minor_formatter(FuncFormatter(_minor_number))
    else:
        formatter = ScalarFormatter(useOffset=False)
        formatter.set_scientific(False)
        axis.set_major_formatter(formatter)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110), mode="wb")
    plt.close(fig)
    return path


def _legend(ax: Any, entries: int, title: str | None = None) -> None:
    if entries:
        ax.legend(fontsize=7, title=title, title_fontsize=7, loc="best" if entries <= 6 else "upper left",
                  bbox_to_anchor=None if entries <= 6 else (1.01, 1.0))  # fmt: skip


# ----------------------------------------------------------------------------- figures


def cache_notes(runs: Sequence[RunResult]) -> dict[tuple[str, str], str]:
    """(configuration label, cache key) -> the evaluation's note (e.g. `equals kv at 32-token windows`)."""
    notes: dict[tuple[str, str], str] = {}
    for run in runs:
        for key, cache in (run.metrics.get("caches") or {}).items():
            if isinstance(cache, dict) and cache.get("note"):
                notes[run.label, key] = str(cache["note"])
    return notes


def cache_notes_markdown(runs: Sequence[RunResult]) -> str:
    """The flagged caches, for report.md (empty when none)."""
    notes = cache_notes(runs)
    if not notes:
        return ""
    lines = ["", "Flagged caches (marked in the plots; check their settings):", ""]
    lines += [f"- `{label}` {key}: {note}" for (label, key), note in notes.items()]
    return "\n".join(lines) + "\n"


def plot_position_ppl(rows: Sequence[Aggregate], path: Path) -> Path:
    import matplotlib.pyplot as plt

    pos = buckets(rows)
    names, common = legend_labels([row.label for row in rows])
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    values: list[float] = []
    for i, row in enumerate(rows):
        keys = [f"val_pos_ppl.{b}" for b in pos]
        if pos and all(k in row.values for k in keys):
            means = [row.mean(k) for k in keys]
            values += means
            errors = [ci95(row.values[k]) for k in keys]
            shift = (i - (len(rows) - 1) / 2) * 0.04  # side by side, so the error bars do not hide each other
            x = [j + shift for j in range(len(pos))]
            ax.errorbar(x, means, yerr=errors, marker="o", capsize=3, label=names[row.label] + _n_text(row.n))
    ax.set_xticks(range(len(pos)), [f"[{b})" for b in pos])
    ax.set(xlabel="token positions", ylabel="validation PPL")
    plain_axis(ax, "y", values)
    _title(ax, "PPL by position in the window", common)
    _legend(ax, len(rows), CI_TEXT if any(r.n > 1 for r in rows) else None)
    return _save(fig, path)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not beaten on both bytes and PPL, by increasing bytes."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points):
        if not front or y < front[-1][1]:
            front.append((x, y))
    return front


def plot_ppl_vs_bytes(rows: Sequence[Aggregate], path: Path, notes: dict[tuple[str, str], str] | None = None) -> Path:
    """Each configuration's run cache (val PPL, circles) and every cache of `eval.caches` with an autoregressive
    PPL (triangles), against its measured bytes per token; flagged caches hollow, their note in the legend."""
    import matplotlib.pyplot as plt

    notes = notes or {}
    names, common = legend_labels([row.label for row in rows])
    fig, ax = plt.subplots(figsize=(8.5, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    points, xs, ys, entries = [], [], [], 0
    for i, row in enumerate(rows):
        candidates: list[tuple[str, str, str, str, str | None]] = [
            ("cache.bytes_per_token", "val_ppl", "run cache, val PPL", "o", None)
        ]
        for name in cache_kinds([row]):
            item = (f"caches.{name}.bytes_per_token", f"caches.{name}.autoregressive_ppl", f"{name}, AR PPL", "^", name)
            candidates.append(item)
        for bytes_key, ppl_key, what, marker, kind in candidates:
            if bytes_key not in row.values or ppl_key not in row.values:
                continue
            x, y = row.mean(bytes_key), row.mean(ppl_key)
            note = notes.get((row.label, kind)) if kind else None
            color = colors[i % len(colors)]
            label = f"{names[row.label]}: {what}{_n_text(row.n)}" + (f" [{note}]" if note else "")
            ax.errorbar(x, y, xerr=ci95(row.values[bytes_key]), yerr=ci95(row.values[ppl_key]), fmt=marker,
                        color=color, mfc="none" if note else color, ms=8, capsize=3, label=label)  # fmt: skip
            points.append((x, y))
            xs.append(x)
            ys.append(y)
            entries += 1
    front = pareto_front(points)
    if len(front) > 1:
        ax.plot(*zip(*front, strict=True), "k--", lw=1, label="Pareto front")
        entries += 1
    ax.set(xlabel="cache bytes per token (measured)", ylabel="PPL")
    plain_axis(ax, "x", xs)
    plain_axis(ax, "y", ys)
    _title(ax, "PPL vs cache size (lower left is better)", common)
    _legend(ax, entries, CI_TEXT if any(r.n > 1 for r in rows) else None)
    return _save(fig, path)


def plot_tpot(rows: Sequence[Aggregate], path: Path, notes: dict[tuple[str, str], str] | None = None) -> Path:
    """One bar per (configuration, cache), named by its cache; bars of one cache kind share a color."""
    import matplotlib.pyplot as plt

    notes = notes or {}
    names, common = legend_labels([row.label for row in rows])
    kinds = cache_kinds(rows)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    bars = []  # (tick label, cache, mean ms, ci ms, n)
    for row in rows:
        for kind in kinds:
            key = f"caches.{kind}.tpot_s"
            if key in row.values:
                config = "" if len(rows) == 1 else f"  ({names[row.label]})"
                flag = " [flagged]" if (row.label, kind) in notes else ""
                tick = f"{kind}{flag}{config}"
                bars.append((tick, kind, row.mean(key) * 1e3, ci95(row.values[key]) * 1e3, row.n))
    fig, ax = plt.subplots(figsize=(8, max(MIN_HEIGHT, 1.2 + 0.4 * len(bars))))
    for i, (_, kind, mean, ci, n) in enumerate(bars):
        ax.barh(i, mean, xerr=ci or None, capsize=3, color=colors[kinds.index(kind) % len(colors)])
        ax.text(mean + ci, i, f"  {kind}: {mean:.2f} ms" + (_n_text(n) if n > 1 else ""), va="center", fontsize=7)
    ax.set_yticks(range(len(bars)), [b[0] for b in bars], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max([m + c for _, _, m, c, _ in bars], default=1.0) * 1.35)
    ax.set(xlabel="decode time per output token (ms, median step)")
    plain_axis(ax, "x", [0.0])
    _title(ax, "Decode TPOT per cache" + (f"; {CI_TEXT}" if any(r.n > 1 for r in rows) else ""), common)
    return _save(fig, path)


def training_curves(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """`<stage>/train_loss` (every logged step) and `<stage>/val_ppl` (every validation) by step, from the run's
    Lightning CSV logs (steps run on from one stage to the next)."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for log in sorted(folder.rglob("metrics.csv")):
        with open(log) as f:
            for row in csv.DictReader(f):
                for key, value in row.items():
                    if key and key.endswith(("/val_ppl", "/train_loss")) and value and row.get("step"):
                        curves.setdefault(key, []).append((int(float(row["step"])), float(value)))
    return curves


def plot_training_curves(runs: Sequence[RunResult], path: Path) -> Path:
    """Left: training loss by step; right: validation PPL at each validation; mean over seeds (95% CI band at
    n > 1); dotted lines where a stage starts."""
    import matplotlib.pyplot as plt

    names, common = legend_labels(list(dict.fromkeys(run.label for run in runs)))
    series: dict[tuple[str, str], dict[int, list[float]]] = {}  # (label, metric key) -> step -> values
    seeds: dict[str, int] = {}
    stage_starts: dict[str, int] = {}
    for run in runs:
        seeds[run.label] = seeds.get(run.label, 0) + 1
        for key, points in training_curves(run.path).items():
            by_step: dict[int, list[float]] = {}
            last = None
            for step, value in sorted(points):
                if key.endswith("/val_ppl") and value == last:  # the same weights validated again (the stage's end)
                    continue
                by_step.setdefault(step, []).append(value)
                last = value
            for step, at_step in by_step.items():
                series.setdefault((run.label, key), {}).setdefault(step, []).append(statistics.fmean(at_step))
            stage = key.split("/")[0]
            stage_starts[stage] = min(stage_starts.get(stage, 1 << 62), min(s for s, _ in points))
    fig, (loss_ax, val_ax) = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    labels = list(dict.fromkeys(run.label for run in runs))
    values: dict[str, list[float]] = {"train_loss": [], "val_ppl": []}
    labelled: set[tuple[str, str]] = set()
    for (label, key), by_step in series.items():
        stage, metric = key.split("/")
        ax = loss_ax if metric == "train_loss" else val_ax
        steps = sorted(by_step)
        means = [statistics.fmean(by_step[s]) for s in steps]
        values[metric] += means
        color = colors[labels.index(label) % len(colors)]
        text = None if (label, metric) in labelled else f"{names[label]}{_n_text(seeds[label])}"
        labelled.add((label, metric))
        half = [ci95(by_step[s]) for s in steps] if seeds[label] > 1 else None
        if metric == "val_ppl":  # few points: each with its error bar
            ax.errorbar(steps, means, yerr=half, color=color, marker="o", ms=4, lw=1.2, capsize=3, label=text)
            continue
        ax.plot(steps, means, color=color, lw=1.2, label=text)
        if half:
            ax.fill_between(steps, [m - h for m, h in zip(means, half)], [m + h for m, h in zip(means, half)],
                            color=color, alpha=0.15, lw=0)  # fmt: skip
    panels = (
        (loss_ax, "train_loss", "training loss (each stage's own objective)"),
        (val_ax, "val_ppl", "validation PPL"),
    )
    for ax, metric, ylabel in panels:
        ax.set(xlabel="step (runs on across stages)", ylabel=ylabel)
        plain_axis(ax, "y", values[metric])
        if len(stage_starts) > 1:
            for stage, start in stage_starts.items():
                ax.axvline(start, color="0.6", ls=":", lw=1)
                ax.text(start, 1.0, f" {stage}", transform=ax.get_xaxis_transform(), fontsize=7, va="top", color="0.4")
    _title(loss_ax, "Training loss", common, width=70)
    _title(val_ax, "Validation PPL", "")
    band = "; band and bars: 95% CI over seeds" if any(n > 1 for n in seeds.values()) else ""
    _legend(loss_ax, len(labels), "mean over seeds" + band)
    return _save(fig, path)


# ----------------------------------------------------------------------------- W&B


def wandb_identity(runs: Sequence[RunResult]) -> dict[str, Any]:
    """The report run's name, group, tags and config, from the runs it reports: the sweep's group (as the runs'
    own W&B runs are grouped: `task_name/<sweep folder>`), their tags, the configurations and their settings."""
    groups, tags = [], ["report"]
    for run in runs:
        config = run.metrics.get("config") or {}
        task = str(config.get("task_name", "train"))
        sweep = run.path.parent
        groups.append(f"{task}/{sweep.name}" if (sweep / "multirun.yaml").is_file() else task)
        model, cache, data = config.get("model") or {}, config.get("cache") or {}, config.get("data") or {}
        auto = [model.get("name"), model.get("attention"), cache.get("name"), data.get("source")]
        tags += [str(t) for t in [*(config.get("tags") or []), *auto] if t]
    group = groups[0] if len(set(groups)) == 1 else "report"
    names, common = legend_labels(list(dict.fromkeys(run.label for run in runs)))
    configurations = {names[label]: sum(r.label == label for r in runs) for label in names}
    return {
        "name": f"report:{group} ({len(configurations)} configurations, {len(runs)} runs)",
        "group": group,
        "tags": list(dict.fromkeys(tags)),
        "config": {
            "common_settings": common,
            "configurations": configurations,
            "runs": [str(run.path) for run in runs],
        },
    }


def log_to_wandb(written: dict[str, Path], runs: Sequence[RunResult]) -> None:
    """One W&B run (offline unless WANDB_MODE says otherwise) beside the report: the table and the figures."""
    import wandb as wb

    mode = cast(WandbMode, os.environ.get("WANDB_MODE", "offline"))  # wandb.init rejects any other value
    folder = str(written["csv"].parent)  # the offline run goes beside the report, not into the working directory
    who = wandb_identity(runs)
    with wb.init(project="kvcompress", job_type="report", mode=mode, dir=folder, **who) as run:
        with open(written["csv"]) as f:
            table = list(csv.reader(f))
        columns: list[str | int] = list(table[0])
        run.log({"report": wb.Table(columns=columns, data=table[1:])})
        run.log({k: wb.Image(str(p)) for k, p in written.items() if p.suffix == ".png"})
