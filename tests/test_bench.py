"""The throughput benchmark, run in-process on CPU at a tiny shape."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from kvcompress import bench
from kvcompress.models.gpt_neox import ATTENTIONS

TINY = [
    "--model", "tiny", "--device", "cpu", "--train-batch", "2", "--seq-len", "16", "--train-steps", "2",
    "--warmup", "1", "--repeats", "1", "--decode-batches", "1,2", "--prompt-len", "8", "--new-tokens", "4",
]  # fmt: skip


def positive(x: Any) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny shapes run faster (and steadier) on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def check_entry(entry: dict[str, Any], baseline: str) -> None:
    assert positive(entry["ours"]) and positive(entry[baseline])
    assert entry["ratio"] == pytest.approx(entry["ours"] / entry[baseline])
    for xs in entry["samples"].values():
        assert xs and all(positive(x) for x in xs)


def test_bench_standard_vs_hf(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "bench.json"
    result = bench.main([*TINY, "--out", str(out)])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(result))  # what was returned is what was written
    assert not list(out.parent.glob(".*.tmp"))  # atomic write left no temporary behind

    meta = data["meta"]
    assert meta["schema"] == bench.SCHEMA and meta["baseline"] == "hf"
    assert meta["device_type"] == "cpu" and meta["dtype"] == "fp32" and meta["torch"] == torch.__version__
    assert meta["hf_attn_implementation"] == "sdpa"
    assert meta["model"]["name"] == "tiny" and meta["n_params"] > 0

    train = data["train"]
    assert (train["batch"], train["seq_len"], train["tokens_per_step"]) == (2, 16, 32)
    check_entry(train, "hf")

    assert set(data["decode"]) == {"batch_1", "batch_2"}
    for name, entry in data["decode"].items():
        assert entry["batch"] == int(name.split("_")[1]) and entry["new_tokens"] == 4
        check_entry(entry, "hf")
        # Standard KV cache in fp32: 2 layers x (K + V) x 64 dims x 4 bytes.
        assert entry["cache_bytes_per_token"] == 2 * 2 * 64 * 4
        assert entry["tokens_match"] is True

    # Same weights, same data, fp32: same first loss, same logits, same greedy tokens.
    checks = data["checks"]
    assert checks["tokens_match"] is True
    assert checks["prefill_logits_max_abs_diff"] < 1e-4
    assert checks["first_loss"]["ours"] == pytest.approx(checks["first_loss"]["hf"], abs=1e-4)


@pytest.mark.parametrize("attention,kwargs", [("ka", {}), ("vdproj", {"rank": 32})])
def test_bench_method_vs_standard(tmp_path: Path, attention: str, kwargs: dict[str, Any]) -> None:
    if attention not in ATTENTIONS:
        pytest.skip(f"attention {attention!r} is not registered")
    out = tmp_path / "bench.json"
    argv = [*TINY, "--attention", attention, "--attention-kwargs", json.dumps(kwargs), "--decode-batches", "2"]
    data = bench.main([*argv, "--out", str(out)])
    assert data["meta"]["baseline"] == "standard" and data["meta"]["attention"] == attention
    assert "hf" not in data["decode"]["batch_2"]  # HF is off by default for other attentions
    check_entry(data["train"], "standard")
    entry = data["decode"]["batch_2"]
    check_entry(entry, "standard")
    assert positive(entry["cache_bytes_per_token"])
    assert entry["cache_bytes_per_token_standard"] == 2 * 2 * 64 * 4


def test_bench_method_with_hf(tmp_path: Path) -> None:
    """A non-standard attention can still be set against HF: ratio to standard, ratio_hf to HF."""
    if "ka" not in ATTENTIONS:
        pytest.skip("attention 'ka' is not registered")
    argv = [*TINY, "--attention", "ka", "--compare-hf", "--no-train", "--decode-batches", "1"]
    data = bench.main([*argv, "--out", str(tmp_path / "b.json")])
    entry = data["decode"]["batch_1"]
    check_entry(entry, "standard")
    assert entry["ratio_hf"] == pytest.approx(entry["ours"] / entry["hf"])
    assert entry["tokens_match"] is True  # the standard model and HF share weights


def test_parse_args_defaults() -> None:
    args = bench.parse_args([])
    assert (args.model, args.train_batch, args.seq_len, args.decode_batches) == ("pythia-70m", 64, 128, [1, 32])
    assert args.compare_hf is True and args.out == bench.DEFAULT_OUT
    assert bench.parse_args(["--attention", "ka"]).compare_hf is False
    assert bench.parse_args(["--attention-kwargs", '{"rank": 320}']).attention_kwargs == {"rank": 320}
    with pytest.raises(SystemExit):
        bench.parse_args(["--train-steps", "0"])


@pytest.mark.slow
def test_bench_at_the_pythia_70m_shape(tmp_path):
    """The real shape on CPU (minutes): same weights must give the same first loss and greedy tokens."""
    out = tmp_path / "bench.json"
    bench.main(
        ["--model", "pythia-70m", "--train-batch", "2", "--seq-len", "32", "--train-steps", "1", "--warmup", "1",
         "--repeats", "1", "--decode-batches", "1", "--prompt-len", "8", "--new-tokens", "4", "--out", str(out)]
    )  # fmt: skip
    result = json.loads(out.read_text())
    assert result["checks"]["tokens_match"] is True
    first = result["checks"]["first_loss"]
    assert first["ours"] == pytest.approx(first["hf"], rel=1e-5)
