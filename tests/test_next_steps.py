"""Seed report 000's next steps (issue 21) as table 000n of `make reproduce`: the runs compose and start from the
earlier run of their seed, and the table reports paired intervals (never "reproduced"), bytes and adapter curves."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from kvcompress.reproduce import load_protocol, plan
from kvcompress.reproduce.next_steps import NEXT_STEPS, REPORTED
from kvcompress.reproduce.protocol import RunSpec, compose, resolve_run_references
from kvcompress.reproduce.writer import table_section


def next_steps_plan(tmp_path: Path, seeds=(0, 1)) -> list[RunSpec]:
    return plan(load_protocol("mini"), ["000n"], list(seeds), tmp_path, tmp_path / "t.json")


def test_every_run_composes_and_starts_from_the_earlier_run_of_its_seed(tmp_path: Path) -> None:
    specs = next_steps_plan(tmp_path)
    by = {(s.name, s.seed): s for s in specs}
    assert f"model.init_from={by['baseline', 1].folder}" in by["gqa2", 1].overrides
    assert f"model.init_from={by['gqa2', 0].folder}" in by["gqa2_ka_adapter", 0].overrides
    for spec in specs:
        assert "{run:" not in json.dumps(list(spec.overrides))
        assert not any(o.startswith("eval.context_check") for o in spec.overrides)  # the table opts out
        if spec.seed == 0:
            cfg = compose(spec, tmp_path / "stages")  # raises on an override that does not compose
            if spec.name.startswith(("gqa2", "mqa")):
                assert cfg.model.overrides.n_kv_head == (2 if spec.name.startswith("gqa2") else 1)
    table_003 = plan(load_protocol("mini"), ["003"], [0], tmp_path, tmp_path / "t.json")[0]
    base = by["baseline", 0].overrides
    # The base is table 003's baseline: the same training overrides, so the same stage (reused), evaluated more.
    assert [o for o in table_003.overrides if not o.startswith("eval.")] == [
        o for o in base if not o.startswith("eval")
    ]


def test_a_reference_to_a_later_run_is_named(tmp_path: Path) -> None:
    specs = [
        RunSpec("t", "a", 0, ("model.init_from={run:b}",), tmp_path / "a"),
        RunSpec("t", "b", 0, (), tmp_path / "b"),
    ]
    with pytest.raises(ValueError, match=r"table t run a: \{run:b\} names no earlier run of seed 0"):
        resolve_run_references(specs)


def fake_seed(spec: RunSpec, shift: float, curve: list[tuple[float, float]] | None) -> dict:
    """A finished seed as the writer loads it: metrics, per-window records of the run and of its stages."""
    base = np.random.default_rng(0).normal(3.0, 0.3, 40)  # the same 40 windows in every run and seed
    noise = np.random.default_rng(spec.seed + 1).normal(0.0, 0.01, 40)
    val = base + shift + noise
    records = {"ids": np.arange(40), "val": val}
    for key, extra in (("native", 0.0), ("ka_plain", 2.0), ("ka", 1.0)):
        records[f"cache:{key}"] = val + extra
    spec.folder.mkdir(parents=True, exist_ok=True)
    if curve:
        lines = ["adapter/val_adapter,adapter/val_ar_ppl,epoch", *[f"{a},{b},{i}" for i, (a, b) in enumerate(curve)]]
        (spec.folder / "csv").mkdir(exist_ok=True)
        (spec.folder / "csv" / "metrics.csv").write_text("\n".join(lines) + "\n")
    caches = {k: {"bytes_per_token": 2048.0, "autoregressive_ppl": math.exp(float(np.mean(v)))}
              for k, v in (("native", val), ("ka_plain", val + 2.0), ("ka", val + 1.0))}  # fmt: skip
    start = {"ids": np.arange(40), "val": val + 0.5}  # the pooled start: 0.5 nats worse than the uptrained result
    return {
        "val_ppl": math.exp(float(np.mean(val))),
        "caches": caches,
        "stages": [{"name": "gqa", "start_val_ppl": math.exp(float(np.mean(val + 0.5)))}],
        "_folder": str(spec.folder),
        "_windows": records,
        "_stages": {"gqa": {"windows_start": start}},
    }


def test_the_table_reports_paired_intervals_bytes_and_adapter_curves(tmp_path: Path, monkeypatch) -> None:
    from kvcompress.reproduce import writer

    specs = next_steps_plan(tmp_path)
    shifts = {"baseline": 0.0, "gqa2": 0.05, "mqa": 0.1}
    seeds = {}
    for spec in specs:
        curve = [(1.0, 40.0), (0.5, 45.0)] if "adapter" in spec.name else None
        seeds.setdefault(spec.name, []).append(fake_seed(spec, shifts.get(spec.name, 0.0), curve))
    monkeypatch.setattr(writer, "load_table_runs", lambda _specs: seeds)
    monkeypatch.setattr(writer, "finished", lambda _spec: False)
    text = "\n".join(table_section("000n", specs, tmp_path, {}))
    assert NEXT_STEPS.title in text
    assert "| MHA, ka_plain cache: bytes / token | — | 2048.0 ± 0.0 (n=2) |" in text
    line = next(x for x in text.splitlines() if x.startswith("| MHA: KA cache, no adapter / KV |"))
    assert f"**{REPORTED}: higher**" in line and f"{math.exp(2):.3f} [" in line  # + 2 nats on every window
    line = next(x for x in text.splitlines() if x.startswith("| GQA-2 uptrained / pooled, val PPL |"))
    assert f"**{REPORTED}: lower**" in line and f"{math.exp(-0.5):.3f} [" in line
    line = next(x for x in text.splitlines() if x.startswith("| ka_adapter: KA-cache autoregressive PPL by epoch |"))
    assert "epoch 1: 40.0 ± 0.0 (n=2); epoch 2: 45.0 ± 0.0 (n=2)" in line and "2 of 2 seeds" in line
    assert "not reproduced" not in text and "| **reproduced** |" not in text
