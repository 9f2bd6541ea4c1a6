"""The eviction caches (streaming_llm, h2o, snapkv, tova, knorm): a budget >= the context is the `kv` cache, each
rule keeps the slots it names on a hand-built attention pattern (token by token and from one prefill), and bad
budgets fail in one line. The shared battery (lossy bound, static == eager, compiled == eager, ragged == alone,
bytes == formula) runs over their rows in tests/methods.py."""

from __future__ import annotations

import pytest
import torch
from helpers import random_ids, randomized

import kvcompress.methods  # noqa: F401  (registers the caches)
from kvcompress.evaluation.metrics import autoregressive_token_losses
from kvcompress.models import GPTNeoX, ModelConfig, generate
from kvcompress.models.caches import CACHES, DecodeState, LayerCache, eager_step

KINDS = ["streaming_llm", "h2o", "snapkv", "tova", "knorm"]
HS = 4
A = torch.ones(1, 1, 1, HS, dtype=torch.float64)  # every query; |A|^2 = HS


def tiny_model() -> GPTNeoX:
    return randomized(GPTNeoX(ModelConfig.from_name("tiny")), dtype=torch.float64)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("budget", [1.0, 64], ids=["share-1.0", "slots-64"])
def test_a_budget_at_least_the_context_is_the_kv_cache(kind: str, budget: float | int) -> None:
    model = tiny_model()
    prompt = random_ids(2, 9, seed=1)
    ours = generate(model, prompt, 8, return_logits=True, caches=model.build_caches(2, 17, kind, budget=budget))
    ref = generate(model, prompt, 8, cache="kv", return_logits=True)
    assert torch.equal(ours[0], ref[0])
    torch.testing.assert_close(ours[1], ref[1], atol=1e-10, rtol=0)
    ids = random_ids(2, 12, seed=2)  # token by token, as lossy caches are scored
    torch.testing.assert_close(
        autoregressive_token_losses(model, ids, kind, budget=budget), autoregressive_token_losses(model, ids, "kv")
    )


@pytest.mark.parametrize("kind", KINDS)
def test_a_small_budget_evicts_and_stays_finite(kind: str) -> None:
    model = tiny_model()
    ids = random_ids(2, 16, seed=3)
    lossy = autoregressive_token_losses(model, ids, kind, budget=0.25)
    exact = autoregressive_token_losses(model, ids, "kv")
    assert torch.isfinite(lossy).all()
    assert (lossy - exact)[:, :4].abs().max() < 1e-10  # 4 of 15 slots: the first 4 tokens see everything
    assert (lossy - exact).abs().max() > 1e-3


# --- the rules, on hand-built patterns: one head of 4 dims, every query = A ---------------------------------------


def build(kind: str, max_len: int, **kwargs) -> LayerCache:
    return CACHES[kind].build(_Shape(), 1, max_len, dtype=torch.float64, **kwargs)


class _Shape:
    n_head = n_kv_head = 1
    head_size = HS


def feed(cache: LayerCache, keys: torch.Tensor, prefill: int = 0) -> list[set[int]]:
    """Feed keys (T, HS) (values random, queries A): the first `prefill` at once, then one at a time; returns the
    kept positions after each forward."""
    T = keys.shape[0]
    state = DecodeState(torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), cache.max_len)
    values = torch.randn(T, HS, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    kept, start = [], 0
    for size in [prefill] * bool(prefill) + [1] * (T - prefill):
        step = eager_step(state, size)
        k, v = keys[None, None, start : start + size], values[None, None, start : start + size]
        cache.attend(A.expand(1, 1, size, HS), k, v, step)
        kept.append({int(p) for p in cache.buffers["pos"].flatten() if p >= 0})
        start += size
    return kept


def scaled(c: list[float]) -> torch.Tensor:
    """Key i = c[i] * A: its score from any query is c[i] * HS / sqrt(HS) = 2 c[i]."""
    return torch.tensor(c, dtype=torch.float64)[:, None] * A.view(1, HS)


@pytest.mark.parametrize("prefill", [0, 10], ids=["by-token", "prefill"])
def test_streaming_llm_keeps_the_sinks_and_the_most_recent(prefill: int) -> None:
    cache = build("streaming_llm", 10, budget=5, sinks=2)
    kept = feed(cache, torch.randn(10, HS, dtype=torch.float64), prefill)
    assert kept[-1] == {0, 1, 7, 8, 9}


C = [0.3, -1.0, 2.5, 0.1, 1.7, -0.4, 0.9, 3.0, -2.0, 0.5]  # distinct attractions / norms


@pytest.mark.parametrize("prefill", [0, 10], ids=["by-token", "prefill"])
def test_tova_keeps_what_the_current_query_attends_to_most(prefill: int) -> None:
    kept = feed(build("tova", 10, budget=4), scaled(C), prefill)
    assert kept[-1] == {7, 2, 4, 6}  # the 4 largest c


@pytest.mark.parametrize("prefill", [0, 10], ids=["by-token", "prefill"])
def test_knorm_keeps_the_lowest_key_norms(prefill: int) -> None:
    kept = feed(build("knorm", 10, budget=4), scaled(C), prefill)
    assert kept[-1] == {3, 0, 5, 9}  # the 4 smallest |c|


@pytest.mark.parametrize("prefill", [0, 8], ids=["by-token", "prefill"])
def test_h2o_keeps_the_heavy_hitter_and_the_recent_window(prefill: int) -> None:
    """Key 2 takes all the attention of every later query; keys 0 and 1 got the attention of the first two
    queries (1.5 and 0.5); the rest get ~0. Budget 4 with a window of 1: {0, 1, 2} and the newest."""
    c = [0.0] * 8
    c[2] = 20.0
    kept = feed(build("h2o", 8, budget=4, window=1), scaled(c), prefill)
    assert kept[-1] == {0, 1, 2, 7}
    if not prefill:
        assert all(2 in k for k in kept[2:])


def test_snapkv_keeps_the_votes_of_its_observation_window_then_slides() -> None:
    """Prefill 12 tokens, observation window 2 (positions 10, 11), budget 5: the window plus the 3 most voted
    (keys 3, 5, 7 attract the window's queries); decoding then slides over the window's slots only."""
    c = [0.0] * 14
    c[3], c[5], c[7] = 4.0, 3.0, 5.0
    kept = feed(build("snapkv", 14, budget=5, window=2, kernel_size=1), scaled(c), prefill=12)
    assert kept[0] == {3, 5, 7, 10, 11}
    assert kept[1] == {3, 5, 7, 11, 12} and kept[2] == {3, 5, 7, 12, 13}


def test_snapkv_pooling_keeps_the_neighbours_of_a_voted_token() -> None:
    c = [0.0] * 12
    c[5] = 6.0
    kept = feed(build("snapkv", 12, budget=5, window=2, kernel_size=3, pooling="max"), scaled(c), prefill=12)
    assert kept[0] == {4, 5, 6, 10, 11}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("budget", [0, -1, 1.5, 0.0, True, "half"])
def test_a_bad_budget_fails_in_one_line(kind: str, budget: object) -> None:
    with pytest.raises(ValueError, match=r"budget=.* must be a share of the context in \(0, 1\] or a number"):
        build(kind, 8, budget=budget)


def test_bad_rule_settings_fail_in_one_line() -> None:
    with pytest.raises(ValueError, match="streaming_llm sinks=-1"):
        build("streaming_llm", 8, sinks=-1)
    with pytest.raises(ValueError, match="h2o window=2.0"):
        build("h2o", 8, window=2.0)
    with pytest.raises(ValueError, match="snapkv kernel_size=4"):
        build("snapkv", 8, kernel_size=4)
    with pytest.raises(ValueError, match="snapkv pooling='mean'"):
        build("snapkv", 8, pooling="mean")


@pytest.mark.parametrize("kind", ["streaming_llm", "h2o", "snapkv", "tova", "knorm"])
def test_grouped_kv_heads_are_refused_in_one_line(kind: str) -> None:
    model = GPTNeoX(ModelConfig.from_name("tiny", n_kv_head=2))
    with pytest.raises(ValueError, match=rf"cache '{kind}' does not hold grouped K/V heads \(n_kv_head=2 < n_head=4\)"):
        model.build_caches(1, 8, kind=kind)
