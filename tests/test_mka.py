"""PretrainedMKA: parameter counts, plain layers, zero-init identity, cached == uncached, HF loading."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from helpers import random_ids as ids
from helpers import randomized as _randomized

import kvcompress.methods  # noqa: F401  (registers attentions)
from kvcompress.methods.ka import ka_attention_reference
from kvcompress.methods.mka import (
    MKA_PARAM_PATTERN,
    KALayer,
    MKACache,
    freeze_all_but_mka,
)
from kvcompress.models import GPTNeoX, KVCache, ModelConfig, build_model
from kvcompress.models.hf import config_to_hf, from_hf_model, save_pretrained

randomized = partial(_randomized, dtype=torch.float64)


def tiny(**kw) -> ModelConfig:
    return ModelConfig.from_name("tiny", **kw)


def mka_cfg(layers=(-1,), zero_init: bool = True, **kw) -> ModelConfig:
    return tiny(attention="mka", attention_kwargs={"layers": layers, "zero_init": zero_init}, **kw)


def test_trainable_count_at_pythia_70m_shape() -> None:
    model = GPTNeoX(ModelConfig.from_name("pythia-70m", vocab_size=512, attention="mka"))
    assert freeze_all_but_mka(model) == 788_992  # LayerNorm(512) + 3 x Linear(512, 512)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(n.startswith("layers.5.attention.mka.") for n in trainable) and len(trainable) == 8
    assert MKA_PARAM_PATTERN == "*.attention.mka.*"


def test_unlisted_layers_are_plain_and_layers_validated() -> None:
    model = GPTNeoX(mka_cfg(layers=(-1,)))
    plain = GPTNeoX(tiny())
    assert model.layers[0].attention.mka is None
    assert set(model.layers[0].state_dict()) == set(plain.layers[0].state_dict())
    assert isinstance(model.layers[1].attention.mka, KALayer)
    both = GPTNeoX(mka_cfg(layers=[0, 1]))
    assert all(layer.attention.mka is not None for layer in both.layers)
    for bad in [(2,), (-3,), ()]:
        with pytest.raises(ValueError, match="layer"):
            GPTNeoX(mka_cfg(layers=bad))
    caches = model.build_caches(1, 8)
    assert isinstance(caches[0], KVCache) and isinstance(caches[1], MKACache)
    with pytest.raises(ValueError, match="cannot serve"):
        model.build_caches(1, 8, kind="kv")


def test_ka_layer_is_ka_attention_over_the_inputs() -> None:
    torch.manual_seed(0)
    cfg = tiny()
    layer = KALayer(cfg, zero_init=False).double()
    a = torch.randn(2, 7, cfg.n_embd, dtype=torch.float64)
    h = layer.norm(a)
    q, k, v = (layer.heads(p(h)) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
    expected = ka_attention_reference(q, k, v).transpose(1, 2).reshape(2, 7, -1)
    torch.testing.assert_close(layer(a), expected)


def test_zero_init_trains_only_the_ka_layer() -> None:
    """Zero init starts at the base model (the method table's degenerate row) and still gets gradients."""
    torch.manual_seed(0)
    base = GPTNeoX(tiny()).eval()
    model = GPTNeoX(mka_cfg(layers=(0, 1))).eval()
    model.load_state_dict(base.state_dict(), strict=False)
    x = ids(2, 10)
    assert freeze_all_but_mka(model) > 0
    torch.nn.functional.cross_entropy(model(x[:, :-1]).transpose(1, 2), x[:, 1:]).backward()
    assert model.layers[1].attention.mka.v_proj.weight.grad.abs().sum() > 0
    assert base.layers[0].attention.dense.weight.grad is None
    assert model.layers[0].attention.dense.weight.grad is None  # frozen

    # A non-zero KA layer changes the output.
    other = GPTNeoX(mka_cfg(zero_init=False)).eval()
    other.load_state_dict(base.state_dict(), strict=False)
    assert not torch.allclose(other(x), base(x))


def test_loads_from_hugging_face_with_only_mka_params_new() -> None:
    from transformers import GPTNeoXForCausalLM

    torch.manual_seed(0)
    hf = GPTNeoXForCausalLM(config_to_hf(tiny())).eval()
    model = from_hf_model(hf, attention="mka", attention_kwargs={"layers": [-1]}).eval()
    standard = from_hf_model(hf).eval()
    missing, unexpected = model.load_state_dict(standard.state_dict(), strict=False)
    assert unexpected == [] and missing and all(k.startswith("layers.1.attention.mka.") for k in missing)
    x = ids(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, rtol=1e-4, atol=1e-4)  # zero init: the base model
        torch.testing.assert_close(model(x), standard(x))


def test_base_weights_load_from_a_directory_and_fail_clearly_without_one(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as err:
        build_model("tiny", attention="mka", init_from="kvcompress-test/not-a-model")
    assert "kvcompress-test/not-a-model" in str(err.value) and "HF_HUB_OFFLINE" in str(err.value)
    torch.manual_seed(0)
    save_pretrained(GPTNeoX(tiny()), tmp_path / "base")
    model = build_model("tiny", attention="mka", attention_kwargs={"layers": [-1]}, init_from=str(tmp_path / "base"))
    assert freeze_all_but_mka(model) == 2 * 64 + 3 * (64 * 64 + 64)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".attention.mka." in n for n in trainable)
    assert model.layers[0].attention.mka is None and model.layers[1].attention.mka is not None
