"""The Pythia (GPT-NeoX-20B) tokenizer: offline copy first, the Hub otherwise."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import socket
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

import huggingface_hub.constants
from tokenizers import Tokenizer

log = logging.getLogger(__name__)

DEFAULT_TOKENIZER = "EleutherAI/pythia-70m"
EOS_TOKEN = "<|endoftext|>"
# Every Pythia model (and GPT-NeoX-20B) shares one tokenizer; the offline copy lives here under the data dir.
_LOCAL_TOKENIZERS = {r"EleutherAI/(pythia-[\w.-]+|gpt-neox-20b)": "tokenizers/gpt-neox-20b/tokenizer.json"}


class DataUnavailableError(FileNotFoundError):
    """Neither a local copy nor the Hub can provide a tokenizer or a data set."""


def hub_offline() -> bool:
    """True when the Hub must not be asked (then we never try it: no 25 s of retries).

    huggingface_hub's own offline mode (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE), or a Hub that cannot be reached:
    huggingface_hub retries an unreachable Hub for ~25 s, so one quick connection attempt decides first.
    """
    return huggingface_hub.constants.is_offline_mode() or not hub_reachable()


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    url = urllib.parse.urlparse(huggingface_hub.constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def offline_reason() -> str:
    """Why the Hub is not tried, e.g. "HF_HUB_OFFLINE=1 is set" (call only when `hub_offline()`)."""
    if huggingface_hub.constants.is_offline_mode():
        names = [v for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if os.environ.get(v)]
        return " and ".join(f"{v}={os.environ[v]}" for v in names) + " is set" if names else "offline mode is on"
    return f"{huggingface_hub.constants.ENDPOINT} cannot be reached (no network?)"


def data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    """The offline data folder: the argument, else `$KVCOMPRESS_DATA_DIR`, else None."""
    value = explicit if explicit is not None else os.environ.get("KVCOMPRESS_DATA_DIR")
    return Path(value).expanduser() if value else None


class TextTokenizer:
    """Thin wrapper over `tokenizers.Tokenizer` with the few things the project needs.

    Strings such as "<|endoftext|>" or "assistant" inside the text are encoded as plain text (like tiktoken's
    `encode_ordinary`); the EOS id is only inserted explicitly (between documents).
    """

    def __init__(self, tokenizer: Tokenizer, name: str, source: str) -> None:
        tokenizer.encode_special_tokens = True  # the offline copy marks "assistant"/"RWKV" special: keep them text
        self._tok = tokenizer
        self.name = name
        self.source = source  # the file or Hub id it came from
        eos = tokenizer.token_to_id(EOS_TOKEN)
        if eos is None:
            raise ValueError(f"tokenizer {name!r} has no {EOS_TOKEN!r} token")
        self.eos_token_id: int = eos
        # The embedding must cover the largest id (the added whitespace / special tokens come after the BPE ones).
        self.vocab_size: int = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1

    @functools.cached_property
    def fingerprint(self) -> str:
        """Hash of the tokenizer's full serialization: same hash <=> same token ids for any text."""
        return hashlib.sha256(self._tok.to_str().encode()).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many strings at once (parallel in Rust)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"TextTokenizer(name={self.name!r}, source={self.source!r}, vocab_size={self.vocab_size})"


def _from_file(path: str) -> Tokenizer:
    """The tokenizer in `path`, cached while the file is unchanged (another file at the same path is read again)."""
    stat = os.stat(path)
    return _from_file_cached(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _from_file_cached(path: str, mtime_ns: int, size: int) -> Tokenizer:
    try:
        return Tokenizer.from_file(path)
    except Exception as err:  # noqa: BLE001 - the tokenizers library raises plain Exceptions on a bad file
        reason = " ".join(str(err).split())[:200]
        raise ValueError(f"tokenizer file {path} is not a valid tokenizer.json ({reason})") from None


def local_tokenizer_path(name: str, data_dir_: str | os.PathLike | None = None) -> Path | None:
    """Where the offline copy of tokenizer `name` would be (None when no data dir or unknown name)."""
    root = data_dir(data_dir_)
    for pattern, rel in _LOCAL_TOKENIZERS.items():
        if root is not None and re.fullmatch(pattern, name):
            return root / rel
    return None


def load_tokenizer(name: str = DEFAULT_TOKENIZER, data_dir: str | os.PathLike | None = None) -> TextTokenizer:
    """Load a tokenizer: `name` is a tokenizer.json path, a folder holding one, or a Hub model id.

    A Pythia / GPT-NeoX id uses `$KVCOMPRESS_DATA_DIR/tokenizers/gpt-neox-20b/tokenizer.json` when it exists,
    without asking the Hub. Otherwise the Hub is tried unless `hub_offline()`.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if path.is_file():
        return TextTokenizer(_from_file(str(path.resolve())), name, str(path))
    local = local_tokenizer_path(name, data_dir)
    if local is not None and local.is_file():
        return TextTokenizer(_from_file(str(local.resolve())), name, str(local))
    if hub_offline():
        raise DataUnavailableError(
            f"tokenizer {name!r} not found: {missing_local(local, path)}, and the Hub id {name!r} is not tried: "
            f"{offline_reason()}"
        )
    try:
        tok = Tokenizer.from_pretrained(name)
    except Exception as e:  # missing repo, no tokenizer.json...
        raise DataUnavailableError(
            f"tokenizer {name!r} not found: {missing_local(local, path)}, and loading the Hub id {name!r} failed: {e}"
        ) from e
    return TextTokenizer(tok, name, f"hub:{name}")


def missing_local(local: Path | None, path: Path) -> str:
    """Why no local copy was found, naming KVCOMPRESS_DATA_DIR (where the offline copy is looked for)."""
    if local is not None:
        return f"no offline copy at {local} (under KVCOMPRESS_DATA_DIR)"
    if "KVCOMPRESS_DATA_DIR" not in os.environ:
        return "KVCOMPRESS_DATA_DIR (the offline data folder) is not set"
    return f"no file or folder {str(path)!r} and no offline copy of that name under KVCOMPRESS_DATA_DIR"


def train_bpe_tokenizer(texts: Sequence[str], vocab_size: int, out: str | os.PathLike) -> Path:
    """Train a byte-level BPE tokenizer (GPT-NeoX style, with `<|endoftext|>`) on `texts`; write tokenizer.json.

    For mini-scale runs: with a 50k vocabulary the output layer dominates small models. Training is
    deterministic for the same texts and vocab_size; the file is written atomically.
    """
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from kvcompress.utils import atomic_write_text

    if vocab_size < 512:
        raise ValueError(f"vocab_size must be >= 512 (256 byte tokens + merges), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    path = Path(out)
    atomic_write_text(path, tok.to_str())
    return path
