"""Every cache of every run on one Pareto front: a metric against the measured cache bytes per token.

Metrics (each from a run's metrics.json, for every cache it measured):
- `ppl`: the autoregressive (token by token, through the cache) PPL on the validation windows (`caches.<key>`),
  against the bytes per token measured at the windows' length;
- `long_ppl@<length>`: the same on contiguous long windows (`long_context.<length>.<key>`);
- `passkey_accuracy`, `passkey_logprob`: the passkey probe (`passkey.caches.<key>`), higher is better.

For the PPLs, each point's ratio to the reference, the `kv` cache of the first run that has one, comes with a 95%
interval from paired windows (`stats.paired_ratio`: per-window mean losses, the same windows in the same order;
runs with the same data settings and seed score the same validation windows; a run's seeds are its rows). The
front holds the points no other point beats on both bytes and the metric. Writes `pareto_<metric>.png` and
`pareto.md` (one table per metric, the plot beside it).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvcompress.evaluation.stats import Comparison, paired_ratio
from kvcompress.utils import atomic_write, atomic_write_text

__all__ = ["Point", "front", "pareto_markdown", "plot_pareto", "points", "write_pareto"]

HIGHER_IS_BETTER = ("passkey_accuracy", "passkey_logprob")


@dataclass
class Point:
    label: str  # the run's configuration and the cache's key
    kind: str
    bytes_per_token: float
    value: float  # mean over the run's seeds
    window_loss: list[list[float]]  # (seeds, windows), empty when the metric has none
    vs_reference: Comparison | None = None


def _entries(metrics: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """{metric: {cache key: {bytes_per_token, value, window_loss, kind}}} of one run."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    records = metrics.get("_windows") or {}  # the run's windows.safetensors: `cache:<key>` per validation window
    for key, c in (metrics.get("caches") or {}).items():
        if "autoregressive_ppl" in c:  # bytes at the length the windows decode to, where recorded
            nbytes = c.get("eval_bytes_per_token", c["bytes_per_token"])
            losses = records.get(f"cache:{key}")
            window_loss = None if losses is None else [float(x) for x in losses]
            entry = {**c, "value": c["autoregressive_ppl"], "bytes_per_token": nbytes, "window_loss": window_loss}
            out.setdefault("ppl", {})[key] = entry
    for length, per_cache in (metrics.get("long_context") or {}).items():
        for key, c in per_cache.items():
            out.setdefault(f"long_ppl@{length}", {})[key] = {**c, "value": c["ppl"]}
    for key, c in ((metrics.get("passkey") or {}).get("caches") or {}).items():
        out.setdefault("passkey_accuracy", {})[key] = {**c, "value": c["accuracy"], "window_loss": None}
        out.setdefault("passkey_logprob", {})[key] = {**c, "value": c["logprob"], "window_loss": None}
    for per_cache in out.values():  # the run's cache again under "native": dropped when another key measured it
        native = per_cache.get("native")
        if native is not None and any(_same(c, native) for k, c in per_cache.items() if k != "native"):
            del per_cache["native"]
    return out


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a["value"] == b["value"] and a["bytes_per_token"] == b["bytes_per_token"]


def points(runs: Sequence[tuple[str, dict[str, Any]]]) -> dict[str, list[Point]]:
    """{metric: points}, one point per (configuration, cache); `runs` are (configuration label, metrics) pairs, the
    seeds of a configuration sharing its label."""
    grouped: dict[str, dict[tuple[str, str], list[dict[str, Any]]]] = {}
    for label, metrics in runs:
        for metric, per_cache in _entries(metrics).items():
            for key, entry in per_cache.items():
                grouped.setdefault(metric, {}).setdefault((label, key), []).append(entry)
    labels = list(dict.fromkeys(label for label, _ in runs))
    out: dict[str, list[Point]] = {}
    for metric, by_point in grouped.items():
        pts = []
        for (label, key), entries in by_point.items():
            name = key if len(labels) == 1 else f"{label} | {key}"
            windows = [e["window_loss"] for e in entries if e.get("window_loss")]
            pts.append(
                Point(
                    name,
                    str(entries[0].get("kind", key)),
                    sum(e["bytes_per_token"] for e in entries) / len(entries),
                    sum(e["value"] for e in entries) / len(entries),
                    windows if len(windows) == len(entries) else [],
                )
            )
        reference = next((p for p in pts if p.kind == "kv" and p.window_loss), None)
        for p in pts:
            if reference is not None and p.window_loss and len(p.window_loss[0]) == len(reference.window_loss[0]):
                p.vs_reference = paired_ratio(reference.window_loss, p.window_loss)
        out[metric] = pts
    return out


def front(pts: Sequence[Point], metric: str) -> list[Point]:
    """The points no other point beats on both bytes (fewer) and the metric, by increasing bytes."""
    sign = -1.0 if metric in HIGHER_IS_BETTER else 1.0
    best: list[Point] = []
    for p in sorted(pts, key=lambda p: (p.bytes_per_token, sign * p.value)):
        if not best or sign * p.value < sign * best[-1].value:
            best.append(p)
    return best


def _reference_bytes(pts: Sequence[Point]) -> float:
    kv = [p.bytes_per_token for p in pts if p.kind == "kv"]
    return kv[0] if kv else math.nan


def pareto_markdown(metric: str, pts: Sequence[Point], plot: str | None = None) -> str:
    on_front = {id(p) for p in front(pts, metric)}
    kv_bytes = _reference_bytes(pts)
    lines = [f"### {metric}", ""]
    if plot:
        lines += [f"![{metric} vs bytes]({plot})", ""]
    head = ["cache", "kind", "bytes/token", "bytes / kv", metric, "ratio to kv [95% CI]", "front"]
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for p in sorted(pts, key=lambda p: p.bytes_per_token):
        ratio = p.vs_reference.text() if p.vs_reference else "—"
        digits = 3 if metric.startswith("passkey") else 2
        lines.append(
            f"| {p.label} | {p.kind} | {p.bytes_per_token:.1f} | {p.bytes_per_token / kv_bytes:.3f} | "
            f"{p.value:.{digits}f} | {ratio} | {'*' if id(p) in on_front else ''} |"
        )
    return "\n".join(lines) + "\n"


def plot_pareto(metric: str, pts: Sequence[Point], path: Path) -> Path:
    import matplotlib
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = matplotlib.color_sequences["tab20"]  # (the tab20 colormap's colors)
    for i, kind in enumerate(dict.fromkeys(p.kind for p in pts)):
        mine = [p for p in pts if p.kind == kind]
        xs, ys = [p.bytes_per_token for p in mine], [p.value for p in mine]
        err = None
        compared = [p.vs_reference for p in mine if p.vs_reference]
        if len(compared) == len(mine) and not metric.startswith("passkey"):
            ref = [p.value / c.ratio for p, c in zip(mine, compared, strict=True)]
            lo = [y - r * c.ci[0] for y, r, c in zip(ys, ref, compared, strict=True)]
            hi = [r * c.ci[1] - y for y, r, c in zip(ys, ref, compared, strict=True)]
            err = [[max(v, 0.0) for v in lo], [max(v, 0.0) for v in hi]]
        marker = "osD^v<>"[i // len(colors) % 7]
        ax.errorbar(xs, ys, yerr=err, fmt=marker, capsize=3, label=kind, color=colors[i % len(colors)])
        for p in mine:
            ax.annotate(p.label.split(" | ")[-1], (p.bytes_per_token, p.value), fontsize=5, alpha=0.7)
    best = front(pts, metric)
    ax.plot([p.bytes_per_token for p in best], [p.value for p in best], "k--", lw=1, label="Pareto front")
    better = "higher" if metric in HIGHER_IS_BETTER else "lower"
    ax.set(xlabel="cache bytes per token (measured)", ylabel=f"{metric} ({better} is better)", xscale="log")
    ax.set_title(f"{metric} vs cache size (95% CIs from paired windows)" if better == "lower" else metric)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110), mode="wb")
    plt.close(fig)
    return path


def write_pareto(runs: Sequence[tuple[str, dict[str, Any]]], out_dir: str | os.PathLike) -> dict[str, Path]:
    """`pareto.md` and one `pareto_<metric>.png` per metric any run measured; nothing when none did."""
    out = Path(out_dir)
    by_metric = points(runs)
    if not by_metric:
        return {}
    written: dict[str, Path] = {}
    parts = ["# Pareto fronts: each metric against the measured cache bytes per token", ""]
    for metric, pts in by_metric.items():
        name = f"pareto_{metric.replace('@', '_')}.png"
        written[f"pareto_{metric}"] = plot_pareto(metric, pts, out / name)
        parts.append(pareto_markdown(metric, pts, name))
    written["pareto"] = out / "pareto.md"
    atomic_write_text(written["pareto"], "\n".join(parts))
    return written
