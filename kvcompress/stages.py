"""`python -m kvcompress.stages [list|remove] [--stage-dir DIR ...] [--runs DIR ...] [--yes] [--unfinished]`:
the stage folders, their size, last use and the runs (metrics.json files) that reference them; `remove` deletes
those no run references (a dry run unless `--yes`; unfinished ones, which a rerun could resume, only with
`--unfinished`; never one a live run holds). The work is in `kvcompress.training.stage_folders`."""

from __future__ import annotations

import argparse
from pathlib import Path

# Where the library puts stage folders: `paths.stage_dir` (outputs/stages) and each reproduction's own.
DEFAULT_STAGE_DIRS = ("outputs/stages", "outputs/reproduce/*/stages")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvcompress.stages", description=__doc__.split("\n\n")[0])
    p.add_argument("action", nargs="?", choices=("list", "remove"), default="list")
    p.add_argument("--stage-dir", action="append", help=f"stage folders' parent (default: {DEFAULT_STAGE_DIRS})")
    p.add_argument("--runs", action="append", help="run folders searched for metrics.json (default: outputs)")
    p.add_argument("--dry-run", action="store_true", help="only say what remove would delete (the default)")
    p.add_argument("--yes", action="store_true", help="remove: really delete")
    p.add_argument("--unfinished", action="store_true", help="remove: unfinished (resumable) stages too")
    args = p.parse_args(argv)
    from kvcompress.training.stage_folders import list_stage_folders, removable, remove_folder, size_text, table

    stage_dirs = [Path(d) for pattern in args.stage_dir or DEFAULT_STAGE_DIRS for d in _glob(pattern)]
    folders = list_stage_folders(stage_dirs, [Path(r) for r in args.runs or ["outputs"]])
    if args.action == "list":
        print(table(folders))
        return 0
    doomed = removable(folders, unfinished=args.unfinished)
    print(table(doomed) if doomed else "no stage folder to remove (every one is referenced by a run or in use)")
    if not doomed or args.dry_run or not args.yes:
        if doomed:
            size = size_text(sum(f.size for f in doomed))
            print(f"dry run: rerun with --yes to remove these {len(doomed)} folders ({size})")
        return 0
    removed = [f for f in doomed if remove_folder(f)]
    print(f"removed {len(removed)} stage folders, {size_text(sum(f.size for f in removed))}")
    return 0


def _glob(pattern: str) -> list[Path]:
    return sorted(Path().glob(pattern)) if any(c in pattern for c in "*?[") else [Path(pattern)]


if __name__ == "__main__":
    raise SystemExit(main())
