"""Token-window data: WikiText, the Pile and local files, tokenized once with the Pythia tokenizer and cached."""

from kvcompress.data.datamodule import TokenWindowDataModule, TokenWindowDataset
from kvcompress.data.sources import SOURCES
from kvcompress.data.tokenizer import DataUnavailableError, TextTokenizer, load_tokenizer

__all__ = [
    "SOURCES",
    "DataUnavailableError",
    "TextTokenizer",
    "TokenWindowDataModule",
    "TokenWindowDataset",
    "load_tokenizer",
]
