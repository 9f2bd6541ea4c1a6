"""V-DProj: degenerate setting, exact cached decoding, cache size, parameter counts, errors, aux losses."""

from __future__ import annotations

import pytest
import torch
from helpers import randomized

from kvcompress.methods.vdproj import VDProjAttention, VDProjCache, projection_parameters
from kvcompress.models import GPTNeoX, ModelConfig, generate

TINY_C = 64  # tiny: 4 heads of 16, rotary 4 dims per head
TINY_K_WIDTH = 4 * (16 - 4)  # non-rotary K dims of all heads


def tiny(**kwargs) -> ModelConfig:
    return ModelConfig.from_name("tiny", attention="vdproj", attention_kwargs=kwargs)


def vdproj_attentions(model: GPTNeoX) -> list[VDProjAttention]:
    return [layer.attention for layer in model.layers]


# --- degenerate setting reproduces the base model --------------------------------------------------------


# --- cached == uncached ---------------------------------------------------------------------------------

CACHE_SETTINGS = [dict(rank=40), dict(rank=40, compress_k=True, k_rank=20)]


@pytest.mark.parametrize("kwargs", CACHE_SETTINGS, ids=["v", "v+k"])
@pytest.mark.parametrize("chunks", [(5, 20), (20, 5), (1, 24), (12, 13)])
@pytest.mark.parametrize("restore_above", [None, 0, 10**6], ids=["auto", "restore", "absorb"])
def test_chunked_prefill_equals_uncached(kwargs, chunks, restore_above):
    """Prompt fed in two chunks (T > 1 with a non-empty cache), through both the absorbed and the restored path."""
    model = randomized(GPTNeoX(tiny(**kwargs)).double())
    x = torch.randint(0, 512, (3, sum(chunks)), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(x)
        caches = model.build_caches(3, sum(chunks) + 1)
        if restore_above is not None:
            for c in caches:
                c.restore_above = restore_above
        first = model(x[:, : chunks[0]], caches)
        second = model(x[:, chunks[0] :], caches)
        nxt = model(ref[:, -1].argmax(-1)[:, None], caches)  # one decode step after the chunks
        full = model(torch.cat([x, ref[:, -1].argmax(-1)[:, None]], dim=1))
    torch.testing.assert_close(torch.cat([first, second], dim=1), ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(nxt[:, -1], full[:, -1], atol=1e-10, rtol=0)
    assert caches.state.length == sum(chunks) + 1


@pytest.mark.parametrize(
    "rotary_pct, kwargs",
    [(0.0, dict(rank=24, compress_k=True, k_rank=40)), (1.0, dict(rank=24))],
    ids=["no-rotary", "all-rotary"],
)
def test_cached_equals_uncached_rotary_extremes(rotary_pct, kwargs):
    cfg = ModelConfig.from_name("tiny", rotary_pct=rotary_pct, attention="vdproj", attention_kwargs=kwargs)
    model = randomized(GPTNeoX(cfg).double())
    x = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(6))
    t_c, l_c = generate(model, x, 5, return_logits=True)
    t_u, l_u = generate(model, x, 5, use_cache=False, return_logits=True)
    assert torch.equal(t_c, t_u)
    torch.testing.assert_close(l_c, l_u, atol=1e-10, rtol=0)


def test_bf16_cached_decoding_tracks_fp32():
    """Half precision runs through the absorbed path (softmax in fp32) and stays near the fp32 logits."""
    model = randomized(GPTNeoX(tiny(rank=40, compress_k=True, k_rank=20)), std=0.15)
    x = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = model(x)
        half = model.to(torch.bfloat16)
        caches = half.build_caches(2, 20)
        out = torch.cat([half(x[:, :18], caches), half(x[:, 18:19], caches), half(x[:, 19:], caches)], dim=1)
        no_context = half(x[:, 19:], half.build_caches(2, 1)).float()
    assert out.dtype == torch.bfloat16
    atol = 0.03 * ref.abs().max().item()  # bf16 error is ~0.8% of it here; dropping the context is ~25%
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=0)
    assert (no_context[:, -1] - ref[:, -1]).abs().max() > 3 * atol


def test_cache_stores_compressed_values():
    model = randomized(GPTNeoX(tiny(rank=40)).double())
    x = torch.randint(0, 512, (2, 6))
    caches = model.build_caches(2, 6)
    with torch.no_grad():
        model(x, caches)
    attn, cache = model.layers[0].attention, caches[0]
    assert isinstance(cache, VDProjCache) and set(cache.buffers) == {"k", "v_c"}
    assert cache.buffers["v_c"].shape == (2, 6, 40)
    with torch.no_grad():  # V_c is the compressed V of layer 0's input
        _, k, v = attn.split_qkv(model.layers[0].input_layernorm(model.embed_in(x)), model.rotary(torch.arange(6)))
        torch.testing.assert_close(cache.buffers["v_c"], attn.compress_v(v), atol=1e-12, rtol=0)
        torch.testing.assert_close(cache.buffers["k"], k, atol=1e-12, rtol=0)


# --- cache size -----------------------------------------------------------------------------------------


# --- parameters -----------------------------------------------------------------------------------------


def test_projection_parameters_at_pythia_70m_shape():
    """The projections phase 1 trains (the whole model's count is in the method table). The seed report's total,
    72,391,552, is 6,144 (6 x 1,024) lower than 70,426,624 + 1,971,072: its base model differed, not V-DProj."""
    with torch.device("meta"):
        base = GPTNeoX(ModelConfig.from_name("pythia-70m"))
        model = GPTNeoX(ModelConfig.from_name("pythia-70m", attention="vdproj", attention_kwargs=dict(rank=320)))
    assert sum(p.numel() for p in projection_parameters(model)) == 1_971_072
    assert not projection_parameters(base)


# --- errors ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rank=65), r"rank=65 must be in \[1, n_embd=64\]"),
        (dict(rank=0), r"rank=0: give an int width in \[1, 64\]"),
        (dict(rank=32, compress_k=True, k_rank=49), r"k_rank=49 must be in \[1, 48\].*non-rotary"),
        (dict(rank=32, compress_k=True), r"compress_k=True needs k_rank"),
        (dict(rank=32, k_rank=8), r"compress_k=False"),
    ],
)
def test_bad_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GPTNeoX(tiny(**kwargs))


def test_wrong_cache_kind_and_identity_errors():
    model = GPTNeoX(tiny(rank=32))
    with pytest.raises(ValueError, match=r"cache 'kv' cannot serve attention 'vdproj'"):
        model.build_caches(1, 8, kind="kv")
    with pytest.raises(ValueError, match=r"set_identity needs rank == n_embd=64, got rank=32"):
        model.layers[0].attention.set_identity()
    with pytest.raises(ValueError, match=r"cache 'kv' cannot serve attention 'vdproj'"):
        model(torch.zeros(1, 2, dtype=torch.long), GPTNeoX(ModelConfig.from_name("tiny")).build_caches(1, 8))


# --- reconstruction losses ------------------------------------------------------------------------------


def test_recon_aux_losses_and_gradients():
    model = randomized(GPTNeoX(tiny(rank=40, compress_k=True, k_rank=20)))
    x = torch.randint(0, 512, (2, 16))
    aux: dict[str, list[torch.Tensor]] = {}
    model(x, aux=aux)
    assert set(aux) == {"recon", "recon_k"}
    n = model.cfg.n_layer
    assert len(aux["recon"]) == 2 * n and len(aux["recon_k"]) == n  # "recon": V and K terms of every layer
    assert all(any(loss is k for k in aux["recon_k"]) for loss in aux["recon"][1::2])
    assert all(loss.ndim == 0 and loss.item() > 1e-3 for loss in aux["recon"])
    torch.stack(aux["recon"]).mean().backward()  # what the trainer does: "recon" alone trains every projection
    for attn in vdproj_attentions(model):
        for lin in attn.projections():
            assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0
    # V is not detached: the loss also reaches the QKV projection.
    assert model.layers[0].attention.query_key_value.weight.grad.abs().sum() > 0


def test_recon_is_zero_for_identity_and_no_aux_without_compress_k():
    model = randomized(GPTNeoX(tiny(rank=TINY_C)).double())
    for attn in vdproj_attentions(model):
        attn.set_identity()
    aux: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        model(torch.randint(0, 512, (2, 16)), aux=aux)
    assert set(aux) == {"recon"} and len(aux["recon"]) == model.cfg.n_layer
    assert max(loss.item() for loss in aux["recon"]) < 1e-20


def test_rank_as_a_share_of_the_width():
    cfg = ModelConfig.from_name("pythia-70m", vocab_size=512, attention="vdproj")
    attn = VDProjAttention(cfg, 0, rank=0.625, compress_k=True, k_rank=0.5)
    assert attn.rank == 320 and attn.k_rank == 192  # k: half of 8 x (64 - 16) non-rotary dims
    assert VDProjAttention(cfg, 0, rank=1.0).rank == 512  # 1.0 is the whole width (a share), not a width of 1
    assert VDProjAttention(cfg, 0, rank=1).rank == 1
    for bad in (320.0, 1.5, 0.0, -0.25, 0, True, "320"):  # a float is a share in (0, 1]; an int a width >= 1
        with pytest.raises(ValueError, match=r"^model\.attention_kwargs\.rank=.*(share|width)"):
            VDProjAttention(cfg, 0, rank=bad)
    with pytest.raises(ValueError, match=r"^model\.attention_kwargs\.k_rank=2\.0: a float is a share"):
        VDProjAttention(cfg, 0, rank=0.5, compress_k=True, k_rank=2.0)
