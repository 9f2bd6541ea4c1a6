"""Evaluation past the training context (kvcompress/evaluation/long_context.py): log-scale buckets, contiguous
windows, token-by-token PPL through a cache (exact caches equal the teacher-forced PPL), the passkey prompt and
probe, and the settings' checks; `evaluate` writes both results."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import randomized

import kvcompress.methods  # noqa: F401  (registers the caches)
from kvcompress.config import CacheConfig, EvalConfig
from kvcompress.evaluation import metrics
from kvcompress.evaluation.evaluate import evaluate_long_context
from kvcompress.evaluation.long_context import (
    NEEDLE,
    check_long_context,
    log_buckets,
    long_context,
    long_windows,
    passkey_probe,
    passkey_prompt,
)
from kvcompress.models import GPTNeoX, ModelConfig


class CharTokenizer:
    """One token a character (ids = code points mod 512): enough to build and score prompts."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) % 512 for c in text]


def tiny() -> GPTNeoX:
    return randomized(GPTNeoX(ModelConfig.from_name("tiny")), std=0.05)


def test_log_buckets_double_from_16_and_stop_at_the_length() -> None:
    assert log_buckets(512) == [(0, 16), (16, 32), (32, 64), (64, 128), (128, 256), (256, 512)]
    assert log_buckets(100) == [(0, 16), (16, 32), (32, 64), (64, 100)]
    assert log_buckets(10) == [(0, 10)]


def test_long_windows_are_contiguous_evenly_spaced_and_disjoint() -> None:
    tokens = np.arange(1000)
    w = long_windows(tokens, 99, 4)
    assert w.shape == (4, 100)
    assert all(torch.equal(row, torch.arange(row[0], row[0] + 100)) for row in w)
    assert w[:, 0].tolist() == [0, 300, 600, 900]
    with pytest.raises(ValueError, match="1000 tokens: 10 windows of 100, not 11"):
        long_windows(tokens, 99, 11)


def test_long_context_ppl_of_an_exact_cache_is_the_teacher_forced_ppl() -> None:
    net = tiny()
    tokens = np.random.default_rng(0).integers(0, 512, 2000)
    caches = {"kv": CacheConfig("kv"), "sl": CacheConfig("streaming_llm", {"budget": 0.25})}
    out = long_context(net, tokens, caches, [40], windows=3)["40"]
    ids = long_windows(tokens, 40, 3)
    exact = metrics.token_losses(net, ids)
    assert out["kv"]["ppl"] == pytest.approx(metrics.perplexity(exact), rel=1e-5)
    assert list(out["kv"]["pos_ppl"]) == ["0-16", "16-32", "32-40"]
    assert out["kv"]["window_loss"] == pytest.approx(exact.mean(dim=1).tolist(), rel=1e-5)
    assert out["sl"]["pos_ppl"]["0-16"] == pytest.approx(out["kv"]["pos_ppl"]["0-16"], rel=1e-5)  # 10 slots: exact
    assert out["sl"]["ppl"] != pytest.approx(out["kv"]["ppl"], rel=1e-6)
    assert out["sl"]["bytes_per_token"] < 0.3 * out["kv"]["bytes_per_token"]


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_the_passkey_prompt_has_its_length_and_the_key_at_its_depth(depth: float) -> None:
    tok = CharTokenizer()
    prompt, answer = passkey_prompt(tok, 400, depth, "31415")
    assert len(prompt) == 400 and answer == tok.encode(" 31415")
    needle = tok.encode(NEEDLE.format(key="31415"))
    at = next(i for i in range(len(prompt)) if prompt[i : i + len(needle)] == needle)
    assert abs(at / (400 - len(needle)) - depth) < 0.25


def test_passkey_probe_scores_every_cell_and_a_full_budget_is_kv() -> None:
    net = tiny()
    caches = {"kv": CacheConfig("kv"), "tova": CacheConfig("tova", {"budget": 1.0}), "knorm": CacheConfig("knorm")}
    out = passkey_probe(net, CharTokenizer(), caches, [120], [0.0, 1.0], trials=2, digits=3)
    kv = out["caches"]["kv"]
    assert set(kv["cells"]) == {"120@0.0", "120@1.0"} and 0 <= kv["accuracy"] <= 1 and kv["logprob"] < 0
    assert out["caches"]["tova"]["logprob"] == pytest.approx(kv["logprob"], rel=1e-5)
    assert out["caches"]["knorm"]["logprob"] != pytest.approx(kv["logprob"], rel=1e-6)
    assert out["chance_logprob"] == pytest.approx(-np.log(512))


def test_bad_lengths_fail_in_one_line() -> None:
    cfg = EvalConfig()
    cfg.long_context.enabled, cfg.long_context.lengths = True, [1024]
    with pytest.raises(ValueError, match=r"eval.long_context.lengths=\[1024\] must lie in \[2, max_position"):
        check_long_context(cfg, 512)
    cfg = EvalConfig()
    cfg.passkey.enabled, cfg.passkey.lengths = True, [510]
    with pytest.raises(ValueError, match=r"eval.passkey.lengths=\[510\] must lie in \[32, "):
        check_long_context(cfg, 512)


def test_evaluate_writes_long_context_and_passkey_for_the_chosen_caches() -> None:
    net = tiny()
    data = SimpleNamespace(val_dataset=SimpleNamespace(tokens=np.arange(3000) % 512), tokenizer=CharTokenizer())
    cfg = EvalConfig(caches=["kv", {"name": "streaming_llm", "kwargs": {"budget": 0.5}}])
    cfg.long_context.enabled, cfg.long_context.lengths, cfg.long_context.windows = True, [33], 2
    cfg.passkey.enabled, cfg.passkey.lengths, cfg.passkey.depths, cfg.passkey.trials = True, [200], [0.5], 1
    cfg.passkey.caches = ["kv"]
    out = evaluate_long_context(net, data, cfg)  # type: ignore[arg-type]
    assert set(out["long_context"]["33"]) == {"native", "kv", "streaming_llm(budget=0.5)"}
    assert set(out["passkey"]["caches"]) == {"kv"}


def test_evaluate_cache_records_window_losses_and_the_bytes_at_the_windows_length() -> None:
    from kvcompress.evaluation.evaluate import evaluate_cache

    net = tiny()
    cfg = EvalConfig()
    cfg.decode.new_tokens = 0
    batch = torch.randint(0, 512, (3, 41), generator=torch.Generator().manual_seed(0))
    windows: dict = {"ids": np.arange(3)}
    out = evaluate_cache(net, CacheConfig("int4", {"group_size": 8, "window": 16}), cfg, [batch], windows, np.arange(3))
    assert len(windows["cache:int4(group_size=8,window=16)"]) == 3  # per window, for paired intervals
    assert out["eval_bytes_per_token"] == metrics.cache_bytes_per_token(net, "int4", 40, group_size=8, window=16)
    assert out["eval_bytes_per_token"] != out["bytes_per_token"]  # measured at 128 tokens: another share of window
