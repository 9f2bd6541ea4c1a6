"""The Pareto report (kvcompress/evaluation/pareto.py): points for every cache of every run and metric, paired
CIs against the `kv` cache on the same windows, the front, and the files `python -m kvcompress.report` writes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kvcompress.evaluation.pareto import front, points, write_pareto
from kvcompress.evaluation.report import main as report_main


def cache(kind: str, nbytes: float, shift: float, windows: int = 12, seed: int = 0) -> dict:
    base = np.random.default_rng(0).normal(3.0, 0.3, windows)  # the same windows in every run
    noise = np.random.default_rng(seed + 1).normal(0.0, 0.01, windows)
    losses = (base + shift + noise).tolist()
    return {"kind": kind, "bytes_per_token": nbytes, "autoregressive_ppl": float(np.exp(np.mean(losses))),
            "window_loss": losses}  # fmt: skip


def baseline_metrics() -> dict:
    caches = {
        "kv": cache("kv", 1024, 0.0),
        "int8": cache("int8", 272, 0.001),
        "streaming_llm(budget=0.25)": cache("streaming_llm", 264, 0.3),
        "h2o(budget=0.25)": cache("h2o", 300, 0.5),  # beaten: more bytes and a higher PPL than streaming_llm
    }
    long = {"512": {k: {**c, "ppl": c["autoregressive_ppl"]} for k, c in caches.items() if k != "h2o(budget=0.25)"}}
    passkey = {
        "caches": {
            "kv": {"kind": "kv", "bytes_per_token": 1024, "accuracy": 0.5, "logprob": -3.0},
            "sl": {"kind": "streaming_llm", "bytes_per_token": 264, "accuracy": 0.0, "logprob": -8.0},
        }
    }
    return {"caches": caches, "long_context": long, "passkey": passkey, "val_ppl": 20.0, "_windows": records(caches)}


def vdproj_metrics() -> dict:
    caches = {"vdproj": cache("vdproj", 768, 0.05, seed=3), "vdproj_int8": cache("vdproj_int8", 520, 0.06)}
    return {"caches": caches, "_windows": records(caches)}


def records(caches: dict) -> dict:
    """The per-window records of a run's caches (as in its windows.safetensors), moved out of the cache entries."""
    return {f"cache:{key}": np.asarray(c.pop("window_loss")) for key, c in caches.items()}


def test_points_pair_every_ppl_with_the_kv_cache_and_the_front_drops_beaten_ones() -> None:
    by_metric = points([("base", baseline_metrics()), ("vdproj", vdproj_metrics())])
    assert set(by_metric) == {"ppl", "long_ppl@512", "passkey_accuracy", "passkey_logprob"}
    ppl = {p.label: p for p in by_metric["ppl"]}
    assert len(ppl) == 6 and "vdproj | vdproj_int8" in ppl
    kv, sl = ppl["base | kv"], ppl["base | streaming_llm(budget=0.25)"]
    assert kv.vs_reference is not None and kv.vs_reference.ratio == pytest.approx(1.0)
    assert sl.vs_reference is not None and sl.vs_reference.ci[0] > 1.2  # exp(0.3) = 1.35, far outside the noise
    assert sl.vs_reference.ratio == pytest.approx(sl.value / kv.value, rel=1e-9)
    on_front = [p.label for p in front(by_metric["ppl"], "ppl")]
    assert "base | h2o(budget=0.25)" not in on_front and on_front[0] == "base | streaming_llm(budget=0.25)"
    assert on_front[-1] == "base | kv"
    assert [p.label for p in front(by_metric["passkey_accuracy"], "passkey_accuracy")] == ["base | sl", "base | kv"]


def test_the_report_writes_the_pareto_table_and_plots(tmp_path) -> None:
    from kvcompress.evaluation.windows import write_windows

    for name, metrics in (("base", baseline_metrics()), ("vdproj", vdproj_metrics())):
        (tmp_path / name).mkdir()
        records = metrics.pop("_windows")
        write_windows(tmp_path / name, {"ids": np.arange(12), "val": np.zeros(12), **records}, {})
        (tmp_path / name / "metrics.json").write_text(json.dumps({**metrics, "overrides": [f"experiment={name}"]}))
    assert report_main([str(tmp_path), "--out", str(tmp_path / "report")]) == 0
    table = (tmp_path / "report" / "pareto.md").read_text()
    assert "### ppl" in table and "### long_ppl@512" in table and "### passkey_accuracy" in table
    assert "experiment=vdproj | vdproj_int8" in table and "[" in table  # a CI
    for metric in ("ppl", "long_ppl_512", "passkey_accuracy", "passkey_logprob"):
        assert (tmp_path / "report" / f"pareto_{metric}.png").stat().st_size > 1000


def test_no_cache_measured_writes_no_pareto(tmp_path) -> None:
    assert write_pareto([("run", {"val_ppl": 3.0})], tmp_path) == {}


def test_the_pareto_mini_overlays_compose_and_every_cache_fits_its_model(tmp_path, capsys) -> None:
    """Both overlays compose; every cache in their eval lists builds on their model; the driver's dry run lists both
    runs with the tokenizer it would train."""
    import torch
    from omegaconf import OmegaConf
    from test_train import compose_cfg

    from kvcompress.config import EvalConfig
    from kvcompress.evaluation.long_context import check_long_context
    from kvcompress.models import GPTNeoX, ModelConfig
    from kvcompress.reproduce.pareto_mini import main as pareto_main

    kinds = {}
    for name in ("pareto_mini", "pareto_mini_vdproj"):
        cfg = compose_cfg([f"experiment={name}"], tmp_path)
        assert cfg.data.seq_len == 512 and cfg.model.overrides.vocab_size == 4096
        evaluation: EvalConfig = OmegaConf.to_object(cfg.eval)  # type: ignore[assignment]
        model_cfg = ModelConfig.from_name(
            cfg.model.name, attention=cfg.model.attention, attention_kwargs=dict(cfg.model.attention_kwargs or {}),
            **cfg.model.overrides,
        )  # fmt: skip
        with torch.device("meta"):
            net = GPTNeoX(model_cfg)
        for cache in [
            *evaluation.all_caches().values(),
            *evaluation.caches_for(evaluation.passkey.caches, "p").values(),
        ]:
            net.build_caches(1, 8, kind=cache.name, device="cpu", **cache.kwargs)
        check_long_context(evaluation, model_cfg.max_position_embeddings)
        kinds[name] = {c.name for c in evaluation.all_caches().values()}
    assert {"streaming_llm", "h2o", "snapkv", "tova", "knorm", "int8", "int4"} <= kinds["pareto_mini"]
    assert {"vdproj", "vdproj_int8", "vdproj_int4"} <= kinds["pareto_mini_vdproj"]
    assert pareto_main(["--out", str(tmp_path / "out"), "--dry-run"]) == 0
    commands = capsys.readouterr().out.splitlines()
    assert len(commands) == 2 and "experiment=pareto_mini " in commands[0] and "bpe4096/tokenizer.json" in commands[0]
