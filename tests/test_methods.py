"""The shared battery over the method table (`tests/methods.py`): every row gets cached == uncached (or a bounded,
nonzero error for a lossy cache), chunked prefill, static decode step == eager decoding, compiled == eager,
ragged == alone, bytes == formula, the degenerate setting == the base model, the parameter count at Pythia-70M's
shape, and a smoke training run.

Compiling is slow on CPU (~15 s a kind at tiny shapes): `make test` compiles the rows marked
`compiled_in_make_test` (the plain cache; int4, which has every static-shape device: ring window, group
re-quantization, fused dequantization; and h2o, for the eviction caches' data-dependent slot writes and per-slot
state); the `slow` marker covers the others.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from helpers import assert_cached_equals_uncached, random_ids, randomized
from methods import ROWS, Row
from test_train import smoke
from test_train import text_file as text_file  # a fixture

import kvcompress.methods  # noqa: F401  (registers attentions and caches)
from kvcompress.models import GPTNeoX, ModelConfig, generate
from kvcompress.models.caches import CACHES
from kvcompress.run import train

TINY = ModelConfig.from_name("tiny")


def rows(keep=lambda row: True) -> list:
    """The rows `keep` selects, each under the `slow` marker when the row is marked slow."""
    return [pytest.param(r, marks=pytest.mark.slow if r.slow else ()) for r in ROWS if keep(r)]


def model_of(row: Row, seed: int = 0) -> GPTNeoX:
    cfg = ModelConfig.from_name("tiny", attention=row.attention, attention_kwargs=row.attention_kwargs, **row.overrides)
    return randomized(GPTNeoX(cfg), seed=seed, dtype=torch.float64)


def caches_of(row: Row, model: GPTNeoX, batch_size: int, max_len: int, **kw: Any):
    return model.build_caches(batch_size, max_len, kind=row.cache, **row.cache_kwargs, **kw)


def teacher_forced(model: GPTNeoX, row: Row, ids: torch.Tensor, chunks: tuple[int, ...] = ()) -> torch.Tensor:
    """Logits of `ids` fed through the row's cache: the given chunk sizes first, then one token at a time."""
    caches = caches_of(row, model, ids.shape[0], ids.shape[1])
    out, start = [], 0
    with torch.no_grad():
        for size in [*chunks, *[1] * (ids.shape[1] - sum(chunks))]:
            out.append(model(ids[:, start : start + size], caches))
            start += size
    return torch.cat(out, dim=1)


def test_every_registered_cache_kind_has_a_row() -> None:
    assert set(CACHES) - {"native"} <= {row.cache for row in ROWS} | {row.name for row in ROWS}


@pytest.mark.parametrize("row", rows(), ids=str)
def test_cached_decoding_matches_the_uncached_model(row: Row) -> None:
    model = model_of(row)
    ids = random_ids(3, 14, seed=1)
    with torch.no_grad():
        uncached = model(ids)
    cached = teacher_forced(model, row, ids)
    if row.exact:
        torch.testing.assert_close(cached, uncached, atol=1e-10, rtol=0)
        tokens = assert_cached_equals_uncached(model, ids[:, :7], 10, temperature=1.0, seed=3)
        other = generate(model, ids[:, :7], 10, temperature=1.0, generator=torch.Generator().manual_seed(4))
        assert not torch.equal(other, tokens)  # sampling really depends on the generator
    else:
        error = (cached - uncached).abs().max().item()
        assert 0 < error <= row.lossy_bound * uncached.abs().max().item(), error


@pytest.mark.parametrize("row", rows(lambda r: r.chunk_consistent), ids=str)
@pytest.mark.parametrize("chunks", [(5, 6), (1, 10), (10, 1)], ids=str)
def test_chunked_prefill_matches_one_prefill(row: Row, chunks: tuple[int, int]) -> None:
    """A prompt fed in two chunks (the second over a filled cache), then a decode step: the same logits as the
    whole prompt at once through the same cache kind (and, for an exact cache, as the uncached model)."""
    model = model_of(row, seed=1)
    ids = random_ids(2, sum(chunks) + 1, seed=5)
    one = teacher_forced(model, row, ids, chunks=(sum(chunks),))
    two = teacher_forced(model, row, ids, chunks=chunks)
    torch.testing.assert_close(two, one, atol=1e-9, rtol=0)
    if row.exact:
        with torch.no_grad():
            torch.testing.assert_close(two, model(ids), atol=1e-10, rtol=0)


def eager_decode(model: GPTNeoX, row: Row, prompt: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding through the eager forward `model(ids, caches)` (the first-slots reads), token by token."""
    B, T = prompt.shape
    caches = caches_of(row, model, B, T + new_tokens)
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


def run(model: GPTNeoX, row: Row, prompt: torch.Tensor, new_tokens: int, **kw: Any):
    caches = caches_of(row, model, prompt.shape[0], prompt.shape[1] + new_tokens)
    return generate(model, prompt, new_tokens, caches=caches, return_logits=True, **kw)


@pytest.mark.parametrize("row", rows(), ids=str)
def test_static_decode_step_equals_eager_decoding(row: Row) -> None:
    model = model_of(row)
    prompt = random_ids(3, 9, seed=1)
    tokens, logits = run(model, row, prompt, 10)
    ref_tokens, ref_logits = eager_decode(model, row, prompt, 10)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-10, rtol=0)


@pytest.mark.parametrize(
    "row",
    [pytest.param(r, marks=() if r.compiled_in_make_test and not r.slow else pytest.mark.slow) for r in ROWS],
    ids=str,
)
def test_compiled_decode_step_equals_eager(row: Row) -> None:
    model = model_of(row)
    prompt = random_ids(2, 7, seed=2)
    eager = run(model, row, prompt, 8)
    compiled = run(model, row, prompt, 8, compile=True)
    assert torch.equal(compiled[0], eager[0])
    torch.testing.assert_close(compiled[1], eager[1], atol=1e-9, rtol=0)
    again = run(model, row, random_ids(2, 7, seed=3), 8, compile=True)  # same graph, other tokens
    assert torch.equal(again[0], run(model, row, random_ids(2, 7, seed=3), 8)[0])


def padded(prompts: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p) :], mask[i, T - len(p) :] = p, 1
    return ids, mask


@pytest.mark.parametrize("row", rows(lambda r: r.ragged_exact), ids=str)
def test_ragged_batch_equals_each_prompt_alone(row: Row) -> None:
    model = model_of(row)
    prompts = [random_ids(1, n, seed=n)[0] for n in (9, 3, 6)]
    ids, mask = padded(prompts, pad_id=7)
    tokens, logits = run(model, row, ids, 8, attention_mask=mask)
    for i, p in enumerate(prompts):
        alone_tokens, alone_logits = run(model, row, p[None], 8)
        assert torch.equal(tokens[i, ids.shape[1] :], alone_tokens[0, len(p) :])
        torch.testing.assert_close(logits[i], alone_logits[0], atol=1e-9, rtol=0)


@pytest.mark.parametrize("row", rows(), ids=str)
def test_measured_bytes_follow_the_formula(row: Row) -> None:
    for dtype, e in ((torch.float32, 4), (torch.bfloat16, 2)):
        for max_len in (10, 48):
            caches = caches_of(row, GPTNeoX(model_of(row).cfg), 3, max_len, dtype=dtype)
            cfg = model_of(row).cfg
            assert caches.nbytes() / (3 * max_len) == pytest.approx(row.bytes_per_token(cfg, e, max_len), rel=1e-12)
    kwargs = row.params_70m[0] if row.params_70m else row.attention_kwargs
    big = ModelConfig.from_name(
        "pythia-70m", vocab_size=8, attention=row.attention, attention_kwargs=kwargs, **row.overrides
    )
    with torch.device("meta"):  # no weights are needed to size the caches
        model = GPTNeoX(big)
    kw = {**row.cache_kwargs, "device": "cpu", "dtype": torch.float32}
    caches = model.build_caches(2, 48, kind=row.cache, **kw)
    assert caches.nbytes() / (2 * 48) == pytest.approx(row.bytes_per_token(big, 4, 48), rel=1e-12)


@pytest.mark.parametrize("row", rows(lambda r: r.degenerate), ids=str)
def test_degenerate_setting_reproduces_the_base_model(row: Row) -> None:
    assert row.degenerate is not None
    base = randomized(GPTNeoX(TINY.with_(**row.overrides)), dtype=torch.float64)
    cfg = TINY.with_(attention=row.attention, attention_kwargs=row.degenerate.kwargs, **row.overrides)
    model = GPTNeoX(cfg).double().eval()  # the method's own init of what it adds
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and missing  # the method adds weights, and only adds
    x = random_ids(2, 24, seed=1)
    if row.degenerate.set_identity:
        with torch.no_grad():
            assert not torch.allclose(model(x), base(x), atol=1e-3)  # random projections change the output
        for layer in model.layers:
            layer.attention.set_identity()
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x), atol=1e-10, rtol=0)
    tokens, logits = generate(model, x[:, :8], 6, return_logits=True)  # its cached decoding is the base's
    ref_tokens, ref_logits = generate(base, x[:, :8], 6, return_logits=True)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-10, rtol=0)


@pytest.mark.parametrize("row", [r for r in ROWS if r.params_70m], ids=str)
def test_parameter_count_at_the_pythia_70m_shape(row: Row) -> None:
    assert row.params_70m is not None
    kwargs, expected = row.params_70m
    with torch.device("meta"):
        model = GPTNeoX(
            ModelConfig.from_name("pythia-70m", attention=row.attention, attention_kwargs=kwargs, **row.overrides)
        )
    assert model.num_parameters() == expected


@pytest.mark.parametrize("row", rows(lambda r: r.smoke is not None), ids=str)
def test_smoke_run_records_the_formula_bytes(row: Row, tmp_path, text_file) -> None:
    assert row.smoke is not None
    metrics = train(smoke(tmp_path, text_file, *row.smoke))
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["val_ppl"] == pytest.approx(metrics["val_ppl"]) and 1 < saved["val_ppl"] < float("inf")
    model = saved["config"]["model"]
    cfg = ModelConfig.from_name(
        "pythia-70m", attention=model["attention"], attention_kwargs=model["attention_kwargs"], **model["overrides"]
    )
    assert saved["cache"]["bytes_per_token"] == pytest.approx(row.bytes_per_token(cfg, 4, 128), rel=1e-12)
    assert saved["tpot_s"] > 0
