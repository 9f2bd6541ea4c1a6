"""`python -m kvcompress.reproduce.pareto_mini [--out DIR]`: issue 20's Pareto front at the mini scale.

Trains the mini scale's 4,096-token BPE tokenizer on WikiText-2 (reused when present), then the two runs, each in
its own folder and process (a finished run is reused): `experiment=pareto_mini` (the standard model and its
training-free caches: 5 eviction kinds x 3 budgets, int8, int4; long-context PPL and the passkey probe) and
`experiment=pareto_mini_vdproj` (V-DProj and V-DProj x int8 / int4); then the report (`report/report.md`,
`report/pareto.md` and its plots), each run labelled by its task name.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from kvcompress.evaluation.report import find_run_folders, load_runs, write_report
from kvcompress.reproduce.protocol import RunSpec, ensure_tokenizer, tokenizer_path
from kvcompress.reproduce.runs import execute

log = logging.getLogger("kvcompress.reproduce")
TOKENIZER = {"source": "wikitext-2", "vocab_size": 4096}  # as conf/reproduce/mini.yaml
EXPERIMENTS = ("pareto_mini", "pareto_mini_vdproj")


def specs(out: Path, tokenizer: Path, extra: tuple[str, ...] = (), seed: int = 42) -> list[RunSpec]:
    return [
        RunSpec("pareto", name, seed, (f"experiment={name}", f"data.tokenizer={tokenizer}", *extra), out / name)
        for name in EXPERIMENTS
    ]


def label(metrics: dict) -> str:
    return str((metrics.get("config") or {}).get("task_name", "run")).removeprefix("reproduce_pareto_")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvcompress.reproduce.pareto_mini", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="outputs/pareto_mini", help="output folder (default: outputs/pareto_mini)")
    p.add_argument("--dry-run", action="store_true", help="list the runs' commands; train nothing")
    p.add_argument("overrides", nargs="*", help="more overrides for both runs, e.g. debug=smoke (a quick check)")
    args = p.parse_args(argv)
    extra = tuple(args.overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    out = Path(args.out).resolve()
    if args.dry_run:
        for spec in specs(out, tokenizer_path(TOKENIZER, out), extra):
            print(" ".join(spec.command(out / "stages")))
        return 0
    tokenizer = ensure_tokenizer(TOKENIZER, out)
    assert tokenizer is not None
    for spec in specs(out, tokenizer, extra):
        status, seconds = execute(spec, out / "stages")
        log.info("%s: %s in %.0f s (log: %s)", spec.name, status, seconds, spec.folder / "console.log")
        if status == "failed":
            raise SystemExit(f"{spec.name} failed: see {spec.folder / 'console.log'}")
    folders = [spec.folder for spec in specs(out, tokenizer, extra)]
    runs = load_runs(folders, label=label)
    written = write_report(runs, out / "report", failed=find_run_folders(folders)[1])
    print(written["pareto"].read_text() if "pareto" in written else written["markdown"].read_text())
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
