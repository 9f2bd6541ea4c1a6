"""Fixed validation windows and per-window records: `windows.safetensors` agrees with metrics.json, the same
windows for every seed, the context check, damaged files named."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
from helpers import randomized, train_tokenizer
from test_train import WORDS, compose_cfg

from kvcompress.evaluation.windows import FILE, load_windows, metric_tensor, window_meta, write_windows
from kvcompress.records import data_record
from kvcompress.run import train
from kvcompress.utils import window_ids_sha256


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small corpus with a tiny tokenizer trained on it (no offline data needed)."""
    root = tmp_path_factory.mktemp("windows")
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(40)) + " ." for _ in range(200)]
    (root / "corpus.txt").write_text("\n".join(lines))
    train_tokenizer(lines[:50], root / "tokenizer.json", vocab_size=300)
    return root


def smoke_train(root: Path, corpus_dir: Path, name: str, *extra: str) -> Path:
    cfg = compose_cfg(
        [
            "debug=smoke",
            "data=local",
            f"data.path={corpus_dir / 'corpus.txt'}",
            f"data.tokenizer={corpus_dir / 'tokenizer.json'}",
            f"data.cache_dir={root / 'cache'}",
            "logger=none",
            "trainer.limit_val_batches=null",  # every validation window
            "++model.overrides.vocab_size=512",  # the tokenizer has 300
            *extra,
        ],
        root / name,
    )
    train(cfg)
    return root / name / "run"


EXTRA = ["eval.autoregressive.enabled=true", "eval.caches=[int8]", "eval.context_check.enabled=true"]


@pytest.fixture(scope="module")
def seed_runs(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path) -> list[Path]:
    """Two seeds of one smoke configuration (lr 3e-3: it learns in 4 steps), with an autoregressive cache and the
    context check; then seed 1 again with lr 1e-12 (untrained)."""
    root = tmp_path_factory.mktemp("seed_runs")
    runs = [
        smoke_train(root, corpus_dir, f"s{seed}", f"seed={seed}", "phase.stages.lm.lr=3e-3", *EXTRA) for seed in (1, 2)
    ]
    return [*runs, smoke_train(root, corpus_dir, "untrained", "seed=1", "phase.stages.lm.lr=1e-12", *EXTRA)]


def test_every_seed_is_scored_on_the_same_windows_and_their_hash_is_recorded(seed_runs: list[Path]) -> None:
    seed_runs = seed_runs[:2]
    metrics = [json.loads((run / "metrics.json").read_text()) for run in seed_runs]
    records = [load_windows(run) for run in seed_runs]
    assert np.array_equal(records[0]["ids"], records[1]["ids"]) and len(records[0]["ids"]) == 10
    val = [m["data"]["splits"]["validation"] for m in metrics]
    train_splits = [m["data"]["splits"]["train"] for m in metrics]
    assert val[0]["window_ids_sha256"] == val[1]["window_ids_sha256"] == window_ids_sha256(records[0]["ids"])
    assert train_splits[0]["window_ids_sha256"] != train_splits[1]["window_ids_sha256"]  # training: by seed
    for m, run in zip(metrics, seed_runs, strict=True):
        assert m["data"]["eval_seed"] == 0 and m["data"]["windows_short_by"] == 0
        assert m["windows"]["window_ids_sha256"] == window_meta(run)["window_ids_sha256"] == val[0]["window_ids_sha256"]
    assert [window_meta(run)["seed"] for run in seed_runs] == ["1", "2"]
    assert records[0]["val"].tolist() != records[1]["val"].tolist()  # two trained models, one set of windows


def test_window_records_agree_with_metrics_json(seed_runs: list[Path]) -> None:
    run = seed_runs[0]
    metrics = json.loads((run / "metrics.json").read_text())
    records = load_windows(run)
    meta = window_meta(run)
    assert math.exp(records["val"].mean()) == pytest.approx(metrics["val_ppl"], rel=1e-6)
    assert json.loads(meta["buckets"]) == [[0, 16], [16, 32]]
    for bucket, ppl in metrics["val_pos_ppl"].items():
        assert math.exp(records[f"bucket:{bucket}"].mean()) == pytest.approx(ppl, rel=1e-6)
    # Autoregressive caches: their own windows (eval.autoregressive.max_batches=1: the first batch of 8).
    for key in ("native", "int8"):
        ids = records[f"cache:{key}:ids"]
        assert np.array_equal(ids, records["ids"][:8])
        assert math.exp(records[f"cache:{key}"].mean()) == pytest.approx(
            metrics["caches"][key]["autoregressive_ppl"], rel=1e-6
        )
    # The native cache is exact: its per-window losses are the teacher-forced ones.
    np.testing.assert_allclose(records["cache:native"], records["val"][:8], rtol=1e-5)
    check = metrics["context_check"]
    assert check["positions"] == [24, 32] and check["window"] == 16 and check["windows"] == 10
    assert math.exp(records["context:full"].mean()) == pytest.approx(check["full_ppl"], rel=1e-6)
    assert math.exp(records["context:last16"].mean()) == pytest.approx(check["last16_ppl"], rel=1e-6)
    assert check["ratio"] == pytest.approx(check["last16_ppl"] / check["full_ppl"])
    assert meta["data_origin"] == metrics["data"]["splits"]["validation"]["origin"]
    assert meta["tokenizer_sha256"] == metrics["data"]["tokenizer_sha256"] and meta["seq_len"] == "32"
    assert sorted(metrics["windows"]["tensors"]) == sorted(k for k in records if not k.endswith("ids"))


def test_compare_trained_with_untrained_runs(seed_runs: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    """Real runs: training for 4 steps at lr 3e-3 lowers the PPL on every window; the comparison says so."""
    from kvcompress.evaluation import report

    trained, _, untrained = seed_runs
    assert report.main(["compare", str(untrained), "--", str(trained), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    ppl = [json.loads((run / "metrics.json").read_text())["val_ppl"] for run in (untrained, trained)]
    assert out["ratio"] == pytest.approx(ppl[1] / ppl[0], rel=1e-6)
    assert out["ci"][1] < 1 and out["n_windows"] == 10 and out["n_seeds"] == [1, 1]
    for metric in ("cache:int8", "bucket:16-32", "context:last16"):
        assert report.main(["compare", str(untrained), "--", str(trained), "--json", "--metric", metric]) == 0
        assert json.loads(capsys.readouterr().out)["ratio"] < 1


def test_context_check_of_a_model_that_ignores_context_is_one(tmp_path: Path) -> None:
    """Standard attention with zero attention output weights predicts from the current token alone: cutting the
    context to the last k tokens changes nothing (ratio 1), for any k."""
    import torch

    from kvcompress.config import ContextCheckConfig
    from kvcompress.evaluation.evaluate import context_check
    from kvcompress.models import GPTNeoX, ModelConfig

    net = randomized(GPTNeoX(ModelConfig.from_name("tiny")))
    with torch.no_grad():
        for name, p in net.named_parameters():
            if ".attention.dense." in name:  # the attention output projection
                p.zero_()

    class Windows:
        seq_len = 24
        val_dataset = None

        def val_dataloader(self, shard: bool = True):
            g = torch.Generator().manual_seed(1)
            return [torch.randint(0, net.cfg.vocab_size, (4, 25), generator=g) for _ in range(2)]

    records: dict[str, np.ndarray] = {"ids": np.arange(8)}
    out = context_check(net, Windows(), ContextCheckConfig(enabled=True, window=4), records)  # type: ignore[arg-type]
    assert out["positions"] == [18, 24] and out["windows"] == 8
    assert out["ratio"] == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(records["context:full"], records["context:last4"], rtol=1e-5)
    assert "context:ids" not in records  # the same windows as `ids`


def test_context_check_settings_fail_in_one_line() -> None:
    from kvcompress.config import ContextCheckConfig

    assert ContextCheckConfig().span(128) == (96, 128)
    assert ContextCheckConfig(positions=[64, 200]).span(128) == (64, 128)
    with pytest.raises(ValueError, match=r"eval.context_check.positions \[8, 32\).*window=16"):
        ContextCheckConfig(positions=[8, 40]).span(32)
    with pytest.raises(ValueError, match="eval.context_check.window"):
        ContextCheckConfig(window=0).span(32)


def test_fixed_number_of_validation_windows_and_a_shortfall_is_recorded(corpus_dir: Path, tmp_path: Path) -> None:
    from kvcompress.data import TokenWindowDataModule

    common = dict(
        source="local",
        path=str(corpus_dir / "corpus.txt"),
        tokenizer=str(corpus_dir / "tokenizer.json"),
        cache_dir=str(tmp_path),
        seq_len=16,
    )
    dm = TokenWindowDataModule(num_samples=40, val_fraction=0.1, num_val_windows=12, **common)
    dm.setup("fit")
    assert (dm.num_train_windows, dm.num_val_windows) == (36, 12)  # train: 40 - round(40 x 0.1)
    everything = TokenWindowDataModule(num_samples=None, num_val_windows=12, seed=5, **common)
    everything.setup("fit")
    n = everything.info["splits"]["all"]["windows"]
    assert everything.num_train_windows == n - 12  # all the rest
    assert np.array_equal(everything.val_dataset.indices, dm.val_dataset.indices)  # eval_seed alone chooses them
    record = data_record(dm.info)
    assert record["splits"]["validation"]["windows_asked"] == 12 and record["windows_short_by"] == 0

    short = TokenWindowDataModule(num_samples=40, num_val_windows=10 * n, **common)
    short.setup("fit")
    record = data_record(short.info)
    assert short.num_val_windows == n - 1  # one window is left to train on
    assert record["splits"]["validation"]["windows_short_by"] == 10 * n - (n - 1)
    assert record["splits"]["train"]["windows_short_by"] == 36 - 1
    assert record["windows_short_by"] == 10 * n - (n - 1) + 35
    for bad in (-1, 0, 1.5, True):
        with pytest.raises(ValueError, match="num_val_windows"):
            TokenWindowDataModule(num_val_windows=bad, **common)


def test_a_damaged_record_file_is_named(tmp_path: Path) -> None:
    ids = np.arange(5)
    path = write_windows(tmp_path, {"ids": ids, "val": np.linspace(1, 2, 5)}, {"seq_len": "8"})
    assert path == tmp_path / FILE and load_windows(tmp_path)["val"].dtype == np.float64
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(ValueError, match=str(path)):
        load_windows(tmp_path)
    with pytest.raises(ValueError, match="rows"):
        write_windows(tmp_path, {"ids": ids, "val": np.zeros(5), "bucket:0-4": np.zeros(4)}, {})
    with pytest.raises(FileNotFoundError, match="no per-window records"):
        load_windows(tmp_path / "nowhere")
    assert metric_tensor("val_ppl") == "val" and metric_tensor("cache:int8") == "cache:int8"
    with pytest.raises(ValueError, match="--metric"):
        metric_tensor("ppl")
