"""The int8 and int4 KV caches: measured bytes, bounded error, chunked prefill consistency, honest defaults."""

import logging
from pathlib import Path

import pytest
import torch

import kvcompress.methods  # noqa: F401  (registers caches)
from kvcompress.methods.quant import Int4KVCache, Int8KVCache, _pack, _quantize4, _unpack
from kvcompress.models import GPTNeoX, ModelConfig, generate


def model_fp32() -> GPTNeoX:
    torch.manual_seed(0)
    return GPTNeoX(ModelConfig.from_name("tiny")).eval()


def test_bytes_match_the_formula():
    cfg = ModelConfig.from_name("tiny")
    for dtype, scale_bytes in ((torch.float32, 4), (torch.bfloat16, 2)):
        caches = GPTNeoX(cfg).build_caches(2, 10, kind="int8", dtype=dtype)
        per_layer = 2 * cfg.n_head * (cfg.head_size + scale_bytes)
        assert [c.bytes_per_token() for c in caches] == [per_layer] * cfg.n_layer
    # Pythia-70M in bf16: 6 x 2 x 8 x (64 + 2) = 6336 bytes per token vs 12288 for [K, V].
    assert 6 * Int8KVCache(1, 4, 8, 64, dtype=torch.bfloat16).bytes_per_token() == 6336


def test_quantization_error_is_small_but_not_zero():
    x = torch.randn(2, 3, 5, 16)
    q, scale = Int8KVCache.quantize(x)
    err = (q.float() * scale - x).abs()
    assert q.dtype == torch.int8 and err.max() > 0
    assert (err <= scale / 2 + 1e-6).all()  # round-to-nearest: at most half a step


def test_int8_decoding_is_close_to_kv_and_chunking_is_consistent():
    model = model_fp32()
    prompt = torch.randint(0, 512, (2, 9))
    _, exact = generate(model, prompt, 6, cache="kv", return_logits=True)
    _, quant = generate(model, prompt, 6, cache="int8", return_logits=True)
    diff = (exact - quant).abs().max()
    assert 0 < diff < 0.05 * exact.abs().max()
    ids = torch.randint(0, 512, (2, 14))
    whole, chunks = model.build_caches(2, 14, kind="int8"), model.build_caches(2, 14, kind="int8")
    with torch.no_grad():
        full = model(ids, whole)
        parts = torch.cat([model(ids[:, :5], chunks), model(ids[:, 5:], chunks)], dim=1)
    torch.testing.assert_close(parts, full, atol=1e-5, rtol=1e-5)


# --- int4 (KIVI) ------------------------------------------------------------------------------------------


def test_int4_bytes_count_codes_scales_zeros_and_window():
    cfg = ModelConfig.from_name("pythia-70m", vocab_size=8)
    nh, hs, B, L, G, R = 8, 64, 2, 64, 32, 48
    cache = Int4KVCache(B, L, nh, hs, dtype=torch.float32, group_size=G, window=R)
    per_head = (
        hs // 2  # K codes, two a byte
        + hs // 2  # V codes
        + 2 * hs * 4 / G  # K scale + zero per channel, one pair per G tokens
        + 2 * (hs // G) * 4  # V scale + zero per token, one pair per G channels
    )
    window = 2 * R * hs * 4 / L  # the full-precision window, spread over the L slots
    assert cache.nbytes() == B * nh * L * (per_head + window)
    caches = GPTNeoX(cfg).to("meta").build_caches(B, L, kind="int4", device="cpu", dtype=torch.float32, window=R)
    assert caches.nbytes() == cfg.n_layer * cache.nbytes()


def test_int4_settings_are_checked():
    with pytest.raises(ValueError, match="window=8 must be >= group_size=32"):
        Int4KVCache(1, 16, 2, 64, window=8)
    with pytest.raises(ValueError, match="group_size=24 must divide head_size=64"):
        Int4KVCache(1, 16, 2, 64, group_size=24)


def test_int4_is_exact_inside_the_window_and_close_beyond_it():
    model = model_fp32()
    prompt = torch.randint(0, 512, (2, 20))
    _, exact = generate(model, prompt, 12, cache="kv", return_logits=True)
    inside = generate(model, prompt, 12, caches=model.build_caches(2, 32, kind="int4", window=32), return_logits=True)
    torch.testing.assert_close(inside[1], exact, atol=1e-5, rtol=1e-5)  # every token still in full precision
    caches = model.build_caches(2, 32, kind="int4", group_size=4, window=4)
    _, quant = generate(model, prompt, 12, caches=caches, return_logits=True)
    diff = (exact - quant).abs().max()
    assert 0 < diff < 0.1 * exact.abs().max()


def test_int4_quantization_error_is_bounded():
    x = torch.randn(2, 3, 8, 16)
    codes, scale, zero = _quantize4(x, dim=-2)  # per channel over 8 tokens
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    err = (codes.float() * scale + zero - x).abs()
    assert err.max() > 0 and (err <= scale / 2 + 1e-6).all()
    assert torch.equal(_unpack(_pack(codes.transpose(-1, -2))), codes.transpose(-1, -2))


# --- int4's defaults at the library's own context lengths ------------------------------------------------------


def int4_defaults() -> dict:
    from omegaconf import OmegaConf

    return dict(OmegaConf.load(Path(__file__).resolve().parent.parent / "conf" / "cache" / "int4.yaml").kwargs)


def test_int4_defaults_reduce_the_bytes_at_128_token_windows():
    """The class's and conf/cache/int4.yaml's defaults quantize a 128-token context: fewer bytes than KV."""
    from kvcompress.evaluation import metrics

    net = GPTNeoX(ModelConfig.from_name("pythia-70m")).to("meta")
    kv = metrics.kv_bytes_per_token(net)
    for kwargs in ({}, int4_defaults()):
        ours = metrics.cache_bytes_per_token(net, "int4", max_len=128, **kwargs)
        assert ours < 0.6 * kv, (kwargs, ours, kv)  # 2,688 vs 6,144 B/token at fp32


def test_int4_defaults_change_the_autoregressive_ppl_of_a_smoke_model():
    """At 128 tokens the default window (32) keeps only the last 32 in full precision: the losses after the
    first 32 positions move (observed 3.6e-3 at most); a window of 128 holds every token: kv's (1e-6)."""
    from helpers import randomized

    from kvcompress.evaluation import metrics

    shape = dict(n_layer=2, n_embd=64, n_head=4, intermediate_size=128, vocab_size=512)  # debug=smoke's
    net = randomized(GPTNeoX(ModelConfig.from_name("pythia-70m", **shape)))
    ids = torch.randint(0, 512, (2, 129), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        kv = metrics.autoregressive_token_losses(net, ids, "kv")
        int4 = metrics.autoregressive_token_losses(net, ids, "int4", **int4_defaults())
        whole = metrics.autoregressive_token_losses(net, ids, "int4", window=128)
    torch.testing.assert_close(whole, kv, atol=1e-5, rtol=0)
    torch.testing.assert_close(int4[:, :32], kv[:, :32], atol=1e-5, rtol=0)  # inside the window
    assert (int4[:, 32:] - kv[:, 32:]).abs().max() > 1e-4
    assert metrics.perplexity(int4) != metrics.perplexity(kv)


def test_a_cache_equal_to_kv_or_larger_says_so_in_one_warning_line(caplog):
    from types import SimpleNamespace

    from kvcompress.config import EvalConfig
    from kvcompress.evaluation.evaluate import evaluate

    net = GPTNeoX(ModelConfig.from_name("pythia-70m", n_layer=2, n_embd=64, n_head=4, intermediate_size=128))
    cfg = EvalConfig(caches=["kv", "int4", {"name": "int4", "kwargs": {"window": 128}, "label": "int4_w128"}])
    cfg.decode.new_tokens = 0
    with caplog.at_level(logging.WARNING):
        out = evaluate(net, SimpleNamespace(seq_len=128), cfg)
    assert "note" not in out["caches"]["kv"] and "note" not in out["caches"]["int4"]
    assert (
        out["caches"]["int4_w128"]["note"]
        == "equals kv at 128-token windows; holds more than KV (1248 vs 1024 B/token)"
    )
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "int4_w128 equals kv" in line and "\n" not in line
