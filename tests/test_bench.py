"""The benchmark, run on CPU at a tiny shape (each decode system in its own subprocess, as in real runs)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from kvcompress import bench

TINY = [
    "--model", "tiny", "--device", "cpu", "--cells", "1x8,2x12", "--new-tokens", "3", "--repeats", "1",
    "--compile", "off", "--train-batch", "2", "--seq-lens", "16", "--train-steps", "2", "--warmup", "1",
]  # fmt: skip


def positive(x: Any) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_bench_decode_grid_and_training(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "bench.json"
    argv = [*TINY, "--systems", "kv,int4,vdproj,hf", "--train-attentions", "standard,ka", "--out", str(out)]
    result = bench.main(argv)
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(result))  # what was returned is what was written
    assert not list(out.parent.glob(".*.tmp"))  # atomic write left no temporary behind
    meta = data["meta"]
    assert meta["schema"] == bench.SCHEMA and meta["device_type"] == "cpu" and meta["torch"] == torch.__version__
    assert positive(meta["bandwidth"]["read_bytes_per_s"]) and positive(meta["bandwidth"]["matvec_bytes_per_s"])

    assert set(data["decode"]) == {"1x8", "2x12"}
    cell = data["decode"]["2x12"]
    assert set(cell) == {"kv", "int4", "vdproj"}  # HF runs in batch-1 cells only
    assert set(data["decode"]["1x8"]) == {"kv", "int4", "vdproj", "hf"}
    for system, entry in cell.items():
        e = entry["eager"]
        assert positive(e["ttft_s"]) and positive(e["tpot_s"]) and e["tpot_samples_s"]
        assert e["decode_tokens_per_s"] == pytest.approx(2 / e["tpot_s"])
        assert e["tpot_vs_kv"] == pytest.approx(e["tpot_s"] / cell["kv"]["eager"]["tpot_s"])
        assert e["decode_peak_mem_bytes"] > 0, system  # measured: at least the cache's pages
        assert entry["bytes_read_per_step"] == entry["weights_read_bytes"] + entry["cache_bytes"]
        assert e["achieved_bytes_per_s"] == pytest.approx(entry["bytes_read_per_step"] / e["tpot_s"])
    # fp32 [K, V] of 2 layers x 64 dims; V-DProj holds less (int4's 32-token window dominates at 15 slots).
    assert cell["kv"]["bytes_per_token"] == 2 * 2 * 64 * 4
    assert cell["vdproj"]["bytes_per_token"] < cell["kv"]["bytes_per_token"]
    assert positive(data["decode"]["1x8"]["hf"]["eager"]["tpot_s"])

    standard, ka = data["train"]
    assert (standard["attention"], standard["baseline"], ka["attention"], ka["baseline"]) == (
        "standard", "hf", "ka", "standard",
    )  # fmt: skip
    for t in data["train"]:
        assert positive(t["ours"]) and t["ratio"] == pytest.approx(t["ours"] / t[t["baseline"]])
    # Same weights, same data, fp32: our standard model and HF start from the same loss.
    assert standard["first_loss"]["ours"] == pytest.approx(standard["first_loss"]["hf"], abs=1e-4)
    assert "TPOT" in bench.format_table(data)


def test_parse_args_presets_and_errors() -> None:
    args = bench.parse_args([])
    assert args.preset == "cpu" and args.systems[0] == "kv" and "hf" in args.systems
    bars = bench.parse_args(["--preset", "bars"])
    assert (8, 2000) in bars.cells and bars.compile == "both" and bars.seq_lens == [128, 512]
    assert bench.parse_args(["--systems", "int8", "--cells", "4x64"]).systems == ["kv", "int8"]
    for bad in (["--systems", "int3"], ["--cells", "8by2000"], ["--new-tokens", "1"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


@pytest.mark.slow
def test_bench_compiled_at_the_pythia_70m_shape(tmp_path: Path) -> None:
    """The real shape on CPU (minutes): the compiled step runs for every cache kind."""
    out = tmp_path / "bench.json"
    data = bench.main(
        ["--cells", "1x16", "--new-tokens", "3", "--repeats", "1", "--compile", "both", "--no-train",
         "--systems", ",".join(bench.systems()), "--out", str(out)]
    )  # fmt: skip
    for entry in data["decode"]["1x16"].values():
        assert positive(entry["compiled"]["tpot_s"]) and positive(entry["compiled_speedup"])
