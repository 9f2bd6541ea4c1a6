"""The decode seam, over one table of every cache kind: static decode step == eager decoding, compiled ==
eager, ragged (left-padded) batches == each prompt alone == Hugging Face `generate` with `attention_mask`.

Compiling is slow on CPU (~15 s a kind at tiny shapes): `make test` compiles the `kv` and `int4` rows (the
plain cache and the one with every static-shape device: ring window, group re-quantization, fused
dequantization); the `slow` marker covers the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from helpers import random_ids, randomized
from test_model import random_hf

import kvcompress.methods  # noqa: F401  (registers attentions and caches)
from kvcompress.models import GPTNeoX, ModelConfig, decode_step, generate, prefill
from kvcompress.models.hf import from_hf_model


@dataclass(frozen=True)
class Case:
    name: str
    attention: str = "standard"
    attention_kwargs: dict[str, Any] = field(default_factory=dict)
    cache: str = "native"
    cache_kwargs: dict[str, Any] = field(default_factory=dict)
    exact: bool = True  # the cache reproduces the uncached model
    ragged_exact: bool = True  # a padded row equals the prompt alone

    def model(self, seed: int = 0) -> GPTNeoX:
        cfg = ModelConfig.from_name("tiny", attention=self.attention, attention_kwargs=self.attention_kwargs)
        return randomized(GPTNeoX(cfg), seed=seed, dtype=torch.float64)

    def caches(self, model: GPTNeoX, batch_size: int, max_len: int):
        return model.build_caches(batch_size, max_len, kind=self.cache, **self.cache_kwargs)


CASES = [
    Case("kv", cache="kv"),
    Case("int8", cache="int8", exact=False),
    # A small window and groups, so that decoding reads codes, the window and a group being filled.
    Case("int4", cache="int4", cache_kwargs={"group_size": 4, "window": 6}, exact=False, ragged_exact=False),
    Case("vdproj", "vdproj", {"rank": 32}),
    Case("vdproj_k", "vdproj", {"rank": 32, "compress_k": True, "k_rank": 24}),
    Case("ka", "ka"),
    Case("ka_adapter", "ka_adapter", cache="ka", exact=False),
    Case("mka", "mka", {"layers": [-1], "zero_init": False}),
]
COMPILED_IN_MAKE_TEST = {"kv", "int4"}


def by_name(name: str) -> Case:
    return next(c for c in CASES if c.name == name)


def eager_decode(
    model: GPTNeoX, case: Case, prompt: torch.Tensor, new_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding through the eager forward `model(ids, caches)` (the first-slots reads), token by token."""
    B, T = prompt.shape
    caches = case.caches(model, B, T + new_tokens)
    tokens, logits = prompt, []
    with torch.no_grad():
        step_logits = model(prompt, caches, last_only=True)[:, -1]
        for _ in range(new_tokens):
            logits.append(step_logits)
            nxt = step_logits.argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt], dim=1)
            if len(logits) < new_tokens:
                step_logits = model(nxt, caches, last_only=True)[:, -1]
    return tokens, torch.stack(logits, dim=1)


def run(model: GPTNeoX, case: Case, prompt: torch.Tensor, new_tokens: int, **kw: Any):
    caches = case.caches(model, prompt.shape[0], prompt.shape[1] + new_tokens)
    return generate(model, prompt, new_tokens, caches=caches, return_logits=True, **kw)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_static_decode_step_equals_eager_decoding(case: Case) -> None:
    model = case.model()
    prompt = random_ids(3, 9, seed=1)
    tokens, logits = run(model, case, prompt, 10)
    ref_tokens, ref_logits = eager_decode(model, case, prompt, 10)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-10, rtol=0)
    if case.exact:
        uncached = generate(model, prompt, 10, use_cache=False, return_logits=True)
        assert torch.equal(tokens, uncached[0])
        torch.testing.assert_close(logits, uncached[1], atol=1e-10, rtol=0)


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, marks=() if c.name in COMPILED_IN_MAKE_TEST else pytest.mark.slow) for c in CASES],
    ids=lambda c: c.name,
)
def test_compiled_decode_step_equals_eager(case: Case) -> None:
    model = case.model()
    prompt = random_ids(2, 7, seed=2)
    eager = run(model, case, prompt, 8)
    compiled = run(model, case, prompt, 8, compile=True)
    assert torch.equal(compiled[0], eager[0])
    torch.testing.assert_close(compiled[1], eager[1], atol=1e-9, rtol=0)
    again = run(model, case, random_ids(2, 7, seed=3), 8, compile=True)  # same graph, other tokens
    assert torch.equal(again[0], run(model, case, random_ids(2, 7, seed=3), 8)[0])


def padded(prompts: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p) :], mask[i, T - len(p) :] = p, 1
    return ids, mask


@pytest.mark.parametrize("case", [c for c in CASES if c.ragged_exact], ids=lambda c: c.name)
def test_ragged_batch_equals_each_prompt_alone(case: Case) -> None:
    model = case.model()
    prompts = [random_ids(1, n, seed=n)[0] for n in (9, 3, 6)]
    ids, mask = padded(prompts, pad_id=7)
    tokens, logits = run(model, case, ids, 8, attention_mask=mask)
    for i, p in enumerate(prompts):
        alone_tokens, alone_logits = run(model, case, p[None], 8)
        assert torch.equal(tokens[i, ids.shape[1] :], alone_tokens[0, len(p) :])
        torch.testing.assert_close(logits[i], alone_logits[0], atol=1e-9, rtol=0)


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
    model = by_name("kv").model()
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
    model = by_name("kv").model()
    caches = model.build_caches(2, 20)
    a = generate(model, random_ids(2, 6, seed=1), 5, caches=caches)
    b = generate(model, random_ids(2, 9, seed=2), 5, caches=caches)
    assert torch.equal(a, generate(model, random_ids(2, 6, seed=1), 5))
    assert torch.equal(b, generate(model, random_ids(2, 9, seed=2), 5))


def test_one_cannot_serve_message() -> None:
    std, vd = GPTNeoX(ModelConfig.from_name("tiny")), by_name("vdproj").model()
    wrong = r"cache '{}' cannot serve attention '{}' \(it writes the '{}' layout\); caches that serve it"
    with pytest.raises(ValueError, match=wrong.format("vdproj", "standard", "kv")):
        std.build_caches(1, 4, kind="vdproj")
    with pytest.raises(ValueError, match=wrong.format("int8", "vdproj", "vdproj")):
        vd.build_caches(1, 4, kind="int8")
    with pytest.raises(ValueError, match=r"unknown cache 'int3'"):
        std.build_caches(1, 4, kind="int3")
