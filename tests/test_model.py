"""The plain-PyTorch model: HF parity, cached == uncached decoding, cache byte counts."""

import pytest
import torch
from helpers import assert_cached_equals_uncached
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from kvcompress.models import GPTNeoX, ModelConfig
from kvcompress.models.hf import from_hf_model, from_pretrained, save_pretrained, to_hf_model


def random_hf(seed: int, parallel: bool, rotary_pct: float = 0.25) -> GPTNeoXForCausalLM:
    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        vocab_size=97,
        hidden_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=80,
        rotary_pct=rotary_pct,
        rotary_emb_base=10000,
        max_position_embeddings=64,
        use_parallel_residual=parallel,
        hidden_act="gelu",
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    model = GPTNeoXForCausalLM(config).eval()
    with torch.no_grad():  # larger weights than the 0.02 init, so a wrong wiring shows in the logits
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def scaled_model(cfg: ModelConfig, seed: int = 0, std: float = 0.2, dtype=torch.float64) -> GPTNeoX:
    torch.manual_seed(seed)
    model = GPTNeoX(cfg).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model


@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("rotary_pct", [0.25, 1.0])
def test_logits_match_transformers(parallel, rotary_pct):
    hf = random_hf(0, parallel, rotary_pct)
    ours = from_hf_model(hf).eval()
    assert ours.cfg.use_parallel_residual is parallel
    ids = torch.randint(0, 97, (2, 33))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert expected.abs().max() > 1.0  # the comparison is not between near-zero numbers
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_parity_detects_a_wrong_weight():
    hf = random_hf(1, True)
    ours = from_hf_model(hf).eval()
    with torch.no_grad():
        ours.layers[1].attention.dense.bias[0] += 0.05  # one entry: a uniform shift would vanish in LayerNorm
    ids = torch.randint(0, 97, (1, 16))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() > 1e-3


def test_save_pretrained_roundtrip(tmp_path):
    model = scaled_model(ModelConfig.from_name("tiny"), dtype=torch.float32)
    save_pretrained(model, tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").exists()
    loaded = from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), atol=0, rtol=0)
        torch.testing.assert_close(to_hf_model(model).eval()(ids).logits, model(ids), atol=1e-4, rtol=1e-4)


def test_hub_name_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        from_pretrained("EleutherAI/pythia-70m-does-not-exist-locally")


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sequential_residual_cached_equals_uncached(temperature):
    """The method table (tests/test_methods.py) runs the parallel-residual shape; this is the sequential one."""
    model = scaled_model(ModelConfig.from_name("tiny-sequential"))
    prompt = torch.randint(0, 512, (3, 7))
    assert_cached_equals_uncached(model, prompt, 12, temperature, seed=123)


def test_cache_overflow_and_position_limit_are_clear_errors():
    model = GPTNeoX(ModelConfig.from_name("tiny", max_position_embeddings=16))
    caches = model.build_caches(1, 4)
    with pytest.raises(ValueError, match="cache overflow"):
        model(torch.zeros(1, 5, dtype=torch.long), caches)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="cannot serve"):
        model.build_caches(1, 4, kind="vdproj")


def test_named_shapes_and_bad_config():
    cfg = ModelConfig.from_name("pythia-160m")
    assert (cfg.n_layer, cfg.n_embd, cfg.head_size, cfg.rotary_ndims) == (12, 768, 64, 16)
    with pytest.raises(ValueError, match="unknown model name"):
        ModelConfig.from_name("pythia-7b")
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(n_embd=100, n_head=3)
