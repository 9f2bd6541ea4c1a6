"""Grouped K/V heads (GQA / MQA): the multi-head setting is today's model exactly, mean-pooled conversion, HF refusal.
Cached decoding, chunked prefill and bytes of every GQA combination are rows of the method table (tests/methods.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import random_ids, randomized
from test_train import smoke, stage
from test_train import text_file as text_file  # a fixture
from torch import Tensor

import kvcompress.methods  # noqa: F401  (registers attentions and caches)
from kvcompress.evaluation.windows import load_windows
from kvcompress.methods.ka import ka_attention, ka_attention_grouped, ka_attention_reference
from kvcompress.models import GPTNeoX, ModelConfig, build_model, pool_kv_heads
from kvcompress.models.gpt_neox import Attention, apply_rotary
from kvcompress.models.gqa import fit_kv_heads, split_qkv_rows
from kvcompress.models.hf import config_to_hf, to_hf_model
from kvcompress.models.weights import load_weights, save_weights
from kvcompress.records import uptrain_steps
from kvcompress.run import train

TINY = ModelConfig.from_name("tiny")


def pre_gqa_split_qkv(self: Attention, x: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """`Attention.split_qkv` as it was before grouped heads existed (per-head interleaved [q, k, v])."""
    B, T, _ = x.shape
    qkv = self.query_key_value(x).view(B, T, self.n_head, 3 * self.head_size).transpose(1, 2)
    q, k, v = qkv.chunk(3, dim=-1)
    cos, sin = rope
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v


def test_n_kv_head_equal_to_n_head_is_todays_model_exactly(monkeypatch) -> None:
    default = randomized(GPTNeoX(TINY), dtype=torch.float64)
    same = GPTNeoX(TINY.with_(n_kv_head=TINY.n_head)).double().eval()
    same.load_state_dict(default.state_dict(), strict=True)
    shapes = {k: tuple(v.shape) for k, v in default.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in same.state_dict().items()}
    assert shapes["layers.0.attention.query_key_value.weight"] == (3 * TINY.n_embd, TINY.n_embd)  # today's shape
    ids = random_ids(2, 20, seed=3)
    with torch.no_grad():
        logits = same(ids)
        assert torch.equal(logits, default(ids))
        monkeypatch.setattr(Attention, "split_qkv", pre_gqa_split_qkv)
        assert torch.equal(logits, same(ids))  # bit for bit with the pre-GQA layout


def test_grouped_layout_is_q_then_k_then_v_blocks() -> None:
    cfg = TINY.with_(n_kv_head=2)
    model = randomized(GPTNeoX(cfg), dtype=torch.float64)
    attn = model.layers[0].attention
    assert attn.query_key_value.weight.shape == ((4 + 2 * 2) * 16, 64)
    x = torch.randn(1, 5, 64, dtype=torch.float64)
    zero_rope = (torch.ones(5, 4, dtype=torch.float64), torch.zeros(5, 4, dtype=torch.float64))  # identity rotary
    q, k, v = attn.split_qkv(x, zero_rope)
    out = attn.query_key_value(x)[0]  # (5, 128)
    assert torch.equal(q[0, 1], out[:, 16:32]) and torch.equal(k[0, 1], out[:, 64 + 16 : 64 + 32])
    assert torch.equal(v[0, 0], out[:, 96:112])


@pytest.mark.parametrize("bad", [3, 0, 5, True, 2.0])
def test_bad_n_kv_head_is_one_line(bad) -> None:
    with pytest.raises(ValueError, match=r"n_kv_head=.* must be null or a divisor of n_head=4"):
        ModelConfig.from_name("tiny", n_kv_head=bad)


@pytest.mark.parametrize("g", [2, 1])
def test_grouped_ka_attention_solves_the_group_recurrence(g: int) -> None:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 9, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, g, 9, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    torch.testing.assert_close(ka_attention_grouped(q, k, v), ka_attention_reference(q, k, v), atol=1e-12, rtol=0)
    k4, v4 = k.repeat_interleave(4 // g, 1), v.repeat_interleave(4 // g, 1)
    assert not torch.allclose(ka_attention_grouped(q, k, v), ka_attention(q, k4, v4), atol=1e-3)  # not per head
    q1 = q[:, :g]  # one query head per group: the multi-head KA-Attention
    torch.testing.assert_close(ka_attention_grouped(q1, k, v), ka_attention(q1, k, v), atol=1e-12, rtol=0)


def test_grouped_ka_attention_gradients_match_the_reference() -> None:
    gen = torch.Generator().manual_seed(1)
    leaves = [torch.randn(1, n, 6, 8, generator=gen, dtype=torch.float64, requires_grad=True) for n in (4, 2, 2)]
    grads = [
        torch.autograd.grad(fn(*leaves).square().sum(), leaves) for fn in (ka_attention_grouped, ka_attention_reference)
    ]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_pooling_with_groups_of_one_is_the_identity() -> None:
    model = randomized(GPTNeoX(TINY.with_(n_kv_head=2)))
    state = model.state_dict()
    pooled = pool_kv_heads(state, model.cfg, model.cfg)
    assert pooled.keys() == state.keys() and all(torch.equal(pooled[k], state[k]) for k in state)


@pytest.mark.parametrize(("g_from", "g_to"), [(4, 2), (4, 1), (2, 1)])
def test_pooling_averages_each_groups_k_and_v_and_keeps_q(g_from: int, g_to: int) -> None:
    cfg_from, cfg_to = TINY.with_(n_kv_head=g_from), TINY.with_(n_kv_head=g_to)
    state = randomized(GPTNeoX(cfg_from)).state_dict()
    pooled = pool_kv_heads(state, cfg_from, cfg_to)
    GPTNeoX(cfg_to).load_state_dict(pooled, strict=True)  # the pooled shapes fit
    for suffix in ("weight", "bias"):
        key = f"layers.1.attention.query_key_value.{suffix}"
        q0, k0, v0 = split_qkv_rows(state[key], 4, g_from, 16)
        q1, k1, v1 = split_qkv_rows(pooled[key], 4, g_to, 16)
        r = g_from // g_to
        assert torch.equal(q1, q0)
        torch.testing.assert_close(k1[-1], k0[-r:].mean(0), rtol=0, atol=1e-7)
        torch.testing.assert_close(v1[0], v0[:r].mean(0), rtol=0, atol=1e-7)
    assert torch.equal(pooled["layers.0.mlp.dense_h_to_4h.weight"], state["layers.0.mlp.dense_h_to_4h.weight"])


@pytest.mark.parametrize("g", [2, 1])
def test_pooled_model_equals_grouped_attention_over_the_mean_of_k_and_v(g: int) -> None:
    """Pooling the projections = attending over each group's mean K and mean V (rotary is linear): checked on the
    layer's K/V against the multi-head model's, so the conversion wires the groups to the right query heads."""
    mha = randomized(GPTNeoX(TINY), dtype=torch.float64)
    cfg = TINY.with_(n_kv_head=g)
    gqa = GPTNeoX(cfg).double().eval()
    gqa.load_state_dict(pool_kv_heads(mha.state_dict(), TINY, cfg))
    x = torch.randn(2, 7, 64, dtype=torch.float64)
    rope = mha.rope(torch.arange(7), x)
    _, k, v = mha.layers[0].attention.split_qkv(x, rope)
    q_g, k_g, v_g = gqa.layers[0].attention.split_qkv(x, rope)
    torch.testing.assert_close(k_g, k.view(2, g, 4 // g, 7, 16).mean(2), atol=1e-12, rtol=0)
    torch.testing.assert_close(v_g, v.view(2, g, 4 // g, 7, 16).mean(2), atol=1e-12, rtol=0)


def test_build_model_pools_a_multi_head_checkpoint_and_a_run_folder(tmp_path) -> None:
    import json

    mha = randomized(GPTNeoX(TINY))
    path = tmp_path / "weights.safetensors"
    save_weights(mha.state_dict(), path)
    expected = pool_kv_heads(mha.state_dict(), TINY, TINY.with_(n_kv_head=2))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text(json.dumps({"stages": [{"name": "lm", "weights": str(path)}]}))
    for init in (path, tmp_path / "run"):
        model = build_model("tiny", init_from=str(init), overrides={"n_kv_head": 2})
        assert model.cfg.kv_heads == 2
        assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="n_kv_head=4 must divide the checkpoint's 2 K/V heads"):
        pool_kv_heads(expected, TINY.with_(n_kv_head=2), TINY)
    assert fit_kv_heads(expected, TINY) is expected  # fewer heads than the model: left for the load to refuse


def test_hf_export_refuses_grouped_heads() -> None:
    model = GPTNeoX(TINY.with_(n_kv_head=2))
    for call in (lambda: config_to_hf(model.cfg), lambda: to_hf_model(model)):
        with pytest.raises(ValueError, match=r"n_kv_head=2 < n_head=4: Hugging Face GPT-NeoX has no grouped K/V heads"):
            call()
    assert config_to_hf(TINY.with_(n_kv_head=4)).num_attention_heads == 4  # n_kv_head = n_head exports


def test_gqa_uptrain_phase_pools_a_run_records_its_start_and_trains_its_share(tmp_path, text_file) -> None:
    """phase=gqa_uptrain over a trained run: with uptrain_share=0 the result is the mean-pooled model exactly (and
    its start PPL is its final PPL); a share is round(share x the run's recorded steps) (5% by default)."""
    base = train(smoke(tmp_path, text_file))
    base_weights = load_weights(stage(base, "lm")["weights"])
    gqa = ("phase=gqa_uptrain", f"model.init_from={tmp_path / 'run'}", "++model.overrides.n_kv_head=2")
    zero = train(smoke(tmp_path / "zero", text_file, *gqa, "phase.uptrain_share=0"))
    record = stage(zero, "gqa")
    # Per-window losses of the pooled start (the stage folder) and of the result (the run folder): the same.
    start = load_windows(Path(record["weights"]).parent / "windows_start.safetensors")
    end = load_windows(tmp_path / "zero" / "run")
    assert np.array_equal(start["ids"], end["ids"]) and start["val"] == pytest.approx(end["val"], abs=1e-9)
    cfg = ModelConfig.from_name("pythia-70m", n_layer=2, n_embd=64, n_head=4, intermediate_size=128)
    pooled = pool_kv_heads(base_weights, cfg, cfg.with_(n_kv_head=2))
    weights = load_weights(record["weights"])
    assert record["steps"] == 0 and weights.keys() == pooled.keys()
    assert all(torch.equal(weights[k], pooled[k]) for k in pooled)
    assert record["start_val_ppl"] == record["val_ppl"]
    assert uptrain_steps(str(tmp_path / "run"), 0.05) == max(1, round(0.05 * stage(base, "lm")["steps"]))
    assert uptrain_steps(stage(base, "lm")["weights"], 0.5) == round(0.5 * stage(base, "lm")["steps"])
    # The budget itself (Stage.max_steps) is tested with the phase runner (tests/test_phases.py).


def test_gqa_uptrain_without_a_trained_run_is_one_line(tmp_path, text_file) -> None:
    with pytest.raises(ValueError, match="this phase needs model.init_from"):
        train(smoke(tmp_path, text_file, "phase=gqa_uptrain"))


def test_a_hugging_face_model_loads_mean_pooled() -> None:
    from test_model import random_hf

    from kvcompress.models.hf import from_hf_model

    hf = random_hf(0, True)
    mha = from_hf_model(hf)
    gqa = from_hf_model(hf, n_kv_head=2)
    expected = pool_kv_heads(mha.state_dict(), mha.cfg, mha.cfg.with_(n_kv_head=2))
    assert gqa.cfg.kv_heads == 2 and all(torch.equal(v, expected[k]) for k, v in gqa.state_dict().items())
