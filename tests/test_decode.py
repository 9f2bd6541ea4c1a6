"""The decode seam beyond the method table (tests/test_methods.py runs static == eager, compiled == eager and
ragged == alone over every row): ragged batches == Hugging Face `generate` with `attention_mask`, bad masks and
overflow, reused caches, the one cannot-serve message."""

from __future__ import annotations

import pytest
import torch
from helpers import random_ids
from methods import ROWS_BY_NAME
from test_methods import model_of, padded
from test_model import random_hf

import kvcompress.methods  # noqa: F401  (registers attentions and caches)
from kvcompress.models import GPTNeoX, ModelConfig, decode_step, generate, prefill
from kvcompress.models.hf import from_hf_model


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)])
@pytest.mark.parametrize("parallel", [True, False])
def test_ragged_batch_equals_hf_generate(parallel: bool, compile: bool) -> None:
    """Same tokens and per-step logits as HF `generate(attention_mask=...)` (SDPA, fp32: HF's eager attention
    in fp64 returns garbage for left-padded rows)."""
    hf = random_hf(3, parallel)
    with torch.no_grad():  # no biases, milder weights: greedy text that does not repeat one token
        for name, p in hf.named_parameters():
            p.mul_(0.0 if name.endswith("bias") else 0.5)
    hf.set_attn_implementation("sdpa")
    ours = from_hf_model(hf).eval()
    prompts = [torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(n)) for n in (11, 4, 8, 1)]
    ids, mask = padded(prompts, pad_id=5)
    expected = hf.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=9,
        do_sample=False,
        pad_token_id=5,
        eos_token_id=None,
        output_logits=True,
        return_dict_in_generate=True,
    )
    got, logits = generate(ours, ids, 9, attention_mask=mask, compile=compile, return_logits=True)
    assert torch.equal(got, expected.sequences)
    assert len(set(got[:, ids.shape[1] :].flatten().tolist())) > 3  # not one repeated token
    torch.testing.assert_close(logits, torch.stack(expected.logits, dim=1), atol=1e-4, rtol=1e-4)
    # ...and the padded rows' tokens are those of each prompt alone.
    for i, p in enumerate(prompts):
        assert torch.equal(got[i, ids.shape[1] :], generate(ours, p[None], 9)[0, len(p) :])


def test_bad_attention_mask_and_overflow_fail_before_work() -> None:
    model = model_of(ROWS_BY_NAME["kv"])
    ids = random_ids(2, 5)
    with pytest.raises(ValueError, match="left padding"):
        generate(model, ids, 2, attention_mask=torch.tensor([[1, 1, 0, 1, 1], [1] * 5]))
    with pytest.raises(ValueError, match="left padding"):
        generate(model, ids, 2, attention_mask=torch.tensor([[0] * 5, [1] * 5]))
    caches = model.build_caches(2, 6)
    with pytest.raises(ValueError, match="cache overflow: 5 \\+ 2 tokens > max_len=6"):
        generate(model, ids, 2, caches=caches)
    logits = prefill(model, ids, caches)
    decode_step(model, logits.argmax(-1)[:, None], caches)
    with pytest.raises(ValueError, match="cache overflow"):
        decode_step(model, logits.argmax(-1)[:, None], caches)


def test_caches_are_reused_across_generate_calls() -> None:
    model = model_of(ROWS_BY_NAME["kv"])
    caches = model.build_caches(2, 20)
    a = generate(model, random_ids(2, 6, seed=1), 5, caches=caches)
    b = generate(model, random_ids(2, 9, seed=2), 5, caches=caches)
    assert torch.equal(a, generate(model, random_ids(2, 6, seed=1), 5))
    assert torch.equal(b, generate(model, random_ids(2, 9, seed=2), 5))


def test_one_cannot_serve_message() -> None:
    std, vd = GPTNeoX(ModelConfig.from_name("tiny")), model_of(ROWS_BY_NAME["vdproj"])
    wrong = r"cache '{}' cannot serve attention '{}' \(it writes the '{}' layout\); caches that serve it"
    with pytest.raises(ValueError, match=wrong.format("vdproj", "standard", "kv")):
        std.build_caches(1, 4, kind="vdproj")
    with pytest.raises(ValueError, match=wrong.format("int8", "vdproj", "vdproj")):
        vd.build_caches(1, 4, kind="int8")
    with pytest.raises(ValueError, match=r"unknown cache 'int3'"):
        std.build_caches(1, 4, kind="int3")
