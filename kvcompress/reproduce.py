"""`make reproduce`: rerun the five seed reports' tables over seeds and write REPRODUCTION.md.

    python -m kvcompress.reproduce --scale mini                      # all five tables, 3 seeds, on a CPU
    python -m kvcompress.reproduce --scale mini --tables 003,004     # some tables
    python -m kvcompress.reproduce --scale paper --dry-run           # compose and list every run, train nothing

The protocols are `conf/reproduce/<scale>.yaml`: per table, its runs as `python -m kvcompress.train`
overrides. Each (table, run, seed) trains in its own folder `<out>/<table>/<run>/seed<k>`; stages go to one
shared `<out>/stages`, so a stopped reproduction resumes: finished runs are reused (their `metrics.json`),
finished stages are reused and a killed stage resumes from its last checkpoint. It ends by writing
`<out>/REPRODUCTION.md`: per table the seed report's numbers next to ours (mean ± std over seeds), each claim
marked reproduced / not reproduced / not comparable, and the plots (`kvcompress.report`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from kvcompress.records import git_state
from kvcompress.utils import atomic_write_json, atomic_write_text, file_sha256

log = logging.getLogger("kvcompress.reproduce")
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
PROTOCOL_DIR = CONF_DIR / "reproduce"
RUN_FILE = "reproduce.json"  # what the run folder was trained with (its overrides), next to metrics.json

REPRODUCED, NOT_REPRODUCED, NOT_COMPARABLE = "reproduced", "not reproduced", "not comparable"
Runs = dict[str, list[dict[str, Any]]]  # run name -> metrics.json of each finished seed


# ----------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class RunSpec:
    table: str
    name: str
    seed: int
    overrides: tuple[str, ...]  # without seed / folders
    folder: Path
    note: str = ""  # e.g. the offline substitution

    def command(self, stage_dir: Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            "kvcompress.train",
            *self.overrides,
            f"seed={self.seed}",
            f"task_name=reproduce_{self.table}_{self.name}",
            f"hydra.run.dir={self.folder}",
            f"paths.stage_dir={stage_dir}",
            "print_config=false",
        ]


def load_protocol(scale: str) -> dict[str, Any]:
    path = PROTOCOL_DIR / f"{scale}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PROTOCOL_DIR.glob("*.yaml"))
        raise ValueError(f"--scale {scale!r}: no protocol {path} (known: {known})")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)  # type: ignore[return-value]


def released_weights_available(name: str = "EleutherAI/pythia-70m") -> bool:
    """Can report 001's pretrained base be loaded (a Hub download)? Offline it cannot."""
    from kvcompress.data.tokenizer import hub_offline

    return not hub_offline()


def plan(
    protocol: dict[str, Any], tables: Sequence[str], seeds: Sequence[int], out: Path, tokenizer: Path | None
) -> list[RunSpec]:
    def flat(overrides: list[Any]) -> tuple[str, ...]:  # a YAML alias (*small) nests a list: splice it
        items = [x for o in overrides for x in (o if isinstance(o, list) else [o])]
        return tuple(str(x).replace("{tokenizer}", str(tokenizer)) for x in items)

    specs = []
    for table in tables:
        if table not in protocol["tables"]:
            raise ValueError(f"--tables: no table {table!r} in the {protocol['scale']} protocol")
        entry = protocol["tables"][table]
        runs, notes = dict(entry["runs"]), {}
        substitute = entry.get("offline_substitute") or {}
        if substitute and not released_weights_available():
            for name, overrides in substitute.items():
                runs[name] = overrides
                notes[name] = "offline: the released weights cannot be loaded, so the base is trained first"
        for name, overrides in runs.items():
            for seed in seeds:
                folder = out / table / name / f"seed{seed}"
                specs.append(RunSpec(table, name, seed, flat(overrides), folder, notes.get(name, "")))
    return specs


def compose(spec: RunSpec, stage_dir: Path) -> Any:
    """Compose the run's config as the train CLI would (raises on an override that does not compose)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import kvcompress.train  # noqa: F401  (registers the structured configs and resolvers)

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("train", overrides=list(spec.command(stage_dir)[3:]), return_hydra_config=True)


# ----------------------------------------------------------------------------- tokenizer


def tokenizer_path(spec: dict[str, Any], out: Path) -> Path:
    return out / "tokenizer" / f"{spec['source']}-bpe{spec['vocab_size']}" / "tokenizer.json"


def ensure_tokenizer(spec: dict[str, Any] | None, out: Path) -> Path | None:
    """The mini scale's BPE tokenizer, trained on the training split's text (reused when present)."""
    if not spec:
        return None
    from kvcompress.data.sources import TRAIN, resolve_source
    from kvcompress.data.tokenizer import train_bpe_tokenizer

    path = tokenizer_path(spec, out)
    if not path.is_file():
        text = resolve_source(spec["source"])[TRAIN].read()
        texts = [text] if isinstance(text, str) else list(text)
        log.info("training a %d-token BPE tokenizer on %s's training split", spec["vocab_size"], spec["source"])
        train_bpe_tokenizer(texts, int(spec["vocab_size"]), path)
    return path.resolve()


# ----------------------------------------------------------------------------- running


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


# ----------------------------------------------------------------------------- claims


def get(metrics: dict[str, Any], path: str) -> float | None:
    """A dotted path into metrics.json: `val_pos_ppl.0-16`, `caches.ka.autoregressive_ppl`, `stages.mka.x`."""
    node: Any = metrics
    for key in path.split("."):
        if isinstance(node, list):  # the stages list, by stage name
            node = next((s for s in node if s.get("name") == key), None)
        elif isinstance(node, dict):
            node = node.get(key)
        if node is None:
            return None
    return float(node) if isinstance(node, int | float) else None


def values(runs: Runs, run: str, path: str) -> list[float]:
    return [v for m in runs.get(run, []) if (v := get(m, path)) is not None]


def mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")


def fmt(xs: list[float], digits: int = 1) -> str:
    if not xs:
        return "—"
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f} (n=1)"
    return f"{statistics.fmean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f} (n={len(xs)})"


def buckets(runs: Runs, run: str, key: str = "val_pos_ppl") -> list[str]:
    first = next(iter(runs.get(run, [])), {})
    return list((first.get(key) or {}).keys())


@dataclass
class Claim:
    text: str
    check: Callable[[Runs], tuple[str, str]]  # -> (verdict, evidence)


def _pos_falls(runs: Runs) -> tuple[str, str]:
    """Every run's mean position-wise PPL falls from each bucket to the next."""
    falls, evidence = [], []
    for run in runs:
        bs = buckets(runs, run)
        means = [mean(values(runs, run, f"val_pos_ppl.{b}")) for b in bs]
        if len(means) < 2:
            continue
        falls.append(all(a > b for a, b in zip(means, means[1:], strict=False)))
        evidence.append(f"{run}: " + " > ".join(f"{m:.1f}" for m in means))
    if not falls:
        return NOT_COMPARABLE, "no position-wise PPL"
    return (REPRODUCED if all(falls) else NOT_REPRODUCED), "; ".join(evidence)


POSITION_CLAIM = Claim("Position-wise PPL falls with position (every row, bucket by bucket, seed means)", _pos_falls)


def _ordered(runs: Runs, order: list[str], path: str) -> tuple[bool, str]:
    means = [mean(values(runs, r, path)) for r in order]
    ok = all(a <= b for a, b in zip(means, means[1:], strict=False))
    return ok, " ≤ ".join(f"{r} {m:.1f}" for r, m in zip(order, means, strict=True))


def _claim_003(runs: Runs) -> tuple[str, str]:
    base, ka = mean(values(runs, "baseline", "val_ppl")), mean(values(runs, "ka", "val_ppl"))
    rel = ka / base - 1
    return (REPRODUCED if abs(rel) <= 0.02 else NOT_REPRODUCED), f"KA {ka:.1f} vs standard {base:.1f}: {rel:+.1%}"


def _claim_000_gap(runs: Runs) -> tuple[str, str]:
    kv, plain = (mean(values(runs, "ka_adapter", f"caches.{c}.autoregressive_ppl")) for c in ("kv", "ka_plain"))
    verdict = REPRODUCED if plain >= 2 * kv else NOT_REPRODUCED
    return verdict, f"KA cache without adapter {plain:.1f} vs KV {kv:.1f} ({plain / kv:.2f}x; claim: ≥ 2x)"


def _claim_000_recovers(runs: Runs) -> tuple[str, str]:
    kv, plain, ka = (
        mean(values(runs, "ka_adapter", f"caches.{c}.autoregressive_ppl")) for c in ("kv", "ka_plain", "ka")
    )
    share = (plain - ka) / (plain - kv) if plain != kv else float("nan")
    verdict = REPRODUCED if kv < ka < plain else NOT_REPRODUCED
    return verdict, f"KV {kv:.1f} < KA+adapter {ka:.1f} < KA {plain:.1f}: the adapter recovers {share:.0%} of the gap"


def _claim_000_diverge(runs: Runs) -> tuple[str, str]:
    """From the adapter stage's per-epoch validation in each seed's CSV log."""
    seen, diverged = 0, 0
    for m in runs.get("ka_adapter", []):
        curve = adapter_curve(Path(m["_folder"])) if m.get("_folder") else []  # never the working directory
        if len(curve) < 2:
            continue
        seen += 1
        (loss1, ppl1), (loss2, ppl2) = curve[0], curve[1]
        diverged += loss2 < loss1 and ppl2 > ppl1
    if not seen:
        return NOT_COMPARABLE, "no seed validated the adapter twice (early stopping after one epoch)"
    verdict = REPRODUCED if diverged * 2 > seen else NOT_REPRODUCED
    return verdict, f"{diverged} of {seen} seeds: adapter val loss fell and KA-cache AR PPL rose from epoch 1 to 2"


def adapter_curve(folder: Path) -> list[tuple[float, float]]:
    """(adapter loss `adapter/val_adapter`, KA-cache AR PPL) per adapter-stage validation, from the CSV log."""
    import csv

    rows: list[tuple[float, float]] = []
    for path in sorted(folder.rglob("metrics.csv")):
        with open(path) as f:
            for row in csv.DictReader(f):
                loss, ppl = row.get("adapter/val_adapter") or "", row.get("adapter/val_ar_ppl") or ""
                if loss and ppl:
                    rows.append((float(loss), float(ppl)))
    return rows


def _claim_001(runs: Runs) -> tuple[str, str]:
    bs = buckets(runs, "mka")
    if not bs or not values(runs, "mka", f"stages.mka.start_val_pos_ppl.{bs[0]}"):
        return NOT_COMPARABLE, "no frozen-base position-wise PPL recorded"
    worse, parts = [], []
    for b in bs:
        base = mean(values(runs, "mka", f"stages.mka.start_val_pos_ppl.{b}"))
        mka = mean(values(runs, "mka", f"val_pos_ppl.{b}"))
        worse.append(mka > base)
        parts.append(f"{b}: {mka:.1f} vs {base:.1f}")
    return (REPRODUCED if all(worse) else NOT_REPRODUCED), "MKA vs frozen base: " + "; ".join(parts)


def _claim_004(runs: Runs) -> tuple[str, str]:
    order = ["two_stage", "end_to_end", "baseline"]
    results = [_ordered(runs, order, f"val_pos_ppl.{b}") for b in buckets(runs, "baseline")]
    results.append(_ordered(runs, order, "val_ppl"))
    ok = all(r[0] for r in results)
    return (REPRODUCED if ok else NOT_REPRODUCED), "; ".join(r[1] for r in results[-1:] + results[:-1])


def _claim_002_hard(runs: Runs) -> tuple[str, str]:
    before, after = (
        mean(values(runs, "lego", "stages.shallow.hard_ppl_before")),
        mean(values(runs, "lego", "stages.deep.hard_ppl_after")),
    )
    if before != before or after != after:
        return NOT_COMPARABLE, "no hard-token PPL recorded"
    drop = 1 - after / before
    return (
        REPRODUCED if drop >= 0.5 else NOT_REPRODUCED
    ), f"hard-token PPL {before:.1f} → {after:.1f} ({drop:.1%} drop; claim ≥ 50%, seed 75.8%)"


def _claim_002_ratio(runs: Runs) -> tuple[str, str]:
    # The validation ratio is 50% by construction (the threshold is calibrated on it after phase 2); the share
    # of generated tokens that exit shallow is the held-out figure.
    ratio = mean(values(runs, "lego", "lego_decode.recompute.shallow_share"))
    if ratio != ratio:
        return NOT_COMPARABLE, "no shallow share recorded while decoding"
    return (
        REPRODUCED if abs(ratio - 0.70) <= 0.10 else NOT_REPRODUCED
    ), f"shallow share while decoding {ratio:.1%} (claim 70% ± 10 points)"


@dataclass
class Table:
    title: str
    seed_rows: list[tuple[str, str, str, float]]  # (label, run, metrics path, the seed report's value)
    claims: list[Claim] = field(default_factory=list)


def _by_position(label: str, run: str, path: str, seed_values: list[float]) -> list[tuple[str, str, str, float]]:
    """Seed rows of a position-wise table (the reports' five buckets)."""
    names = ["0-16", "16-32", "32-64", "64-96", "96-128"]
    return [(f"{label} {b}", run, f"{path}.{b}", v) for b, v in zip(names, seed_values, strict=True)]


TABLES: dict[str, Table] = {
    "000": Table(
        "KA cache + adapter (report 000): autoregressive PPL per cache",
        [
            ("KV cache", "ka_adapter", "caches.kv.autoregressive_ppl", 109.0),
            ("KA cache, no adapter", "ka_adapter", "caches.ka_plain.autoregressive_ppl", 1240.3),
            ("KA cache + adapter", "ka_adapter", "caches.ka.autoregressive_ppl", 439.2),
        ],
        [
            Claim("The KA cache without an adapter is far worse than KV", _claim_000_gap),
            Claim("The adapter recovers part of the gap", _claim_000_recovers),
            Claim("Adapter loss and autoregressive PPL diverge after the first epoch", _claim_000_diverge),
        ],
    ),
    "001": Table(
        "PretrainedMKA (report 001): frozen base vs base + KA layer, val PPL by position",
        [("frozen base, val PPL", "mka", "stages.mka.start_val_ppl", 26.6), ("MKA, val PPL", "mka", "val_ppl", 32.9)]
        + _by_position("frozen base", "mka", "stages.mka.start_val_pos_ppl", [77.1, 33.6, 25.0, 21.1, 18.8])
        + _by_position("MKA", "mka", "val_pos_ppl", [96.9, 42.2, 30.9, 26.2, 23.3]),
        [Claim("PretrainedMKA is worse than the frozen base at every position bucket", _claim_001)],
    ),
    "002": Table(
        "LEGO (report 002): two-phase early exit with hard-example mining",
        [
            ("phase 1 (shallow) val PPL", "lego", "stages.shallow.val_ppl", 986.43),
            ("phase 2 val PPL (ours: deep exit)", "lego", "val_ppl", 829.78),
            ("phase 2 val PPL (ours: two-stage routed)", "lego", "stages.deep.val_ppl_routed", 829.78),
            ("hard-token PPL, phase 1", "lego", "stages.shallow.hard_ppl_before", 2763.69),
            ("hard-token PPL, phase 2", "lego", "stages.deep.hard_ppl_after", 668.08),
            ("shallow ratio (ours: on validation, 0.5 by calibration)", "lego", "stages.deep.shallow_ratio", 0.704),
            ("shallow ratio (ours: while decoding)", "lego", "lego_decode.recompute.shallow_share", 0.704),
            ("compute cost", "lego", "stages.deep.compute_cost", 0.6482),
        ],
        [
            Claim("Hard-token PPL drops sharply in phase 2", _claim_002_hard),
            Claim("The shallow ratio is near 70%", _claim_002_ratio),
        ],
    ),
    "003": Table(
        "KA-Attention vs standard attention, from scratch (report 003)",
        [("standard attention (Pythia-70M)", "baseline", "val_ppl", 442.2), ("KA-Attention", "ka", "val_ppl", 449.3)],
        [Claim("KA-Attention is within ~2% of standard attention (val PPL)", _claim_003)],
    ),
    "004": Table(
        "V-DProj (report 004): baseline vs end-to-end vs 2-phase, val PPL by position",
        [
            ("baseline", "baseline", "val_ppl", 442.0),
            ("end-to-end", "end_to_end", "val_ppl", 428.7),
            ("2-phase", "two_stage", "val_ppl", 415.1),
        ]
        + _by_position("baseline", "baseline", "val_pos_ppl", [900, 650, 550, 500, 480])
        + _by_position("end-to-end", "end_to_end", "val_pos_ppl", [853.0, 667.5, 586.6, 578.1, 552.8])
        + _by_position("2-phase", "two_stage", "val_pos_ppl", [758.8, 589.5, 514.9, 509.4, 498.3]),
        [Claim("2-phase V-DProj ≤ end-to-end ≤ baseline, overall and in every position bucket", _claim_004)],
    ),
}  # fmt: skip


# ----------------------------------------------------------------------------- REPRODUCTION.md


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
    from kvcompress import report

    runs = report.load_runs(folders)
    label = {str(s.folder.resolve()): s.name for s in specs}
    for run in runs:
        run.label = label.get(str(Path(run.path).resolve()), run.label)
    failed = [s.folder for s in specs if not finished(s) and s.folder.is_dir()]
    written = report.write_report(runs, out / table / "report", failed=failed)
    return {k: Path(p) for k, p in written.items() if str(p).endswith(".png")}


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvcompress.reproduce", description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", default="mini", help="a protocol in conf/reproduce/ (mini, paper)")
    p.add_argument("--tables", default=None, help="comma-separated, e.g. 003,004 (default: every table)")
    p.add_argument("--seeds", default=None, help="comma-separated (default: the protocol's)")
    p.add_argument("--out", default=None, help="output folder (default: outputs/reproduce/<scale>)")
    p.add_argument("--dry-run", action="store_true", help="compose and list every run; train nothing")
    p.add_argument("--report-only", action="store_true", help="write REPRODUCTION.md from the finished runs")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    protocol = load_protocol(args.scale)
    tables = args.tables.split(",") if args.tables else list(protocol["tables"])
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(protocol["seeds"])
    out = Path(args.out or f"outputs/reproduce/{args.scale}").resolve()
    stage_dir = out / "stages"
    tok_spec = protocol.get("tokenizer")
    if args.dry_run:  # where the tokenizer would be trained
        tokenizer = tokenizer_path(tok_spec, out) if tok_spec else None
    else:
        tokenizer = ensure_tokenizer(tok_spec, out)
    specs = plan(protocol, tables, seeds, out, tokenizer)

    if args.dry_run:
        for spec in specs:
            compose(spec, stage_dir)  # raises on a run that does not compose
            print(f"{spec.table} {spec.name} seed={spec.seed}: {' '.join(spec.command(stage_dir)[1:])}")
        print(f"{len(specs)} runs compose ({args.scale} scale, tables {','.join(tables)}, seeds {seeds})")
        return 0

    start = time.perf_counter()
    status: dict[RunSpec, tuple[str, float]] = {}
    for i, spec in enumerate(specs, 1):
        if args.report_only:
            status[spec] = ("reused" if finished(spec) else "failed", 0.0)
            continue
        log.info("[%d/%d] table %s, %s, seed %d", i, len(specs), spec.table, spec.name, spec.seed)
        status[spec] = execute(spec, stage_dir)
        log.info("  %s in %.0f s (%s)", status[spec][0], status[spec][1], spec.folder)
    path = write_reproduction(out, protocol, specs, status, tokenizer, time.perf_counter() - start)
    log.info("wrote %s", path)
    return 1 if any(v == "failed" for v, _ in status.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
