"""`python -m kvcompress.costs [--rows ID,...] [--steps N] [--render-only]`: measure what the README's commands
cost on this machine, write `docs/costs.json` and the README's cost table (between `<!-- costs:begin -->` and
`<!-- costs:end -->`), which `tests/test_costs.py` checks against the JSON.

- whole runs (the quickstart, `debug=smoke`): the command as written, timed from start to exit, in fresh run and
  stage folders (the tokenized data already cached), with the val PPL it reached;
- long runs (the default run, the V-DProj two-stage run): the same command with one epoch of 2 + `--steps`
  training steps a stage (the first 2 a warm-up, the rest timed by the run's own `RunEstimate`) and validations
  of 10 batches, then extrapolated with the counts the run reports: steps an epoch and validation batches (from
  the windows the data module used), max epochs (the stage's);
- the bench's CPU preset, timed; `make reproduce`, read from the last reproduction's own run timings
  (`outputs/reproduce/mini/**/reproduce.json`), or "not measured yet".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvcompress.utils import atomic_write_json, atomic_write_text

REPO = Path(__file__).resolve().parent.parent
JSON_PATH, README = REPO / "docs" / "costs.json", REPO / "README.md"
BEGIN, END = "<!-- costs:begin -->", "<!-- costs:end -->"
WARMUP = 2  # RunEstimate's untimed steps
VAL_BATCHES = 10  # validation batches timed in a truncated run


@dataclass
class Row:
    id: str
    command: str  # as the README shows it
    kind: str  # "run" (timed whole), "extrapolated", "bench", "reproduce"
    args: tuple[str, ...] = ()


ROWS = (
    Row("quickstart", "python -m kvcompress.train experiment=quickstart", "run", ("experiment=quickstart",)),
    Row("smoke", "python -m kvcompress.train debug=smoke", "run", ("debug=smoke",)),
    Row("default", "python -m kvcompress.train", "extrapolated"),
    Row(
        "vdproj",
        "python -m kvcompress.train model=vdproj phase=two_stage",
        "extrapolated",
        ("model=vdproj", "phase=two_stage"),
    ),  # fmt: skip
    Row("bench", "python -m kvcompress.bench", "bench"),
    Row("reproduce", "make reproduce", "reproduce"),
)


# ----------------------------------------------------------------------------- measuring


def _timed(cmd: list[str]) -> tuple[float, float]:
    """Run `cmd`: (wall seconds, CPU seconds of the process and its children: less sensitive to other work on
    the machine than the wall time)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[1:])} failed:\n{done.stderr[-3000:]}")
    return wall, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def _train(args: list[str], folder: Path) -> tuple[float, float, dict[str, Any]]:
    """Run `python -m kvcompress.train args` in fresh folders under `folder`: (wall s, CPU s, metrics.json)."""
    shutil.rmtree(folder, ignore_errors=True)
    cmd = [sys.executable, "-m", "kvcompress.train", *args, "print_config=false", "logger=csv",
           f"hydra.run.dir={folder / 'run'}", f"paths.stage_dir={folder / 'stages'}"]  # fmt: skip
    wall, cpu = _timed(cmd)
    return wall, cpu, json.loads((folder / "run" / "metrics.json").read_text())


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _data_counts(metrics: dict[str, Any]) -> dict[str, Any]:
    config, splits = metrics["config"], metrics["data"]["splits"]
    data = config["data"]
    asked = data.get("num_samples")
    asked_train = None if asked is None else asked - max(1, int(round(asked * float(data["val_fraction"]))))
    return {
        "batch_size": int(data["batch_size"]),
        "seq_len": int(data["seq_len"]),
        "train_windows": splits["train"]["windows_used"],
        "train_windows_available": splits["train"]["windows"],
        "train_windows_asked": asked_train,
        "val_windows": splits["validation"]["windows_used"],
    }


def measure_run(row: Row, work: Path) -> dict[str, Any]:
    wall, cpu, metrics = _train(list(row.args), work / row.id)
    stages = [{"name": s["name"], "steps": s.get("steps"), **(s.get("timing") or {})} for s in metrics["stages"]]
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "val_ppl": metrics["val_ppl"],
        "start_val_ppl": metrics["stages"][0].get("start_val_ppl"),
        "stages": stages,
        "stage_dir_bytes": _folder_bytes(work / row.id / "stages"),
        **_data_counts(metrics),
    }


def measure_extrapolated(row: Row, work: Path, steps: int) -> dict[str, Any]:
    """One epoch of `WARMUP + steps` steps a stage (its validation: `VAL_BATCHES` batches), then the run's real
    counts: steps an epoch and validation batches from the windows the data module used, max epochs from the
    stage's config (the command as written caps nothing)."""
    args = [
        *row.args, f"++trainer.limit_train_batches={WARMUP + steps}", f"++trainer.limit_val_batches={VAL_BATCHES}",
        "phase.epochs_cap=1",
    ]  # fmt: skip
    wall, _, metrics = _train(args, work / row.id)
    counts = _data_counts(metrics)
    data = metrics["config"]["data"]
    steps_per_epoch = math.ceil(counts["train_windows"] / counts["batch_size"])
    val_batches = math.ceil(counts["val_windows"] / int(data.get("eval_batch_size") or counts["batch_size"]))
    stages = []
    for stage in metrics["stages"]:
        timing = stage.get("timing") or {}
        if "step_s" not in timing or "val_batch_s" not in timing:
            raise RuntimeError(f"stage {stage['name']} of {row.command} recorded no step or validation time")
        stages.append({
            "name": stage["name"],
            "steps_per_epoch": steps_per_epoch,
            "max_epochs": int(metrics["config"]["phase"]["stages"][stage["name"]]["max_epochs"]),
            "val_batches": val_batches,
            "step_s": timing["step_s"],
            "step_cpu_s": timing.get("step_cpu_s"),
            "val_batch_s": timing["val_batch_s"],
            "measured_steps": timing["measured_steps"],
        })  # fmt: skip
    return {"truncated_wall_s": wall, "stages": stages, **counts}


def measure_bench(work: Path) -> dict[str, Any]:
    out = work / "bench"
    shutil.rmtree(out, ignore_errors=True)
    wall, cpu = _timed([sys.executable, "-m", "kvcompress.bench", "--out", str(out)])
    return {"wall_s": wall, "cpu_s": cpu}


def measure_reproduce(root: Path) -> dict[str, Any]:
    """The last reproduction's own timings: each run's wall time (reproduce.json), summed."""
    files = sorted(root.glob("**/reproduce.json"))
    seconds = [float(json.loads(f.read_text()).get("seconds", 0.0)) for f in files]
    if not files:
        return {"measured": False}
    tables = sorted({f.relative_to(root).parts[0] for f in files})
    return {"measured": True, "runs": len(files), "tables": tables, "train_s": sum(seconds)}


# ----------------------------------------------------------------------------- extrapolating and rendering


def stage_estimate(stage: dict[str, Any]) -> dict[str, float]:
    """Seconds an epoch (its steps, then one validation) and for the stage at its max epochs."""
    epoch = stage["steps_per_epoch"] * stage["step_s"] + stage["val_batches"] * stage["val_batch_s"]
    return {"epoch_s": epoch, "stage_s": stage["max_epochs"] * epoch}


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _windows(r: dict[str, Any]) -> str:
    text = f"{r['train_windows']:,} windows of {r['seq_len']} tokens"
    asked = r.get("train_windows_asked")
    if asked and asked > r["train_windows"]:
        text += f": all that exist of the {asked:,} asked"
    return text


def _cpu(r: dict[str, Any]) -> str:
    return f" ({r['cpu_s']:.0f} s of CPU time)" if "cpu_s" in r else ""


def cells(row: Row, r: dict[str, Any]) -> tuple[str, str]:
    """(what runs, what it costs here) for one measured row."""
    if row.kind == "run":
        steps = sum(s.get("steps") or 0 for s in r["stages"])
        what = f"{steps} training steps of {r['batch_size']} x {r['seq_len']} tokens ({_windows(r)})"
        ppl = f"val PPL {r['start_val_ppl']:,.0f} -> {r['val_ppl']:,.1f}" if r.get("start_val_ppl") else (
            f"val PPL {r['val_ppl']:,.1f}")  # fmt: skip
        cost = f"{r['wall_s']:.0f} s wall{_cpu(r)}, command to `metrics.json`; {ppl}"
        return what, cost
    if row.kind == "extrapolated":
        parts, costs, total = [], [], 0.0
        for s in r["stages"]:
            est = stage_estimate(s)
            total += est["stage_s"]
            name = f"{s['name']}: " if len(r["stages"]) > 1 else ""
            parts.append(f"{name}{s['steps_per_epoch']:,} steps an epoch, up to {s['max_epochs']} epochs")
            cpu = f" ({s['step_cpu_s']:.2f} s of CPU time)" if s.get("step_cpu_s") else ""
            upto = f", up to {duration(est['stage_s'])}" if len(r["stages"]) > 1 else ""
            costs.append(f"{name}{s['step_s']:.2f} s a step{cpu}, {duration(est['epoch_s'])} an epoch{upto}")
        val = r["stages"][0]
        what = (f"{'; '.join(parts)} ({r['batch_size']} x {r['seq_len']} tokens; {_windows(r)}); "
                f"{val['val_batches']} validation batches an epoch")  # fmt: skip
        n = r["stages"][0]["measured_steps"]
        cost = (f"{'; '.join(costs)}; {val['val_batch_s']:.2f} s a validation batch: up to {duration(total)} "
                f"(extrapolated from {n} measured steps{' a stage' if len(r['stages']) > 1 else ''}; "
                "early stopping may end it sooner)")  # fmt: skip
        return what, cost
    if row.kind == "bench":
        return (
            "every cache kind + HF, 2 decode cells; training vs HF (CPU preset)",
            f"{r['wall_s']:.0f} s wall{_cpu(r)}",
        )
    if not r.get("measured"):
        return (
            "SCALE=mini: the tables of conf/reproduce/mini.yaml, 2 seeds each",
            "not measured yet (`make reproduce`, then `python -m kvcompress.costs`)",
        )
    what = f"SCALE=mini: {r['runs']} runs ({', '.join(r['tables'])})"
    return what, f"{duration(r['train_s'])} of training (each run's wall time, summed; REPRODUCTION.md)"


def _loads(data: dict[str, Any]) -> str:
    loads = [x for r in data["rows"].values() for x in r.get("load_average", [])]
    return f"{min(loads):.1f}-{max(loads):.1f}" if loads else "not recorded"


def render(data: dict[str, Any]) -> str:
    machine = data["machine"]
    lines = [
        BEGIN,
        f"Measured by `python -m kvcompress.costs` on {machine['date']} ({machine['cpu']}, {machine['cores']} cores, "
        f"{machine['torch_threads']} torch threads, no GPU, fp32, offline WikiText-2; `docs/costs.json`). "
        f"The machine was shared with other work (1-min load average {_loads(data)} during these measurements): "
        "on an idle machine each row takes less.",
        "",
        "| command | what runs | cost here |",
        "| --- | --- | --- |",
    ]
    for row in ROWS:
        if row.id in data["rows"]:
            what, cost = cells(row, data["rows"][row.id])
            lines.append(f"| `{row.command}` | {what} | {cost} |")
    return "\n".join([*lines, END])


def update_readme(text: str, table: str) -> str:
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise ValueError(f"README has no {BEGIN} ... {END} section")
    return pattern.sub(lambda _: table, text)


def machine() -> dict[str, Any]:
    import torch

    return {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvcompress.costs", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default=None, help=f"comma-separated, from {[r.id for r in ROWS]} (default: all)")
    p.add_argument("--steps", type=int, default=5, help="timed steps a stage of the extrapolated runs")
    p.add_argument("--work", default="outputs/costs", help="run and stage folders of the measured runs")
    p.add_argument("--render-only", action="store_true", help="rewrite the README table from docs/costs.json")
    args = p.parse_args(argv)
    data = json.loads(JSON_PATH.read_text()) if JSON_PATH.is_file() else {"rows": {}}
    if not args.render_only:
        wanted = args.rows.split(",") if args.rows else [r.id for r in ROWS]
        work = Path(args.work)
        for row in ROWS:
            if row.id not in wanted:
                continue
            print(f"measuring {row.command} ...", flush=True)
            load = os.getloadavg()[0]
            if row.kind == "run":
                result = measure_run(row, work)
            elif row.kind == "extrapolated":
                result = measure_extrapolated(row, work, args.steps)
            elif row.kind == "bench":
                result = measure_bench(work)
            else:
                result = measure_reproduce(Path("outputs/reproduce/mini"))
            if row.kind != "reproduce":  # other work on the machine slows a row: its 1-min load, start and end
                result["load_average"] = [round(load, 1), round(os.getloadavg()[0], 1)]
            data["rows"][row.id] = result
            data["machine"] = machine()
            atomic_write_json(JSON_PATH, data)  # after every row: a failed row keeps the others
    table = render(data)
    atomic_write_text(README, update_readme(README.read_text(), table))
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
