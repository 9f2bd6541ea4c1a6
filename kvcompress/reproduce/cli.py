"""`python -m kvcompress.reproduce`: plan, train (resumable), write REPRODUCTION.md."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from pathlib import Path

from kvcompress.reproduce import __doc__ as PACKAGE_DOC
from kvcompress.reproduce.protocol import RunSpec, compose, ensure_tokenizer, load_protocol, plan, tokenizer_path
from kvcompress.reproduce.runs import execute, finished, output_lock
from kvcompress.reproduce.writer import write_reproduction

log = logging.getLogger("kvcompress.reproduce")


def seed_list(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers (e.g. 0,1,2)") from None


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvcompress.reproduce", description=(PACKAGE_DOC or "").split("\n\n")[0])
    p.add_argument("--scale", default="mini", help="a protocol in conf/reproduce/ (mini, paper)")
    p.add_argument("--tables", default=None, help="comma-separated, e.g. 003,004 (default: every table)")
    p.add_argument("--seeds", type=seed_list, default=None, help="comma-separated (default: the protocol's)")
    p.add_argument("--out", default=None, help="output folder (default: outputs/reproduce/<scale>)")
    p.add_argument("--dry-run", action="store_true", help="compose and list every run; train nothing")
    p.add_argument("--report-only", action="store_true", help="write REPRODUCTION.md from the finished runs")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    try:
        protocol = load_protocol(args.scale)
        tables = args.tables.split(",") if args.tables else list(protocol["tables"])
        seeds = args.seeds if args.seeds is not None else list(protocol["seeds"])
        out = Path(args.out or f"outputs/reproduce/{args.scale}").resolve()
        plan(protocol, tables, seeds, out, None)  # an unknown table fails here, before anything is written
    except ValueError as err:
        p.error(str(err))
    stage_dir = out / "stages"
    tok_spec = protocol.get("tokenizer")
    if args.dry_run:  # where the tokenizer would be trained
        tokenizer = tokenizer_path(tok_spec, out) if tok_spec else None
        specs = plan(protocol, tables, seeds, out, tokenizer)
        for spec in specs:
            compose(spec, stage_dir)  # raises on a run that does not compose
            print(f"{spec.table} {spec.name} seed={spec.seed}: {' '.join(spec.command(stage_dir)[1:])}")
        print(f"{len(specs)} runs compose ({args.scale} scale, tables {','.join(tables)}, seeds {seeds})")
        return 0
    stops = (signal.SIGTERM, signal.SIGUSR1)  # a scheduler's stop, handled as Ctrl-C: the running stage saves
    previous = {signum: signal.signal(signum, _interrupt) for signum in stops}
    try:
        with output_lock(out):  # a second reproduce on this folder waits, then reuses what the first finished
            return run_all(args, protocol, tables, seeds, out, stage_dir)
    except KeyboardInterrupt:  # the running stage was passed the stop and saved its checkpoint
        print(f"interrupted: finished runs and stages are kept in {out}; the same command resumes", file=sys.stderr)
        return 130
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run_all(
    args: argparse.Namespace, protocol: dict, tables: list[str], seeds: list[int], out: Path, stage_dir: Path
) -> int:
    tokenizer = ensure_tokenizer(protocol.get("tokenizer"), out)
    specs = plan(protocol, tables, seeds, out, tokenizer)
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
