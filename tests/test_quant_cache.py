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


def test_quantization_error_is_small_but_not_zero():
    x = torch.randn(2, 3, 5, 16)
    q, scale = Int8KVCache.quantize(x)
    err = (q.float() * scale - x).abs()
    assert q.dtype == torch.int8 and err.max() > 0
    assert (err <= scale / 2 + 1e-6).all()  # round-to-nearest: at most half a step


# --- int4 (KIVI) ------------------------------------------------------------------------------------------


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


@pytest.mark.parametrize("kind, kwargs", [("int8", {}), ("int4", {"group_size": 4, "window": 6})])
def test_fused_decode_read_equals_the_op_by_op_read(kind, kwargs):
    """The fused (compiled) decode read that large caches use in eager decoding gives the op-by-op result."""
    model = model_fp32().double()
    prompt = torch.randint(0, 512, (2, 9))
    runs = [
        generate(
            model, prompt, 8, caches=model.build_caches(2, 17, kind=kind, fused_read=f, **kwargs), return_logits=True
        )
        for f in (False, True)
    ]
    assert torch.equal(runs[0][0], runs[1][0])
    torch.testing.assert_close(runs[0][1], runs[1][1], atol=1e-12, rtol=0)
    assert model.build_caches(128, 256, kind=kind, **kwargs)[0].fused_read  # large caches fuse by default
    assert not model.build_caches(2, 17, kind=kind, **kwargs)[0].fused_read


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
