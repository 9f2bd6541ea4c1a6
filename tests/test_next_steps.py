"""Seed report 000's next steps (issue 21): the protocol composes with its run references, per-window losses, and
the reported table (paired intervals, adapter curves) from run folders."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import randomized

import kvcompress.methods  # noqa: F401  (registers attentions and caches)
from kvcompress.evaluation.metrics import autoregressive_token_losses, token_losses
from kvcompress.evaluation.windows import WindowLosses
from kvcompress.models import GPTNeoX, ModelConfig
from kvcompress.reproduce import load_protocol, plan
from kvcompress.reproduce.next_steps import REPORTED, ROWS, resolve_run_references, section, write_next_steps
from kvcompress.reproduce.protocol import RunSpec, compose


def next_steps_plan(tmp_path: Path, seeds=(0, 1)) -> list[RunSpec]:
    protocol = load_protocol("next_steps")
    return resolve_run_references(plan(protocol, list(protocol["tables"]), list(seeds), tmp_path, tmp_path / "t.json"))


def test_every_run_composes_and_starts_from_the_earlier_run_of_its_seed(tmp_path: Path) -> None:
    specs = next_steps_plan(tmp_path)
    by = {(s.name, s.seed): s for s in specs}
    assert f"model.init_from={by['baseline', 1].folder}" in by["gqa2", 1].overrides
    assert f"model.init_from={by['gqa2', 0].folder}" in by["gqa2_ka_adapter", 0].overrides
    for spec in specs:
        if spec.seed == 0:
            cfg = compose(spec, tmp_path / "stages")  # raises on an override that does not compose
            assert "{run:" not in json.dumps(list(spec.overrides))
            if spec.name.startswith(("gqa2", "mqa")):
                assert cfg.model.overrides.n_kv_head == (2 if spec.name.startswith("gqa2") else 1)
    assert {row.run for row in ROWS} <= {s.name for s in specs}


def test_a_reference_to_a_later_run_is_named(tmp_path: Path) -> None:
    specs = [
        RunSpec("t", "a", 0, ("model.init_from={run:b}",), tmp_path / "a"),
        RunSpec("t", "b", 0, (), tmp_path / "b"),
    ]
    with pytest.raises(ValueError, match=r"table t run a: \{run:b\} names no earlier run of seed 0"):
        resolve_run_references(specs)


class ValData:
    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def val_dataloader(self, shard: bool = True):
        return list(self.ids.split(3))


def test_window_losses_are_the_per_window_means_of_each_cache() -> None:
    model = randomized(GPTNeoX(ModelConfig.from_name("tiny")), dtype=torch.float64)
    ids = torch.randint(0, 512, (7, 10), generator=torch.Generator().manual_seed(0))
    hook = WindowLosses(caches=["ka_plain"], max_batches=2, key="start_windows")
    hook.check(model)
    out = hook(net=model, datamodule=ValData(ids), runner=None)["start_windows"]
    assert out["n_windows"] == 6 and len(out["sha256"]) == 16
    parallel = torch.tensor(out["parallel"], dtype=torch.float64)
    torch.testing.assert_close(parallel, token_losses(model, ids[:6]).mean(1))
    ka = autoregressive_token_losses(model, ids[:6], "ka_plain").mean(1)
    torch.testing.assert_close(torch.tensor(out["autoregressive"]["ka_plain"], dtype=torch.float64), ka)
    assert hook.__class__(max_batches=2)(net=model, datamodule=ValData(ids))["sha256"] == out["sha256"]  # unkeyed
    with pytest.raises(ValueError, match="cannot serve"):
        WindowLosses(caches=["vdproj"]).check(model)


def fake_run(spec: RunSpec, windows: dict, adapter_curve: list[tuple[float, float]] | None = None) -> None:
    spec.folder.mkdir(parents=True)
    metrics = {"windows": windows, "caches": {k: {"bytes_per_token": 2048.0} for k in ("native", "ka_plain", "ka")}}
    metrics["stages"] = [
        {"name": "gqa", "start_windows": {**windows, "parallel": [x + 0.5 for x in windows["parallel"]]}}
    ]
    (spec.folder / "metrics.json").write_text(json.dumps(metrics))
    (spec.folder / "reproduce.json").write_text(json.dumps({"overrides": list(spec.overrides), "seconds": 60.0}))
    if adapter_curve:
        (spec.folder / "csv").mkdir()
        lines = ["adapter/val_adapter,adapter/val_ar_ppl,epoch"]
        lines += [f"{loss},{ppl},{i}" for i, (loss, ppl) in enumerate(adapter_curve)]
        (spec.folder / "csv" / "metrics.csv").write_text("\n".join(lines) + "\n")


def test_the_table_reports_paired_intervals_bytes_and_adapter_curves(tmp_path: Path) -> None:
    specs = next_steps_plan(tmp_path)
    gen = torch.Generator().manual_seed(0)
    for spec in specs:
        base = (3.0 + 0.3 * torch.randn(20, generator=gen, dtype=torch.float64)).tolist()
        shift = {"baseline": 0.0, "gqa2": 0.05, "mqa": 0.1}.get(spec.name, 0.6)
        par = [x + shift for x in base] if spec.name != "baseline" else base
        windows = {"sha256": f"seed{spec.seed}", "parallel": par, "autoregressive": {"ka_plain": [x + 2 for x in par]}}
        windows["autoregressive"]["ka"] = [x + 1 for x in par]
        curve = [(1.0, 40.0), (0.5, 45.0)] if "adapter" in spec.name else None
        fake_run(spec, windows, curve)
    text = "\n".join(section(specs, resamples=200))
    assert "| MHA, KV cache | baseline | 2048 | " in text
    assert f"| MHA, KA cache (no adapter) | MHA, KV cache | {math.exp(2):.3f} [" in text  # + 2 nats on every window
    assert "| higher | reported |" in text and "lower" in text.replace("not lower", "")
    assert "| ka_adapter | 40.0 ± 0.0 (n=2) | 45.0 ± 0.0 (n=2) | 2 of 2 (val_adapter) |" in text
    assert "| gqa2 | 60 ± 0 (n=2) |" in text
    assert REPORTED in text and "reproduced" not in text
    assert write_next_steps(tmp_path, specs, resamples=50).read_text().startswith("# Seed report 000")


def test_windows_of_different_text_are_never_paired(tmp_path: Path) -> None:
    specs = [s for s in next_steps_plan(tmp_path, seeds=(0,)) if s.name in ("baseline", "gqa2")]
    for spec in specs:
        fake_run(spec, {"sha256": spec.name, "parallel": [3.0, 3.1, 2.9], "autoregressive": {}})
    assert "not the same windows (seeds [0])" in "\n".join(section(specs, resamples=50))


@pytest.mark.slow
def test_the_chain_runs_in_smoke_form_and_fills_its_rows(tmp_path: Path) -> None:
    """baseline -> GQA-2 uptrained from it -> a KA adapter on each, with the protocol's own overrides minus the mini
    data and shape (debug=smoke on a small local corpus), then NEXT_STEPS.md from their metrics."""
    import random

    from helpers import train_tokenizer
    from test_train import WORDS, smoke

    from kvcompress.run import train

    rng = random.Random(0)
    corpus = tmp_path / "corpus.txt"
    lines = [" ".join(rng.choice(WORDS) for _ in range(40)) + " ." for _ in range(200)]
    corpus.write_text("\n".join(lines))
    train_tokenizer(lines[:50], tmp_path / "tokenizer.json", vocab_size=300)
    keep = (
        "experiment=",
        "attention=",
        "phase=",
        "phase.",
        "++phase.",
        "eval",
        "model.init_from",
        "++model.overrides.n",
    )
    specs = [
        s
        for s in next_steps_plan(tmp_path, seeds=(0,))
        if s.name in ("baseline", "gqa2", "ka_adapter", "gqa2_ka_adapter")
    ]
    for spec in specs:
        overrides = [o for o in spec.overrides if o.startswith(keep) and "epochs_cap" not in o]
        cfg = smoke(spec.folder, corpus, *overrides, "eval.autoregressive.max_batches=1")
        metrics = train(cfg)
        (spec.folder / "metrics.json").write_text((spec.folder / "run" / "metrics.json").read_text())
        assert metrics["stages"]
    text = "\n".join(section(specs, resamples=50))
    for label in ("MHA, KV cache", "GQA-2 pooled, before uptraining, KV", "GQA-2, KA cache + adapter"):
        line = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
        assert "(n=1)" in line, line
    assert "not the same windows" not in text
