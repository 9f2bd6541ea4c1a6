"""`python -m kvcompress.stages`: stage folders with size, last use and the runs that reference them; removal of
the unreferenced ones (a dry run first, never one in use, unfinished ones only when asked)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from kvcompress import stages
from kvcompress.training.checkpoints import StageLock, lock_path


def make_stage(root: Path, name: str, finished: bool = True, size: int = 1000) -> Path:
    folder = root / "stages" / name
    (folder / "checkpoints").mkdir(parents=True)
    lock_path(folder).write_text("12345\n")
    if finished:
        (folder / "weights.safetensors").write_bytes(b"w" * size)
        (folder / "done.json").write_text("{}")
    else:
        (folder / "checkpoints" / "last.ckpt").write_bytes(b"c" * size)
    return folder


def make_run(root: Path, *stage_folders: str) -> Path:
    run = root / "outputs" / "runs" / "train" / stage_folders[0]
    run.mkdir(parents=True)
    listed = [dict(zip(("name", "key"), f.split("-", 1), strict=True)) for f in stage_folders]
    (run / "metrics.json").write_text(json.dumps({"val_ppl": 1.0, "stages": listed}))
    return run / "metrics.json"


def cli(root: Path, capsys, *args: str) -> str:
    assert stages.main([*args, "--stage-dir", str(root / "stages"), "--runs", str(root / "outputs")]) == 0
    return capsys.readouterr().out


def test_list_shows_size_state_and_referencing_runs(tmp_path, capsys):
    make_stage(tmp_path, "recon-aaaaaaaaaaaa", size=2000)
    make_stage(tmp_path, "lm-bbbbbbbbbbbb")
    make_stage(tmp_path, "lm-cccccccccccc", finished=False)
    run = make_run(tmp_path, "recon-aaaaaaaaaaaa", "lm-bbbbbbbbbbbb")
    out = cli(tmp_path, capsys, "list")
    rows = {line.split()[-1] if "(" not in line else line.split()[-2]: line for line in out.splitlines()[1:-1]}
    recon = rows[str(tmp_path / "stages" / "recon-aaaaaaaaaaaa")]
    assert "2.0 KB" in recon and "finished" in recon and str(run.parent) in recon and " 1 " in recon
    assert "unfinished" in rows[str(tmp_path / "stages" / "lm-cccccccccccc")]
    assert out.splitlines()[-1].startswith("3 stage folders")


def test_remove_is_a_dry_run_first_and_keeps_referenced_unfinished_and_in_use_folders(tmp_path, capsys):
    kept = make_stage(tmp_path, "lm-bbbbbbbbbbbb")
    make_run(tmp_path, "lm-bbbbbbbbbbbb")
    orphan = make_stage(tmp_path, "lm-dddddddddddd")
    unfinished = make_stage(tmp_path, "lm-cccccccccccc", finished=False)
    busy = make_stage(tmp_path, "lm-eeeeeeeeeeee")
    with StageLock(busy, "lm"):  # a live run holds it
        out = cli(tmp_path, capsys, "remove")
        assert "dry run" in out and str(orphan) in out and str(kept) not in out and str(busy) not in out
        assert orphan.exists()
        out = cli(tmp_path, capsys, "remove", "--yes")
        assert "removed 1 stage folders" in out
        assert not orphan.exists() and kept.exists() and unfinished.exists() and busy.exists()
    assert lock_path(busy).read_text().strip() == str(os.getpid())  # the last owner's pid stays
    cli(tmp_path, capsys, "remove", "--yes", "--unfinished")
    assert not unfinished.exists() and not busy.exists() and kept.exists()
    assert not lock_path(busy).exists() and lock_path(kept).exists()  # a removed stage's lock goes with it
