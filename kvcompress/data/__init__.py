"""Token-window data: WikiText, the Pile and local files, tokenized once with the Pythia tokenizer and cached.

The datamodule (which imports Lightning) loads on first use, so the tokenizer check stays fast.
"""

from typing import Any

from kvcompress.data.batch import Batch, split_batch
from kvcompress.data.sources import SOURCES
from kvcompress.data.tokenizer import DataUnavailableError, TextTokenizer, load_tokenizer

__all__ = [
    "Batch",
    "SOURCES",
    "DataUnavailableError",
    "TextTokenizer",
    "TokenWindowDataModule",
    "TokenWindowDataset",
    "load_tokenizer",
    "split_batch",
]


def __getattr__(name: str) -> Any:
    if name in ("TokenWindowDataModule", "TokenWindowDataset"):
        from kvcompress.data import datamodule

        return getattr(datamodule, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
