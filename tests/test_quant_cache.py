"""The int8 KV cache: measured bytes, bounded error, chunked prefill consistency."""

import torch

import kvcompress.methods  # noqa: F401  (registers caches)
from kvcompress.methods.quant import Int8KVCache
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
