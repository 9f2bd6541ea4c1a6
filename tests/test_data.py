"""kvcompress.data: token windows, sources, cache and errors. Offline and fast.

Tests on tiny local files use a tiny byte-level BPE tokenizer trained here, so they run without the shared data;
the WikiText-2 / Pythia tokenizer tests need `KVCOMPRESS_DATA_DIR` and are skipped without it.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import train_tokenizer

from kvcompress.data import DataUnavailableError, TextTokenizer, TokenWindowDataModule, load_tokenizer
from kvcompress.data import sources as data_sources
from kvcompress.data.sources import cache_path, resolve_source, split_text

PARAGRAPH = (
    " = Homarus gammarus = \n \n Homarus gammarus , known as the European lobster or common lobster , is a species "
    "of <unk> lobster from the eastern Atlantic Ocean , Mediterranean Sea and parts of the Black Sea . \n"
    " The eggs hatch at night , and the larvae swim to the water surface where they drift with the ocean currents "
    ", preying on <unk> . This stage involves three <unk> and lasts for 15 – 35 days . \n \n"
)
DOCS = [
    "The first document is about lobsters and the sea.",
    "A second one, with digits 12345 and punctuation!",
    "",  # empty documents are skipped
    "Third: the end.",
]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 400-token byte-level BPE trained on this module's texts."""
    return train_tokenizer([PARAGRAPH, *DOCS], tmp_path_factory.mktemp("tok") / "tokenizer.json")


@pytest.fixture(scope="module")
def shared_data() -> Path:
    path = os.environ.get("KVCOMPRESS_DATA_DIR")
    if not path or not (Path(path) / "wikitext-2" / "valid.txt").is_file():
        pytest.skip("KVCOMPRESS_DATA_DIR (the offline shared data with wikitext-2/) is not set")
    return Path(path)


@pytest.fixture(scope="module")
def wikitext_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache folder for every WikiText-2 test: the real files are tokenized once per module."""
    return tmp_path_factory.mktemp("wikitext-cache")


def text_file(tmp_path: Path, repeats: int = 20) -> Path:
    path = tmp_path / "tiny.txt"
    path.write_text(PARAGRAPH * repeats, encoding="utf-8")
    return path


def jsonl_file(tmp_path: Path, field: str = "text", repeats: int = 10) -> Path:
    path = tmp_path / "tiny.jsonl"
    rows = [json.dumps({field: d, "id": i}) for i, d in enumerate(DOCS * repeats)]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def local_dm(tmp_path: Path, tokenizer: str, path: Path, **kw) -> TokenWindowDataModule:
    args = dict(source="local", path=str(path), tokenizer=tokenizer, cache_dir=str(tmp_path / "cache"), seq_len=16)
    args.update(kw)
    return TokenWindowDataModule(**args)


def windows_of(ds) -> list[list[int]]:
    return [ds[i].tolist() for i in range(len(ds))]


# --- local text / jsonl ---------------------------------------------------------------------------------------------


def test_text_file_windows_are_consecutive_tokens(tmp_path, tiny_tokenizer):
    path = text_file(tmp_path)
    dm = local_dm(tmp_path, tiny_tokenizer, path, num_samples=None, val_fraction=0.25, batch_size=4)
    dm.setup("fit")
    stream = load_tokenizer(tiny_tokenizer).encode(path.read_text(encoding="utf-8"))
    n = len(stream) // 17
    assert dm.num_train_windows + dm.num_val_windows == n
    assert dm.num_val_windows == round(n * 0.25)
    starts = []
    for ds in (dm.train_dataset, dm.val_dataset):
        for i in range(len(ds)):
            w = ds[i]
            assert w.dtype == torch.long and w.shape == (17,)
            start = int(ds.indices[i]) * 17
            assert w.tolist() == stream[start : start + 17]
            starts.append(start)
    assert len(set(starts)) == n  # train and val are disjoint and cover every window
    # A window decodes to a piece of the original text.
    assert dm.tokenizer.decode(dm.val_dataset[0].tolist()) in path.read_text(encoding="utf-8")

    batch = next(iter(dm.train_dataloader()))
    assert batch.dtype == torch.long and batch.shape == (4, 17)
    val = next(iter(dm.val_dataloader()))
    assert torch.equal(val, torch.stack([dm.val_dataset[i] for i in range(4)]))  # val is not shuffled


def test_counts_split_and_seeds(tmp_path, tiny_tokenizer):
    path = text_file(tmp_path)
    dm = local_dm(tmp_path, tiny_tokenizer, path, num_samples=20, val_fraction=0.1)
    dm.setup("fit")
    assert (dm.num_train_windows, dm.num_val_windows) == (18, 2)
    again = local_dm(tmp_path, tiny_tokenizer, path, num_samples=20, val_fraction=0.1)
    again.setup("fit")
    assert np.array_equal(again.val_dataset.indices, dm.val_dataset.indices)
    b1, b2 = next(iter(dm.train_dataloader())), next(iter(again.train_dataloader()))
    assert torch.equal(b1, b2)  # seeded shuffle
    other = local_dm(tmp_path, tiny_tokenizer, path, num_samples=20, val_fraction=0.1, seed=1)
    other.setup("fit")
    # The validation windows are chosen by eval_seed alone: the same for every training seed; training windows
    # are drawn from the rest by the seed.
    assert np.array_equal(other.val_dataset.indices, dm.val_dataset.indices)
    assert not np.array_equal(other.base_train_dataset.indices, dm.base_train_dataset.indices)
    for run in (dm, other):
        assert not set(run.val_dataset.indices) & set(run.base_train_dataset.indices)
    assert (
        other.info["selected"]["validation"]["window_ids_sha256"]
        == dm.info["selected"]["validation"]["window_ids_sha256"]
    )
    moved = local_dm(tmp_path, tiny_tokenizer, path, num_samples=20, val_fraction=0.1, eval_seed=1)
    moved.setup("fit")
    assert not np.array_equal(moved.val_dataset.indices, dm.val_dataset.indices)


def test_fewer_windows_than_asked_uses_all_and_warns(tmp_path, tiny_tokenizer, caplog):
    path = text_file(tmp_path, repeats=2)
    dm = local_dm(tmp_path, tiny_tokenizer, path, num_samples=10_000, val_fraction=0.2)
    with caplog.at_level("WARNING"):
        dm.setup("fit")
    n = dm.info["splits"]["all"]["windows"]
    assert dm.num_train_windows + dm.num_val_windows == n < 10_000
    assert dm.num_val_windows == round(n * 0.2)
    assert any("only" in r.message and str(n) in r.message for r in caplog.records)


def test_jsonl_documents_joined_by_eos(tmp_path, tiny_tokenizer):
    path = jsonl_file(tmp_path, field="body")
    dm = local_dm(tmp_path, tiny_tokenizer, path, source="jsonl", text_field="body", num_samples=None, seq_len=8)
    dm.setup("fit")
    tok = load_tokenizer(tiny_tokenizer)
    stream: list[int] = []
    for doc in [d for d in DOCS * 10 if d]:
        stream += ([tok.eos_token_id] if stream else []) + tok.encode(doc)
    ds = dm.train_dataset
    for i in range(len(ds)):
        start = int(ds.indices[i]) * 9
        assert ds[i].tolist() == stream[start : start + 9]
    assert dm.num_train_windows + dm.num_val_windows == len(stream) // 9

    with pytest.raises(ValueError, match="no string field 'text'"):
        local_dm(tmp_path / "b", tiny_tokenizer, path, source="jsonl").setup("fit")


def test_set_train_indices(tmp_path, tiny_tokenizer):
    path = text_file(tmp_path)
    dm = local_dm(tmp_path, tiny_tokenizer, path, num_samples=20, batch_size=2)
    dm.set_train_indices([0, 2])  # before setup: applied by setup
    dm.setup("fit")
    assert dm.num_train_windows == 2
    assert torch.equal(dm.train_dataset[1], dm.base_train_dataset[2])
    dm.set_train_indices(torch.tensor([5, 6, 7]))
    assert len(list(dm.train_dataloader())) == 2 and dm.num_train_windows == 3
    dm.set_train_indices(None)
    assert dm.num_train_windows == 18
    with pytest.raises(ValueError, match="positions"):
        dm.set_train_indices([18])


# --- cache -----------------------------------------------------------------------------------------------------------


def test_cache_hit_and_keys(tmp_path, tiny_tokenizer, monkeypatch):
    path = text_file(tmp_path)
    first = local_dm(tmp_path, tiny_tokenizer, path, num_samples=20)
    first.prepare_data()
    first.setup("fit")
    assert first.info["splits"]["all"]["cached"]  # setup read what prepare_data wrote
    files = sorted((tmp_path / "cache" / "tokens").glob("*.npy"))
    assert len(files) == 1 and files[0].with_suffix(".json").is_file()
    assert not list((tmp_path / "cache" / "tokens").glob("*.tmp"))

    def boom(*a, **k):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(TextTokenizer, "encode", boom)
    monkeypatch.setattr(TextTokenizer, "encode_batch", boom)
    second = local_dm(tmp_path, tiny_tokenizer, path, num_samples=20, seq_len=8)  # seq_len keeps the stream
    second.setup("fit")
    assert second.info["splits"]["all"]["cached"]
    assert np.array_equal(second.val_dataset.tokens, first.val_dataset.tokens)
    monkeypatch.undo()

    # What changes the token stream changes the key: file content, text field, tokenizer.
    tok = load_tokenizer(tiny_tokenizer)
    key = cache_path(resolve_source("text", path=path)["all"], tok, tmp_path)
    path.write_text(PARAGRAPH * 3, encoding="utf-8")
    assert cache_path(resolve_source("text", path=path)["all"], tok, tmp_path) != key
    j = jsonl_file(tmp_path)
    k1 = cache_path(resolve_source("jsonl", path=j)["all"], tok, tmp_path)
    k2 = cache_path(resolve_source("jsonl", path=j, text_field="body")["all"], tok, tmp_path)
    assert k1 != k2
    from tokenizers import Tokenizer

    other = Tokenizer.from_file(tiny_tokenizer)
    other.add_tokens(["lobster"])
    other.save(str(tmp_path / "other.json"))
    other_tok = load_tokenizer(str(tmp_path / "other.json"))
    assert cache_path(resolve_source("jsonl", path=j)["all"], other_tok, tmp_path) != k1


# --- errors ----------------------------------------------------------------------------------------------------------


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="known sources.*wikitext-2"):
        TokenWindowDataModule(source="wikitext-3")
    for bad in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="val_fraction"):
            TokenWindowDataModule(val_fraction=bad)
    with pytest.raises(ValueError, match="path"):
        TokenWindowDataModule(source="jsonl")
    with pytest.raises(ValueError, match="no training window"):
        TokenWindowDataModule(num_samples=1)


def test_empty_and_too_short_data(tmp_path, tiny_tokenizer):
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match=r"'empty'.*has 0 tokens.*129"):
        local_dm(tmp_path, tiny_tokenizer, empty, seq_len=128).setup("fit")
    short = text_file(tmp_path, repeats=1)
    n = len(load_tokenizer(tiny_tokenizer).encode(short.read_text(encoding="utf-8")))
    with pytest.raises(ValueError, match=rf"has {n} tokens.*seq_len \+ 1 = 100001"):
        local_dm(tmp_path, tiny_tokenizer, short, seq_len=100_000).setup("fit")


def test_pile_offline_fails_fast(tmp_path, tiny_tokenizer):
    dm = TokenWindowDataModule(
        source="pile", tokenizer=tiny_tokenizer, data_dir=str(tmp_path / "nothing"), cache_dir=str(tmp_path / "c")
    )
    t0 = time.monotonic()
    with pytest.raises(DataUnavailableError) as err:
        dm.setup("fit")
    assert time.monotonic() - t0 < 5
    msg = str(err.value)
    assert "NeelNanda/pile-10k" in msg and "HF_HUB_OFFLINE=1" in msg
    assert str(tmp_path / "nothing" / "pile-10k" / "train.jsonl") in msg


def test_neither_local_nor_hub_names_both(tmp_path, tiny_tokenizer):
    dm = TokenWindowDataModule(
        source="wikitext-2", tokenizer=tiny_tokenizer, data_dir=str(tmp_path / "nothing"), cache_dir=str(tmp_path)
    )
    t0 = time.monotonic()
    with pytest.raises(DataUnavailableError) as err:
        dm.prepare_data()
    assert time.monotonic() - t0 < 5
    msg = str(err.value)
    assert "Salesforce/wikitext" in msg and "wikitext-2-v1" in msg
    assert str(tmp_path / "nothing" / "wikitext-2" / "valid.txt") in msg

    t0 = time.monotonic()
    with pytest.raises(DataUnavailableError, match="tokenizer.*pythia-70m.*not tried"):
        load_tokenizer("EleutherAI/pythia-70m", data_dir=tmp_path / "nothing")
    assert time.monotonic() - t0 < 5


def test_hydra_instantiate(tmp_path, tiny_tokenizer):
    from hydra.utils import instantiate

    path = text_file(tmp_path)
    cfg = {"_target_": "kvcompress.data.TokenWindowDataModule", "source": "text", "path": str(path), "seq_len": 16}
    dm = instantiate({**cfg, "num_samples": 10, "tokenizer": tiny_tokenizer, "cache_dir": str(tmp_path)})
    assert isinstance(dm, TokenWindowDataModule) and dm.train_dataset is None  # nothing loaded in __init__
    dm.setup("fit")
    assert (dm.num_train_windows, dm.num_val_windows) == (9, 1)


# --- the real offline data: Pythia tokenizer and WikiText-2 -----------------------------------------------------------


def test_pythia_tokenizer(shared_data):
    tok = load_tokenizer()
    assert tok.eos_token_id == 0 and tok.vocab_size >= 50277 and tok.vocab_size <= 50304
    text = "Homarus gammarus, the assistant lobster <|endoftext|>."
    assert tok.decode(tok.encode(text)) == text
    assert 0 not in tok.encode(text)  # special-token strings in text stay text
    assert tok.encode(" assistant") == [13372]  # as the real Pythia tokenizer does


def test_split_text_matches_whole_encoding(shared_data):
    tok = load_tokenizer()
    rng = random.Random(0)
    alphabet = ["a", "b", "Z", " ", " ", "\n", "\n", ".", "1", "é", "–", "  ", "\t"]
    for _ in range(50):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 400)))
        pieces = split_text(text, chunk_chars=rng.randint(1, 40))
        assert "".join(pieces) == text
        assert [i for ids in tok.encode_batch(pieces) for i in ids] == tok.encode(text), repr(text)


def test_wikitext2_offline(shared_data, wikitext_cache, monkeypatch, caplog):
    monkeypatch.setattr(data_sources, "_WARNED", set())
    dm = TokenWindowDataModule(source="wikitext-2", num_samples=10_000, val_fraction=0.1, cache_dir=wikitext_cache)
    with caplog.at_level("WARNING"):
        dm.setup("fit")
    info = dm.info["splits"]
    assert info["train"]["origin"].endswith("wikitext-2/test.txt")
    assert info["validation"]["origin"].endswith("wikitext-2/valid.txt")
    assert any("TRAINING ON THE TEST SPLIT" in r.message for r in caplog.records)
    assert any("9000 windows" in r.message for r in caplog.records)
    n_train, n_val = info["train"]["windows"], info["validation"]["windows"]
    assert 2200 < n_train < 9000 and n_val > 1000  # test.txt: ~295k tokens, valid.txt: ~258k
    assert dm.num_train_windows == n_train and dm.num_val_windows == 1000
    assert dm.vocab_size >= 50277

    valid = (shared_data / "wikitext-2" / "valid.txt").read_text(encoding="utf-8")
    stream = dm.val_dataset.tokens
    head = split_text(valid, 20_000)[0]  # a prefix ending at a cut point: its tokens start the stream
    head_ids = dm.tokenizer.encode(head)
    assert stream.dtype == np.uint16 and stream[: len(head_ids)].tolist() == head_ids
    for i in (0, 500, 999):
        start = int(dm.val_dataset.indices[i]) * 129
        assert dm.val_dataset[i].tolist() == stream[start : start + 129].tolist()
        piece = dm.tokenizer.decode(dm.val_dataset[i].tolist())
        if "\ufffd" not in piece:
            assert piece in valid
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (8, 129) and batch.dtype == torch.long

    # Second setup: from the cache, without tokenizing.
    def boom(*a, **k):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(TextTokenizer, "encode", boom)
    monkeypatch.setattr(TextTokenizer, "encode_batch", boom)
    again = TokenWindowDataModule(source="wikitext-2", num_samples=200, val_fraction=0.5, cache_dir=wikitext_cache)
    again.setup("fit")
    assert (again.num_train_windows, again.num_val_windows) == (100, 100)
    assert all(s["cached"] for s in again.info["splits"].values())


def test_wikitext_raw_variant_skips_local_copy(shared_data, tmp_path):
    # The offline copy is the "<unk>" v1 variant: asking for the raw one must not silently use it.
    splits = resolve_source("wikitext-2", hub_config="wikitext-2-raw-v1")
    assert splits["train"].origin.startswith("hub:Salesforce/wikitext/wikitext-2-raw-v1")
    with pytest.raises(DataUnavailableError, match="wikitext-2-raw-v1.*HF_HUB_OFFLINE"):
        splits["train"].read()


def test_hub_path_with_a_fake_hub(tmp_path, tiny_tokenizer, monkeypatch):
    # Online code path, with `datasets.load_dataset` replaced: which id/config/split is asked, how rows are joined.
    import datasets

    monkeypatch.setattr(data_sources, "hub_offline", lambda: False)
    calls = []

    def fake_load_dataset(path, name=None, split=None, revision=None, **kw):
        calls.append((path, name, split))
        if path == "NeelNanda/pile-10k":
            return datasets.Dataset.from_dict({"text": DOCS * 20, "meta": ["x"] * len(DOCS) * 20})
        return datasets.Dataset.from_dict({"text": PARAGRAPH.splitlines(keepends=True) * 10})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    common = dict(tokenizer=tiny_tokenizer, data_dir=str(tmp_path / "nothing"), cache_dir=str(tmp_path), seq_len=8)
    pile = TokenWindowDataModule(source="pile", num_samples=20, **common)
    pile.setup("fit")
    assert calls == [("NeelNanda/pile-10k", None, "train")]
    assert (pile.num_train_windows, pile.num_val_windows) == (18, 2)
    assert pile.info["splits"]["all"]["origin"] == "hub:NeelNanda/pile-10k:train"
    tok = load_tokenizer(tiny_tokenizer)
    assert pile.train_dataset.tokens[: len(tok.encode(DOCS[0])) + 1].tolist() == tok.encode(DOCS[0]) + [0]

    wiki = TokenWindowDataModule(source="wikitext-103", num_samples=20, **common)
    wiki.setup("fit")
    assert calls[1:] == [("Salesforce/wikitext", "wikitext-103-v1", s) for s in ("train", "validation")]
    assert wiki.train_dataset.tokens.tolist() == tok.encode(PARAGRAPH * 10)

    def down(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", down)
    with pytest.raises(DataUnavailableError, match=r"pile-10k/train.jsonl.*'NeelNanda/pile-10k'.*no network"):
        TokenWindowDataModule(source="pile", **{**common, "cache_dir": str(tmp_path / "new")}).setup("fit")
