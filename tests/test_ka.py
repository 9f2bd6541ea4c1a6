"""KA-Attention: the parallel solve equals the token recurrence, the KA cache equals the uncached model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from kvcompress.methods.ka import KAAttention, KACache, ka_attention, ka_attention_autograd, ka_attention_reference
from kvcompress.models import DecodeState, GPTNeoX, ModelConfig
from kvcompress.models.caches import eager_step

SHAPES = [(2, 3, 1, 8), (2, 3, 2, 8), (2, 3, 5, 16), (2, 3, 37, 8), (1, 2, 64, 4)]


def _qkv(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Scale ~1 on q/k keeps P far from uniform, so the recurrence matters.
    return [torch.randn(shape, generator=g, dtype=dtype).requires_grad_() for _ in range(3)]


def _out_and_grads(fn, q: Tensor, k: Tensor, v: Tensor, grad: Tensor) -> list[Tensor]:
    out = fn(q, k, v)
    return [out, *torch.autograd.grad(out, (q, k, v), grad)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fn", [ka_attention, ka_attention_autograd])
def test_parallel_matches_loop_fp64(shape, fn) -> None:
    q, k, v = _qkv(shape, torch.float64)
    grad = torch.randn(shape, dtype=torch.float64)
    got = _out_and_grads(fn, q, k, v, grad)
    ref = _out_and_grads(ka_attention_reference, q, k, v, grad)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref, strict=True):
        assert (a - b).abs().max().item() < 1e-10, name


@pytest.mark.parametrize("shape", SHAPES[1:4])
def test_parallel_matches_loop_fp32(shape) -> None:
    q, k, v = _qkv(shape, torch.float32, seed=1)
    grad = torch.randn(shape)
    got = _out_and_grads(ka_attention, q, k, v, grad)
    ref = _out_and_grads(
        ka_attention_reference, *(t.detach().double().requires_grad_() for t in (q, k, v)), grad.double()
    )
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref, strict=True):
        assert a.dtype == torch.float32
        rel = (a.double() - b).norm() / b.norm()
        assert rel < 1e-5, (name, rel.item())


def test_half_inputs_computed_in_fp32() -> None:
    q, k, v = _qkv((2, 3, 9, 8), torch.float64, seed=2)
    out = ka_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert out.dtype == torch.bfloat16
    ref = ka_attention_reference(*(t.detach().bfloat16().double() for t in (q, k, v)))
    assert (out.double() - ref).abs().max() < 0.05


def test_gradcheck() -> None:
    q, k, v = _qkv((1, 2, 6, 4), torch.float64, seed=3)
    assert torch.autograd.gradcheck(ka_attention, (q, k, v), fast_mode=True)


def test_differs_from_standard_attention() -> None:
    q, k, v = _qkv((2, 3, 8, 8), torch.float64, seed=4)
    ka, sdpa = ka_attention(q, k, v), F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.allclose(ka[:, :, :1], sdpa[:, :, :1])  # position 0: A[0] = V[0] in both
    assert (ka[:, :, 1:] - sdpa[:, :, 1:]).abs().max() > 1e-2  # from position 1 on, KA mixes past outputs


def test_recurrence_by_hand() -> None:
    # T = 2, one head: A[0] = V[0]; A[1] = P[1,0] A[0] + P[1,1] V[1].
    q, k, v = (t.detach() for t in _qkv((1, 1, 2, 4), torch.float64, seed=5))
    p1 = torch.softmax(q[0, 0, 1] @ k[0, 0].T / 2.0, dim=-1)  # sqrt(hs) = 2
    expected = torch.stack([v[0, 0, 0], p1[0] * v[0, 0, 0] + p1[1] * v[0, 0, 1]])
    assert torch.allclose(ka_attention(q, k, v)[0, 0], expected, atol=1e-12)


# ---- the KA cache --------------------------------------------------------------------------------


def _state(batch_size: int, max_len: int) -> DecodeState:
    zeros = torch.zeros(batch_size, dtype=torch.long)
    return DecodeState(slot=torch.zeros(1, dtype=torch.long), offset=zeros, max_len=max_len)


def _filled_caches(n_past: int, n_new: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Prefill n_past tokens token by token, then n_new more: once in parallel, once by the loop."""
    B, nh, hs = 2, 3, 8
    q, k, v = (t.detach() for t in _qkv((B, nh, n_past + n_new, hs), torch.float64, seed))
    outs = []
    for parallel in (True, False):
        cache, state = KACache(B, 64, nh, hs, adapter=None, dtype=torch.float64), _state(B, 64)
        if n_past:
            cache.attend_loop(q[:, :, :n_past], k[:, :, :n_past], v[:, :, :n_past], eager_step(state, n_past))
        new = (q[:, :, n_past:], k[:, :, n_past:], v[:, :, n_past:], eager_step(state, n_new))
        out = cache.attend_parallel(*new) if parallel else cache.attend_loop(*new)
        assert state.length == n_past + n_new
        outs.append((out, cache.buffers["a"][:, :, : state.length].clone()))
    (out_p, a_p), (out_l, a_l) = outs
    assert (out_p - out_l).abs().max() < 1e-10
    assert (a_p - a_l).abs().max() < 1e-10
    return out_p, ka_attention(q, k, v)[:, :, n_past:]


@pytest.mark.parametrize(("n_past", "n_new"), [(0, 7), (5, 9), (11, 2)])
def test_cache_parallel_prefill_matches_loop(n_past: int, n_new: int) -> None:
    out, uncached = _filled_caches(n_past, n_new)
    assert (out - uncached).abs().max() < 1e-10


def test_cache_dispatch() -> None:
    B, nh, hs = 1, 2, 4
    cache = KACache(B, 8, nh, hs, adapter=lambda a: 2 * a, dtype=torch.float64)
    q, k, v = (t.detach() for t in _qkv((B, nh, 3, hs), torch.float64))
    state = _state(B, 8)
    with pytest.raises(ValueError, match="adapter"):
        cache.attend_parallel(q, k, v, eager_step(state, 3))
    state.reset()
    cache.attend(q, k, v, eager_step(state, 3))  # with an adapter, attend takes the token loop
    assert state.length == 3


# ---- the model -----------------------------------------------------------------------------------


def _ka_model(seed: int = 0) -> GPTNeoX:
    torch.manual_seed(seed)
    model = GPTNeoX(ModelConfig.from_name("tiny", attention="ka")).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)  # large weights: peaked attention, KA far from standard
    return model


def test_model_uses_ka() -> None:
    model = _ka_model()
    assert all(isinstance(layer.attention, KAAttention) for layer in model.layers)
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    std = GPTNeoX(model.cfg.with_(attention="standard")).double()
    std.load_state_dict(model.state_dict())
    assert (model(ids) - std(ids)).abs().max() > 1e-3  # same weights, different attention


def test_kv_cache_rejected() -> None:
    model = _ka_model()
    assert isinstance(model.build_caches(1, 8)[0], KACache)
    with pytest.raises(ValueError, match="cannot serve attention 'ka'"):
        model.build_caches(1, 8, kind="kv")


def test_model_gradients_match_autograd_solve(monkeypatch) -> None:
    # The hand-written backward, fed the model's (non-contiguous) upstream gradients, matches autograd's.
    model = _ka_model(seed=2).train()
    ids = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(3))
    grads = []
    for attend in (None, lambda self, q, k, v, aux=None: ka_attention_autograd(q, k, v)):
        if attend is not None:
            monkeypatch.setattr(KAAttention, "attend", attend)
        model.zero_grad()
        model(ids).logsumexp(-1).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        assert (a - b).abs().max() < 1e-10


def test_autocast_keeps_fp32() -> None:
    q, k, v = _qkv((2, 3, 9, 8), torch.float32, seed=6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ka_attention(q, k, v)
    ref = ka_attention_reference(*(t.detach().double() for t in (q, k, v)))
    assert out.dtype == torch.float32
    assert (out.double() - ref).abs().max() < 1e-5
    out.sum().backward()
    assert q.grad.dtype == torch.float32
