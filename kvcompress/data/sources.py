"""Where each data set's text comes from (local copy, else the Hub), tokenization, and the token cache."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kvcompress.data.tokenizer import DataUnavailableError, TextTokenizer, data_dir, hub_offline, offline_reason
from kvcompress.utils import TEMP_SUFFIX, atomic_write, file_sha256

log = logging.getLogger(__name__)

CACHE_FORMAT = 2  # bump when the tokenization / joining rules change: every cached stream is then rebuilt
TRAIN, VAL, ALL = "train", "validation", "all"


@dataclass(frozen=True)
class SourceSpec:
    """A named data set: its Hub location, its local copy (relative to the data dir) and how it is joined."""

    hub_id: str | None
    hub_config: str | None
    documents: bool  # True: a list of documents joined by EOS; False: one text (WikiText lines)
    has_val_split: bool
    local: dict[str, tuple[str, ...]] = field(default_factory=dict)  # split -> candidate files, first found wins


SOURCES: dict[str, SourceSpec] = {
    # The offline copy has no train.txt: train falls back to test.txt (the project's stated convention).
    "wikitext-2": SourceSpec(
        "Salesforce/wikitext",
        "wikitext-2-v1",
        documents=False,
        has_val_split=True,
        local={TRAIN: ("wikitext-2/train.txt", "wikitext-2/test.txt"), VAL: ("wikitext-2/valid.txt",)},
    ),
    "wikitext-103": SourceSpec(
        "Salesforce/wikitext",
        "wikitext-103-v1",
        documents=False,
        has_val_split=True,
        local={TRAIN: ("wikitext-103/train.txt",), VAL: ("wikitext-103/valid.txt",)},
    ),
    "pile": SourceSpec(
        "NeelNanda/pile-10k", None, documents=True, has_val_split=False, local={ALL: ("pile-10k/train.jsonl",)}
    ),
    "text": SourceSpec(None, None, documents=False, has_val_split=False),  # a local text file: one document
    "jsonl": SourceSpec(None, None, documents=True, has_val_split=False),  # a local jsonl: one document a line
    "local": SourceSpec(None, None, documents=False, has_val_split=False),  # "jsonl" or "text" by the file's suffix
}
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
_HUB_SPLITS = {TRAIN: "train", VAL: "validation", ALL: "train"}
_WARNED: set[str] = set()


def warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning(message)


@dataclass
class SplitSource:
    """One split's text: where it is (`origin`, for logs and reports), what identifies it (hashed into the cache
    key) and how to read it (`read` returns one text, or an iterable of documents when `documents`)."""

    dataset: str
    split: str
    origin: str
    identity: dict[str, Any]
    documents: bool
    read: Callable[[], str | Iterable[str]]


def _not_text(path: Path, err: UnicodeDecodeError) -> ValueError:
    reason = f"byte {err.start}: {err.reason}"
    return ValueError(f"data file {path} is not UTF-8 text ({reason}); give a .txt or .jsonl file")


def _read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise _not_text(path, err) from err
    if "\x00" in text:
        raise ValueError(f"data file {path} holds NUL bytes: it is a binary file, not text")
    return text


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from e
                if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                    raise ValueError(f"{path}:{lineno}: no string field {text_field!r} (set text_field=...)")
                yield row[text_field]
        except UnicodeDecodeError as err:
            raise _not_text(path, err) from err


def _local_split(dataset: str, split: str, path: Path, documents: bool, text_field: str) -> SplitSource:
    identity: dict[str, Any] = {"file_sha256": file_sha256(path)}
    if documents:
        identity["text_field"] = text_field
        read: Callable[[], str | Iterable[str]] = lambda: _read_jsonl(path, text_field)
    else:
        read = lambda: _read_text(path)
    return SplitSource(dataset, split, str(path), identity, documents, read)


def _hub_split(
    dataset: str,
    split: str,
    spec: SourceSpec,
    hub_id: str,
    config: str | None,
    revision: str | None,
    text_field: str,
    local_hint: str,
) -> SplitSource:
    hub_split = _HUB_SPLITS[split]
    what = f"{hub_id!r}" + (f" config {config!r}" if config else "") + f" split {hub_split!r}"

    def read() -> str | list[str]:
        # Called only on a cache miss: a cached stream needs neither the text nor the Hub.
        if hub_offline():
            raise DataUnavailableError(
                f"data set {dataset!r} ({split}): {local_hint}; the Hub data set {what} is not tried: "
                f"{offline_reason()}. Provide the local copy or unset the offline variables."
            )
        try:
            import datasets

            ds = datasets.load_dataset(hub_id, config, split=hub_split, revision=revision)
        except Exception as e:  # network down, unknown repo/config...
            raise DataUnavailableError(
                f"data set {dataset!r} ({split}): {local_hint}; loading the Hub data set {what} failed: {e}"
            ) from e
        if text_field not in ds.column_names:
            raise ValueError(f"Hub data set {what} has no field {text_field!r} (columns: {ds.column_names})")
        rows: list[str] = list(ds[text_field])
        return rows if spec.documents else "".join(rows)  # WikiText rows are lines that keep their "\n"

    identity = {"hub_id": hub_id, "config": config, "split": hub_split, "revision": revision}
    if spec.documents:
        identity["text_field"] = text_field
    return SplitSource(
        dataset,
        split,
        f"hub:{hub_id}" + (f"/{config}" if config else "") + f":{hub_split}",
        identity,
        spec.documents,
        read,
    )


def resolve_source(
    source: str,
    *,
    path: str | os.PathLike | None = None,
    data_dir_: str | os.PathLike | None = None,
    hub_id: str | None = None,
    hub_config: str | None = None,
    hub_revision: str | None = None,
    text_field: str = "text",
) -> dict[str, SplitSource]:
    """The splits of `source`: {"train", "validation"} for WikiText, {"all"} for single-split sources.

    A local copy is used without asking the Hub; otherwise the Hub is read lazily (on a cache miss).
    """
    if source not in SOURCES:
        raise ValueError(f"unknown data source {source!r}; known sources: {sorted(SOURCES)}")
    spec = SOURCES[source]
    if spec.hub_id is None:  # a local file
        if path is None:
            raise ValueError(f"source {source!r} needs path=<a local text or jsonl file>")
        file = Path(path).expanduser()
        if not file.is_file():
            raise FileNotFoundError(f"source {source!r}: no such file {file}")
        documents = spec.documents if source != "local" else file.suffix.lower() in JSONL_SUFFIXES
        return {ALL: _local_split(file.stem, ALL, file, documents, text_field)}

    hub_id = hub_id or spec.hub_id
    config = hub_config if hub_config is not None else spec.hub_config
    splits = (TRAIN, VAL) if spec.has_val_split else (ALL,)
    root = data_dir(data_dir_)
    # The local copy holds the default variant only (e.g. the "<unk>" v1 WikiText), so another Hub id/config skips it.
    use_local = root is not None and hub_id == spec.hub_id and config == spec.hub_config and spec.local
    found: dict[str, Path] = {}
    if use_local and root is not None:
        for split in splits:
            for rel in spec.local.get(split, ()):
                if (root / rel).is_file():
                    found[split] = root / rel
                    break
    if len(found) == len(splits):
        if source == "wikitext-2" and found[TRAIN].name == "test.txt":
            warn_once(
                f"WikiText-2 offline copy: TRAINING ON THE TEST SPLIT ({found[TRAIN]}) and validating on "
                f"{found[VAL]} (the train split is not in the offline data); say so in every report."
            )
        return {s: _local_split(source, s, found[s], spec.documents, text_field) for s in splits}

    rels = [rel for s in splits for rel in spec.local.get(s, ())]
    if not rels:
        hint = "there is no offline copy of this data set"
    elif root is None:
        hint = f"no local copy (KVCOMPRESS_DATA_DIR is not set; looked for $KVCOMPRESS_DATA_DIR/{' or '.join(rels)})"
    elif not use_local:
        hint = f"the local copy holds only {spec.hub_id}/{spec.hub_config}, not hub_id={hub_id!r} config={config!r}"
    else:
        hint = "no local copy at " + " / ".join(str(root / rel) for rel in rels)
    assert hub_id is not None
    return {s: _hub_split(source, s, spec, hub_id, config, hub_revision, text_field, hint) for s in splits}


# --- tokenization -------------------------------------------------------------------------------------------------

# Cut points where tokenizing the pieces separately gives exactly the tokens of the whole text (the byte-level
# pre-tokenizer always starts a new piece there): after a newline that is followed by " <non-space>", or between
# two non-space characters. WikiText lines all start with a space, so every line start is a cut point.
_CUT = re.compile(r"\n(?= \S)|(?<=\S)\n(?=\S)")
_CHUNK_CHARS = 1 << 16
_DOC_BATCH = 1024


def split_text(text: str, chunk_chars: int = _CHUNK_CHARS) -> list[str]:
    """Split `text` into pieces of about `chunk_chars` characters at token-safe cut points."""
    pieces, start = [], 0
    while start < len(text):
        m = _CUT.search(text, min(start + chunk_chars, len(text)))
        end = m.end() if m else len(text)
        pieces.append(text[start:end])
        start = end
    return pieces


def _token_dtype(tok: TextTokenizer) -> np.dtype:
    return np.dtype(np.uint16) if tok.vocab_size <= 1 << 16 else np.dtype(np.uint32)


def tokenize_text(tok: TextTokenizer, text: str) -> np.ndarray:
    """Token ids of one whole text (encoded in parallel pieces, same ids as one `encode(text)`)."""
    dtype = _token_dtype(tok)
    parts = [np.asarray(ids, dtype=dtype) for ids in tok.encode_batch(split_text(text))]
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def tokenize_documents(tok: TextTokenizer, docs: Iterable[str]) -> np.ndarray:
    """Token ids of documents joined by the EOS id (between documents; empty documents are skipped)."""
    dtype, eos = _token_dtype(tok), np.asarray([tok.eos_token_id], dtype=_token_dtype(tok))
    parts: list[np.ndarray] = []
    batch: list[str] = []

    def flush() -> None:
        for ids in tok.encode_batch(batch):
            if parts:
                parts.append(eos)
            parts.append(np.asarray(ids, dtype=dtype))
        batch.clear()

    for doc in docs:
        if doc:
            batch.append(doc)
            if len(batch) >= _DOC_BATCH:
                flush()
    if batch:
        flush()
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


# --- cache --------------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    return Path(os.environ.get("KVCOMPRESS_CACHE_DIR") or "~/.cache/kvcompress").expanduser()


def cache_key(split: SplitSource, tok: TextTokenizer) -> str:
    """Hash of everything that changes the token stream: the data (file content hash, or Hub id/config/split/
    revision), the text field, the joining rule (EOS id between documents) and the tokenizer's serialization."""
    payload = {
        "format": CACHE_FORMAT,
        "dataset": split.dataset,
        "split": split.split,
        "data": split.identity,
        "join": f"eos:{tok.eos_token_id}" if split.documents else "concat",
        "tokenizer": tok.fingerprint,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def cache_path(split: SplitSource, tok: TextTokenizer, cache_dir: str | os.PathLike) -> Path:
    name = re.sub(r"[^\w.-]", "_", f"{split.dataset}-{split.split}")
    return Path(cache_dir) / "tokens" / f"{name}-{cache_key(split, tok)[:20]}.npy"


def _cached_tokens(path: Path) -> tuple[np.ndarray, dict[str, Any]] | None:
    """The cached stream at `path` if its metadata (count, dtype, sha256) matches its content; None otherwise.

    A damaged cache (truncated, zeroed, random bytes, a missing or foreign `.json`) is reported by name and
    rebuilt by the caller. `allow_pickle=False`: a cache file never runs code."""
    meta_path = path.with_suffix(".json")
    try:
        meta = json.loads(meta_path.read_text())
        tokens = np.load(path, allow_pickle=False)
        problems = []
        if tokens.ndim != 1 or tokens.size != meta["num_tokens"]:
            problems.append(f"{tokens.size} tokens, metadata says {meta['num_tokens']}")
        if str(tokens.dtype) != meta["dtype"]:
            problems.append(f"dtype {tokens.dtype}, metadata says {meta['dtype']}")
        elif hashlib.sha256(tokens.tobytes()).hexdigest() != meta["tokens_sha256"]:
            problems.append("content hash differs from the metadata")
        if problems:
            raise ValueError("; ".join(problems))
        return tokens, meta
    except Exception as err:  # noqa: BLE001 - any damage means rebuild
        log.warning("token cache %s is damaged (%s: %s); rebuilding it", path, type(err).__name__, err)
        return None


def _remove_old_temp_files(path: Path, min_age_s: float = 3600) -> None:
    """Temp files of killed cache writes for `path` (old enough that no live writer still owns them)."""
    now = time.time()
    for tmp in path.parent.glob(f".{path.stem}.*{TEMP_SUFFIX}"):
        if now - tmp.stat().st_mtime > min_age_s:
            log.warning("removing %s, left by an interrupted cache write", tmp)
            tmp.unlink(missing_ok=True)


def load_tokens(split: SplitSource, tok: TextTokenizer, cache_dir: str | os.PathLike) -> tuple[np.ndarray, bool]:
    """The split's token stream and whether it came from the cache (tokenized and cached on a miss or damage)."""
    stream = load_token_stream(split, tok, cache_dir)
    return stream.tokens, stream.cached


@dataclass
class TokenStream:
    tokens: np.ndarray
    cached: bool  # read from the cache (else tokenized now, and cached)
    sha256: str  # of the tokens (the cache's recorded hash, verified on every read): the data's content identity


def load_token_stream(split: SplitSource, tok: TextTokenizer, cache_dir: str | os.PathLike) -> TokenStream:
    """`load_tokens` with the tokens' sha256 (verified against the cache's metadata, or computed when tokenizing)."""
    path = cache_path(split, tok, cache_dir)
    if path.is_file() or path.with_suffix(".json").is_file():
        cached = _cached_tokens(path)
        if cached is not None:
            return TokenStream(cached[0], True, cached[1]["tokens_sha256"])
    _remove_old_temp_files(path)
    log.info("tokenizing %s %s from %s", split.dataset, split.split, split.origin)
    content = split.read()
    if split.documents:
        tokens = tokenize_documents(tok, content)
    elif isinstance(content, str):
        tokens = tokenize_text(tok, content)
    else:
        raise TypeError(f"data set {split.dataset!r} ({split.split}): read() gave documents for a one-text split")
    if tokens.size and int(tokens.max()) >= tok.vocab_size:
        raise ValueError(f"tokenizer {tok.name} produced id {int(tokens.max())} >= its vocab size {tok.vocab_size}")
    sha256 = hashlib.sha256(tokens.tobytes()).hexdigest()
    meta = {
        "dataset": split.dataset,
        "split": split.split,
        "origin": split.origin,
        "data": split.identity,
        "tokenizer": tok.name,
        "tokenizer_sha256": tok.fingerprint,
        "num_tokens": int(tokens.size),
        "dtype": str(tokens.dtype),
        "tokens_sha256": sha256,
    }
    # The metadata goes last: a kill between the two writes leaves a stream without matching metadata (rebuilt).
    atomic_write(path, lambda f: np.save(f, tokens, allow_pickle=False), mode="wb")
    atomic_write(path.with_suffix(".json"), lambda f: json.dump(meta, f, indent=1), mode="w")
    log.info("cached %d tokens at %s", tokens.size, path)
    return TokenStream(tokens, False, sha256)
