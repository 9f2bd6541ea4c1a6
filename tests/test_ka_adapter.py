"""KA cache + Adapter ("plan 1"): adapter shape, aux loss, the KA cache recurrence, and evaluation decoding."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from helpers import random_ids as ids
from helpers import randomized as _randomized
from test_train import text_file as text_file  # a fixture
from torch import Tensor

import kvcompress.methods  # noqa: F401  (registers attentions)
from kvcompress.evaluation.metrics import autoregressive_token_losses, token_losses
from kvcompress.methods.ka import KACache
from kvcompress.methods.ka_adapter import KAAdapter, KAAdapterAttention, unrolled_token_losses
from kvcompress.models import GPTNeoX, ModelConfig
from kvcompress.models.gpt_neox import apply_rotary

randomized = partial(_randomized, dtype=torch.float64)


def tiny(**kw) -> ModelConfig:
    return ModelConfig.from_name("tiny", **kw)


def test_adapter_parameter_counts() -> None:
    model = GPTNeoX(ModelConfig.from_name("pythia-70m", vocab_size=512, attention="ka_adapter"))
    n = sum(p.numel() for name, p in model.named_parameters() if ".ka_adapter." in name)
    assert n == 50_688  # 6 * (128 + 4160 + 4160)
    assert sum(p.numel() for p in KAAdapter(64, bottleneck=32).parameters()) == 128 + (64 * 32 + 32) + (32 * 64 + 64)
    base = GPTNeoX(ModelConfig.from_name("pythia-70m", vocab_size=512))
    assert model.num_parameters() == base.num_parameters() + 50_688


def test_invalid_target() -> None:
    with pytest.raises(ValueError, match="target"):
        GPTNeoX(tiny(attention="ka_adapter", attention_kwargs={"target": "prev"}))


@pytest.mark.parametrize("target", ["next", "same"])
def test_aux_adapter_loss_matches_hand_computation(target: str) -> None:
    torch.manual_seed(0)
    cfg = tiny(attention="ka_adapter", attention_kwargs={"target": target})
    model = randomized(GPTNeoX(cfg), std=0.1)
    attn: KAAdapterAttention = model.layers[0].attention
    B, T, nh, hs = 2, 7, cfg.n_head, cfg.head_size
    x = torch.randn(B, T, cfg.n_embd, dtype=torch.float64)
    rope = model.rotary(torch.arange(T))

    aux: dict[str, list[Tensor]] = {}
    out = attn(x, rope, None, aux)
    assert list(aux) == ["adapter"] and len(aux["adapter"]) == 1

    # By hand: per-head Q, K, V, causal softmax, A = P V, then the MSE of the chosen alignment.
    qkv = (x @ attn.query_key_value.weight.T + attn.query_key_value.bias).view(B, T, nh, 3 * hs).transpose(1, 2)
    q, k, v = qkv[..., :hs], qkv[..., hs : 2 * hs], qkv[..., 2 * hs :]
    cos, sin = rope
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hs)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    a = scores.softmax(-1) @ v
    pred, tgt = (attn.ka_adapter(a[:, :, :-1]), v[:, :, 1:]) if target == "next" else (attn.ka_adapter(a), v)
    torch.testing.assert_close(aux["adapter"][0], ((pred - tgt) ** 2).mean())
    # The uncached forward is plain attention: the adapter does not touch it.
    torch.testing.assert_close(out, attn.dense(a.transpose(1, 2).reshape(B, T, -1)))

    # Whole model: one scalar per layer, and it backpropagates into the adapters.
    aux = {}
    model(ids(2, 9), aux=aux)
    assert len(aux["adapter"]) == cfg.n_layer and all(t.ndim == 0 for t in aux["adapter"])
    torch.stack(aux["adapter"]).mean().backward()
    assert all(layer.attention.ka_adapter.down.weight.grad.abs().sum() > 0 for layer in model.layers)


def test_next_and_same_targets_differ() -> None:
    model = randomized(GPTNeoX(tiny(attention="ka_adapter")), std=0.1)
    x = ids(2, 9)
    aux_next: dict[str, list[Tensor]] = {}
    model(x, aux=aux_next)
    for layer in model.layers:
        layer.attention.target = "same"
    aux_same: dict[str, list[Tensor]] = {}
    model(x, aux=aux_same)
    assert not torch.allclose(aux_next["adapter"][0], aux_same["adapter"][0])


def manual_ka_decode(model: GPTNeoX, input_ids: Tensor, use_adapter: bool) -> Tensor:
    """Logits (B, T, V) of decoding with the KA cache, written out: the past values are the stored
    (adapted) attention outputs, the new token's own value is its V."""
    cfg = model.cfg
    B, T = input_ids.shape
    nh, hs, C = cfg.n_head, cfg.head_size, cfg.n_embd
    keys: list[list[Tensor]] = [[] for _ in model.layers]
    stored: list[list[Tensor]] = [[] for _ in model.layers]
    logits = []
    for t in range(T):
        x = model.embed_in(input_ids[:, t : t + 1])  # (B, 1, C)
        cos, sin = model.rotary(torch.tensor([t]))
        for i, block in enumerate(model.layers):
            attn = block.attention
            qkv = attn.query_key_value(block.input_layernorm(x)).view(B, 1, nh, 3 * hs).transpose(1, 2)
            q, k, v = qkv[..., :hs], qkv[..., hs : 2 * hs], qkv[..., 2 * hs :]
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            keys[i].append(k)
            values = torch.cat([*stored[i], v], dim=2)  # [V'(A_0..A_{t-1}), V_t]
            w = (q @ torch.cat(keys[i], dim=2).transpose(-1, -2) / math.sqrt(hs)).softmax(-1)
            a = w @ values  # (B, nh, 1, hs)
            stored[i].append(attn.ka_adapter(a) if use_adapter else a)
            attn_out = attn.dense(a.transpose(1, 2).reshape(B, 1, C))
            x = x + attn_out + block.mlp(block.post_attention_layernorm(x))  # parallel residual
        logits.append(model.embed_out(model.final_layer_norm(x))[:, 0])
    return torch.stack(logits, dim=1)


def cached_logits(model: GPTNeoX, input_ids: Tensor, kind: str) -> Tensor:
    caches = model.build_caches(input_ids.shape[0], input_ids.shape[1], kind=kind)
    with torch.no_grad():
        return torch.cat([model(input_ids[:, t : t + 1], caches) for t in range(input_ids.shape[1])], dim=1)


def test_ka_cache_without_adapter_is_lossy_and_matches_recurrence() -> None:
    model = randomized(GPTNeoX(tiny()), std=0.2)  # standard attention: no adapter, V' = A
    x = ids(2, 6)
    caches = model.build_caches(2, 6, kind="ka")
    assert all(isinstance(c, KACache) and c.adapter is None for c in caches)
    ka = cached_logits(model, x, "ka")
    with torch.no_grad():
        torch.testing.assert_close(ka, manual_ka_decode(model, x, use_adapter=False))
        full = model(x)
    kv = cached_logits(model, x, "kv")
    torch.testing.assert_close(kv, full)  # the KV cache is exact
    torch.testing.assert_close(ka[:, 0], full[:, 0])  # nothing cached yet at the first token
    assert (ka[:, 2:] - full[:, 2:]).abs().max() > 1e-2  # lossy afterwards
    losses_ka = autoregressive_token_losses(model, x, cache="ka")
    losses_kv = autoregressive_token_losses(model, x, cache="kv")
    assert not torch.allclose(losses_ka, losses_kv)
    ce = F.cross_entropy(ka[:, :-1].transpose(1, 2), x[:, 1:], reduction="none")
    torch.testing.assert_close(losses_ka, ce)


def test_ka_cache_uses_the_adapter() -> None:
    model = randomized(GPTNeoX(tiny(attention="ka_adapter")), std=0.2)
    caches = model.build_caches(1, 4, kind="ka")
    assert all(c.adapter is layer.attention.ka_adapter for c, layer in zip(caches, model.layers))
    x = ids(2, 6, seed=1)
    with torch.no_grad():
        ka = cached_logits(model, x, "ka")
        torch.testing.assert_close(ka, manual_ka_decode(model, x, use_adapter=True))
        assert not torch.allclose(ka, manual_ka_decode(model, x, use_adapter=False))


@pytest.mark.parametrize("attention", ["standard", "ka_adapter"])
def test_autoregressive_losses_decode_one_token_at_a_time(attention: str) -> None:
    torch.manual_seed(0)
    model = GPTNeoX(tiny(attention=attention)).eval()
    x = ids(3, 12, seed=2)
    shapes = []
    forward = model.forward

    def recording_forward(input_ids, *args, **kwargs):
        shapes.append(tuple(input_ids.shape))
        return forward(input_ids, *args, **kwargs)

    model.forward = recording_forward
    auto = autoregressive_token_losses(model, x, cache="kv")
    assert shapes == [(3, 1)] * 11
    shapes.clear()
    parallel = token_losses(model, x)
    assert shapes == [(3, 11)]
    assert auto.shape == parallel.shape == (3, 11)
    torch.testing.assert_close(auto, parallel, atol=1e-5, rtol=1e-5)


def test_standard_weights_load_with_only_adapter_keys_missing() -> None:
    torch.manual_seed(0)
    base = GPTNeoX(tiny()).eval()
    model = GPTNeoX(tiny(attention="ka_adapter", attention_kwargs={"bottleneck": 16})).eval()
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert unexpected == []
    assert missing and all(".attention.ka_adapter." in k for k in missing)
    assert len(missing) == 6 * model.cfg.n_layer  # norm, up, down: weight + bias each
    x = ids(2, 10)
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x))


# --- the adapter variants (issue 21): depth, and the unrolled loss trained the way the adapter decodes -------------


def test_adapter_depth_keeps_todays_names_at_one_layer_and_adds_hidden_layers() -> None:
    one = KAAdapter(16, bottleneck=8)
    assert set(one.state_dict()) == {"norm.weight", "norm.bias", "up.weight", "up.bias", "down.weight", "down.bias"}
    three = KAAdapter(16, bottleneck=8, layers=3)
    extra = sum(p.numel() for p in three.parameters()) - sum(p.numel() for p in one.parameters())
    assert extra == 2 * (8 * 8 + 8)
    model = GPTNeoX(tiny(attention="ka_adapter", attention_kwargs={"bottleneck": 24, "layers": 2}))
    assert (
        model.layers[0].attention.ka_adapter.up.out_features == 24
        and len(model.layers[1].attention.ka_adapter.hidden) == 1
    )
    with pytest.raises(ValueError, match="ka_adapter layers must be an integer >= 1"):
        KAAdapter(16, layers=0)


@pytest.mark.parametrize("overrides", [{}, {"n_kv_head": 2}], ids=["mha", "gqa2"])
@pytest.mark.parametrize("layers", [1, 2])
def test_unrolled_loss_equals_the_autoregressive_ka_cache_loss(overrides, layers) -> None:
    cfg = tiny(attention="ka_adapter", attention_kwargs={"layers": layers}, **overrides)
    model = randomized(GPTNeoX(cfg), std=0.15)
    x = ids(2, 11, seed=4)
    with torch.no_grad():
        expected = autoregressive_token_losses(model, x, cache="ka")  # (B, T - 1)
        plain = autoregressive_token_losses(model, x, cache="kv")
    unrolled = unrolled_token_losses(model, x)
    torch.testing.assert_close(unrolled, expected, atol=1e-10, rtol=0)
    assert (expected - plain).abs().max() > 1e-3  # the KA cache really differs from exact decoding here
    torch.testing.assert_close(unrolled_token_losses(model, x, tokens=6), expected[:, :5], atol=1e-10, rtol=0)
    torch.testing.assert_close(unrolled_token_losses(model, x, chunk=3), expected, atol=1e-10, rtol=0)


def test_unrolled_aux_loss_is_computed_only_when_asked_and_trains_the_adapter() -> None:
    model = randomized(GPTNeoX(tiny(attention="ka_adapter")), std=0.15)
    x = ids(2, 9, seed=5)
    aux: dict[str, list[Tensor]] = {}
    model(x, aux=aux)
    assert set(aux) == {"adapter"}
    aux = {"unrolled": []}
    model(x, aux=aux)
    (loss,) = aux["unrolled"]
    with torch.no_grad():
        expected = autoregressive_token_losses(model, x, cache="ka").mean()  # x are the forward's inputs
    torch.testing.assert_close(loss, expected, atol=1e-10, rtol=0)
    loss.backward()
    adapter = model.layers[0].attention.ka_adapter
    assert adapter.up.weight.grad is not None and adapter.up.weight.grad.abs().sum() > 0
    for chunk in (None, 2):  # truncating the backpropagation keeps the value, changes the gradient
        model.zero_grad()
        unrolled_token_losses(model, x, chunk=chunk).mean().backward()
        grad = adapter.down.weight.grad.clone()
        if chunk is None:
            full = grad
    assert not torch.allclose(grad, full)


def test_the_unrolled_phases_pass_the_checks_before_training(tmp_path, text_file) -> None:
    """The monitor check runs each stage's losses on a tiny probe: the unrolled loss must fit in it (it once failed
    here on 1 input token, so every unrolled run stopped before training)."""
    from test_train import smoke

    from kvcompress.run import prepare

    prepare(smoke(tmp_path, text_file, "attention=ka_adapter", "phase=ka_adapter_unrolled"))
    unrolled = ("phase.stages.adapter.losses.adapter=0", "++phase.stages.adapter.losses.unrolled=1")
    prepare(smoke(tmp_path, text_file, "attention=ka_adapter", "phase=ka_adapter_only", *unrolled))


def test_the_unrolled_loss_needs_two_tokens() -> None:
    model = GPTNeoX(tiny(attention="ka_adapter")).eval()
    with pytest.raises(ValueError, match="at least 2 tokens"):
        unrolled_token_losses(model, ids(1, 1, seed=0))


@pytest.mark.slow
def test_unrolled_phase_smoke_run_trains_the_adapter_on_the_unrolled_loss(tmp_path, text_file) -> None:
    from test_train import smoke, stage

    from kvcompress.run import train

    overrides = ("attention=ka_adapter", "phase=ka_adapter_unrolled", "++model.attention_kwargs.unroll_tokens=12")
    metrics = train(smoke(tmp_path, text_file, *overrides))
    adapter = stage(metrics, "adapter")
    assert math.isfinite(adapter["val_unrolled"]) and math.isfinite(adapter["val_ar_ppl"])
    assert adapter["trainable_params"] == 2 * (32 + 2 * 16 * 64 + 64 + 16)
