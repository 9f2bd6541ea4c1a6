"""Evaluation metrics: PPL buckets, cache size, decode speed, and the reversal probe."""

from __future__ import annotations

import math

import pytest
import torch

import kvcompress.methods  # noqa: F401  (registers attentions)
from kvcompress.evaluation.metrics import (
    cache_bytes_per_token,
    decode_speed,
    perplexity,
    position_ppl,
    reversal_facts,
    reversal_probe,
    token_losses,
)
from kvcompress.models import GPTNeoX, ModelConfig


class CharTokenizer:
    """Toy tokenizer: one id per character."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) % 512 for c in text]


def tiny_model(**kw) -> GPTNeoX:
    torch.manual_seed(0)
    return GPTNeoX(ModelConfig.from_name("tiny", **kw)).eval()


def test_perplexity_and_position_buckets() -> None:
    # Loss at position t is t / 10 in both rows, over 40 positions.
    losses = (torch.arange(40, dtype=torch.float32) / 10).expand(2, 40)
    assert perplexity(losses) == pytest.approx(math.exp(3.9 / 2))
    ppl = position_ppl(losses)
    assert list(ppl) == ["0-16", "16-32", "32-64"]  # 64-96 and 96-128 start past the end: skipped
    assert ppl["0-16"] == pytest.approx(math.exp(7.5 / 10))  # mean of 0..15 is 7.5
    assert ppl["16-32"] == pytest.approx(math.exp(23.5 / 10))
    assert ppl["32-64"] == pytest.approx(math.exp(35.5 / 10))  # clipped to 32..39
    custom = position_ppl(losses, buckets=((0, 2), (38, 100)))
    assert custom == pytest.approx({"0-2": math.exp(0.05), "38-100": math.exp(3.85)})


def test_token_losses_are_cross_entropy() -> None:
    model = tiny_model()
    x = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    losses = token_losses(model, x)
    with torch.no_grad():
        logp = model(x[:, :-1]).log_softmax(-1)
    torch.testing.assert_close(losses, -logp.gather(-1, x[:, 1:, None])[..., 0])


def test_cache_bytes_per_token() -> None:
    cfg = ModelConfig.from_name("tiny")
    model = tiny_model()
    kv = 2 * cfg.n_layer * cfg.n_embd * 4  # K and V, fp32
    assert cache_bytes_per_token(model) == kv
    assert cache_bytes_per_token(model, cache="ka") == kv  # [K, A]: the same size
    assert cache_bytes_per_token(model.half(), max_len=32) == kv / 2
    mka = tiny_model(attention="mka")  # last layer also caches the KA layer's K and A
    assert cache_bytes_per_token(mka) == kv + 2 * cfg.n_embd * 4


def test_decode_speed_reports_ttft_and_tpot() -> None:
    speed = decode_speed(tiny_model(), batch_size=2, prompt_len=4, new_tokens=3, warmup=1, repeats=2)
    assert set(speed) == {"ttft_s", "tpot_s", "decode_tokens_per_s"}
    assert all(math.isfinite(v) and v > 0 for v in speed.values())
    assert speed["decode_tokens_per_s"] == pytest.approx(2 / speed["tpot_s"])


def test_reversal_facts_are_deterministic_and_reversed() -> None:
    facts = reversal_facts(20, seed=0)
    assert facts == reversal_facts(20, seed=0) and facts != reversal_facts(20, seed=1)
    assert len(facts) == 20 and len({f for f, _ in facts}) == 20
    for forward, backward in facts:
        a, rest = forward[:-1].split(" is the ")
        b = rest.split(" of ")[1]
        assert backward.startswith(f"{b} is the ") and backward.endswith(f" of {a}.")
    with pytest.raises(ValueError, match="names"):
        reversal_facts(10_000)


def test_reversal_probe() -> None:
    model, tok = tiny_model(), CharTokenizer()
    out = reversal_probe(model, tok, n_facts=10, seed=0)
    assert set(out) == {"forward_ppl", "backward_ppl", "ratio", "gap"}
    assert all(math.isfinite(v) and v > 0 for k, v in out.items() if k != "gap")
    assert out["ratio"] == pytest.approx(out["forward_ppl"] / out["backward_ppl"])
    assert out["gap"] == pytest.approx(out["backward_ppl"] - out["forward_ppl"])
    assert reversal_probe(model, tok, n_facts=10, seed=0) == out
    assert reversal_probe(model, tok, n_facts=10, seed=1) != out
    # Autoregressive with the exact KV cache: the same numbers.
    cached = reversal_probe(model, tok, n_facts=2, seed=0, cache="kv")
    parallel = reversal_probe(model, tok, n_facts=2, seed=0)
    for key in ("forward_ppl", "backward_ppl", "ratio"):
        assert cached[key] == pytest.approx(parallel[key], rel=1e-4)


def test_torchmetrics_perplexity_matches_exp_mean_ce_but_underflows():
    # Why LMModule keeps exp(mean per-token CE): torchmetrics' Perplexity is equal on ordinary logits, but it takes
    # softmax then log, so a target probability below fp32's range gives inf where cross_entropy stays finite.
    import torch.nn.functional as F
    from torchmetrics.text import Perplexity

    logits, targets = torch.randn(2, 16, 50) * 3, torch.randint(0, 50, (2, 16))
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    metric = Perplexity()
    metric.update(logits, targets)
    torch.testing.assert_close(metric.compute(), ce.mean().exp(), rtol=1e-5, atol=0)
    logits[0, 0, targets[0, 0]] = -200.0  # p(target) ~ e^-200: 0 in fp32
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    metric = Perplexity()
    metric.update(logits, targets)
    assert torch.isinf(metric.compute()) and torch.isfinite(ce.mean().exp())
