"""`TokenWindowDataModule`: non-overlapping windows of `seq_len + 1` tokens from WikiText, the Pile or a local file."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Sampler

from kvcompress.data.sources import (
    ALL,
    SOURCES,
    TRAIN,
    VAL,
    SplitSource,
    default_cache_dir,
    load_token_stream,
    load_tokens,
    resolve_source,
)
from kvcompress.data.tokenizer import DEFAULT_TOKENIZER, TextTokenizer, load_tokenizer
from kvcompress.utils import window_ids_sha256

log = logging.getLogger(__name__)


class TokenWindowDataset(Dataset):
    """Windows `tokens[i * window : (i + 1) * window]` for the window numbers `indices`, as int64 tensors; with
    per-token loss `weights` (len(indices), window - 1), items are dicts `{"ids", "weight"}`."""

    def __init__(self, tokens: np.ndarray, window: int, indices: np.ndarray, weights: np.ndarray | None = None) -> None:
        self.tokens = tokens
        self.window = window
        self.indices = np.asarray(indices, dtype=np.int64)
        self.weights = None if weights is None else np.asarray(weights, dtype=np.float32)
        if self.weights is not None and self.weights.shape != (len(self.indices), window - 1):
            raise ValueError(
                f"token weights must have shape (windows, seq_len) = {(len(self.indices), window - 1)}, "
                f"got {self.weights.shape}"
            )

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> torch.Tensor | dict[str, torch.Tensor]:
        start = int(self.indices[i]) * self.window
        ids = torch.from_numpy(self.tokens[start : start + self.window].astype(np.int64))
        return ids if self.weights is None else {"ids": ids, "weight": torch.from_numpy(self.weights[i])}

    def subset(self, positions: Sequence[int] | np.ndarray | torch.Tensor) -> TokenWindowDataset:
        """The windows at `positions` of this dataset (0 <= p < len(self))."""
        pos = np.asarray(positions.cpu() if isinstance(positions, torch.Tensor) else positions, dtype=np.int64)
        if pos.ndim != 1 or (pos.size and (pos.min() < 0 or pos.max() >= len(self))):
            raise ValueError(f"positions must be a 1-D list of ints in [0, {len(self)}), got shape {pos.shape}")
        weights = None if self.weights is None else self.weights[pos]
        return TokenWindowDataset(self.tokens, self.window, self.indices[pos], weights)

    def with_weights(self, weights: np.ndarray | torch.Tensor | None) -> TokenWindowDataset:
        weights = weights.cpu().numpy() if isinstance(weights, torch.Tensor) else weights
        return TokenWindowDataset(self.tokens, self.window, self.indices, weights)


class EpochOrder(Sampler[int]):
    """Sample order as a pure function of (seed, epoch): a seeded permutation, or stream order without shuffle.

    Lightning calls `set_epoch` before each training epoch, so a resumed run sees the same order as an
    uninterrupted one. `start` skips the first indices of the next iteration (mid-epoch resume). With
    `num_replicas > 1` (DDP) rank r takes every num_replicas-th index from r, padded like DistributedSampler,
    so the ranks' batches i together hold the same windows as one process's batch i at num_replicas x the size.
    """

    def __init__(self, n: int, seed: int, shuffle: bool, rank: int = 0, num_replicas: int = 1) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} out of range for {num_replicas} replicas")
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.rank, self.num_replicas = rank, num_replicas
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=generator).tolist()
        else:
            order = list(range(self.n))
        if self.num_replicas > 1:
            order += order[: len(self) * self.num_replicas - self.n]
            order = order[self.rank :: self.num_replicas]
        return order

    def __iter__(self):
        start, self.start = self.start, 0
        return iter(self.order()[start:])

    def __len__(self) -> int:
        return -(-self.n // self.num_replicas)


class ResumableLoader(DataLoader):
    """A DataLoader that resumes mid-epoch: `position()` is the epoch and the batches served so far, and
    `resume_at(position)` makes the next iteration of that epoch skip those batches."""

    batch_size: int  # always given (DataLoader allows None)

    def __init__(
        self,
        dataset: TokenWindowDataset,
        batch_size: int,
        seed: int,
        shuffle: bool,
        rank: int = 0,
        num_replicas: int = 1,
        **kwargs,
    ) -> None:
        self.epoch_order = EpochOrder(len(dataset), seed, shuffle, rank, num_replicas)
        super().__init__(dataset, batch_size=batch_size, sampler=self.epoch_order, **kwargs)
        self.served = 0
        self._resume: dict[str, int] | None = None

    def __iter__(self):
        self.served = 0
        resume, self._resume = self._resume, None
        if resume and resume["epoch"] == self.epoch_order.epoch and 0 < resume["batches"] < len(self):
            self.served = resume["batches"]
            self.epoch_order.start = self.served * self.batch_size
        for batch in super().__iter__():
            self.served += 1
            yield batch

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch_order.epoch, "batches": self.served}

    def resume_at(self, position: dict[str, int]) -> None:
        self._resume = {"epoch": int(position["epoch"]), "batches": int(position["batches"])}


class TokenWindowDataModule(LightningDataModule):
    """Language-model windows: each sample is `seq_len + 1` consecutive tokens (input `x[:-1]`, target `x[1:]`),
    batches are int64 tensors of shape (batch, seq_len + 1). Windows never overlap.

    Sources (`source`): "wikitext-2", "wikitext-103" (own validation split), "pile" (Hub `NeelNanda/pile-10k`),
    "text" / "jsonl" / "local" (a local file at `path`; "local" picks by suffix; jsonl reads `text_field`).
    A local copy under `data_dir` (default `$KVCOMPRESS_DATA_DIR`) is used without asking the Hub; offline
    WikiText-2 trains on test.txt and validates on valid.txt. `num_samples` windows in total (None: all),
    `val_fraction` of them for validation; with a validation split the counts are taken from each split (capped,
    with a warning, by what exists). `num_val_windows` asks for a fixed number of validation windows whatever
    `num_samples` says (the training count stays `num_samples - round(num_samples * val_fraction)`, or every
    remaining window when `num_samples` is None).

    The validation windows are chosen by `eval_seed`, not by `seed`, so every run of a table (every seed and every
    row) is scored on the same windows; with one split (the Pile, a local file) they are drawn first, by
    `eval_seed`, and the training windows then by `seed` from the rest. `info` records the sha256 of the window
    ids of each split and how many windows were asked for and not found (`windows_short_by`). Token streams are
    cached in `cache_dir` (default `$KVCOMPRESS_CACHE_DIR` or ~/.cache/kvcompress).

    Nothing is loaded before `prepare_data()` / `setup()`; `setup("fit")` raises every data error before training.
    """

    def __init__(
        self,
        source: str = "wikitext-2",
        seq_len: int = 128,
        num_samples: int | None = 10_000,
        val_fraction: float = 0.1,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        eval_seed: int = 0,
        num_val_windows: int | None = None,
        cache_dir: str | os.PathLike | None = None,
        data_dir: str | os.PathLike | None = None,
        tokenizer: str = DEFAULT_TOKENIZER,
        path: str | os.PathLike | None = None,
        text_field: str = "text",
        hub_id: str | None = None,
        hub_config: str | None = None,
        hub_revision: str | None = None,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"unknown data source {source!r}; known sources: {sorted(SOURCES)}")
        if not 0.0 < float(val_fraction) < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if int(seq_len) < 1 or int(batch_size) < 1 or int(num_workers) < 0:
            raise ValueError(
                f"need seq_len >= 1, batch_size >= 1, num_workers >= 0 (got {seq_len}, {batch_size}, {num_workers})"
            )
        if eval_batch_size is not None and (
            isinstance(eval_batch_size, bool) or not isinstance(eval_batch_size, int) or eval_batch_size < 1
        ):
            raise ValueError(
                f"data.eval_batch_size must be an integer >= 1 (or null: data.batch_size), got {eval_batch_size!r}"
            )
        for name, value in (("eval_seed", eval_seed), ("num_val_windows", num_val_windows)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"data.{name} must be an integer >= 0, got {value!r}")
        if num_val_windows == 0:
            raise ValueError("data.num_val_windows must be null (from num_samples and val_fraction) or >= 1, got 0")
        if SOURCES[source].hub_id is None and path is None:
            raise ValueError(f"source {source!r} needs path=<a local text or jsonl file>")
        self.save_hyperparameters(logger=False)  # the run record is the logged config; these are only defaults
        self.source = source
        self.seq_len = int(seq_len)
        self.num_samples = None if num_samples is None else int(num_samples)
        self.val_fraction = float(val_fraction)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(batch_size if eval_batch_size is None else eval_batch_size)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.eval_seed = int(eval_seed)
        self.fixed_val_windows = None if num_val_windows is None else int(num_val_windows)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.data_dir = data_dir
        self.tokenizer_name = tokenizer
        self.path = path
        self.text_field = text_field
        self.hub_id, self.hub_config, self.hub_revision = hub_id, hub_config, hub_revision
        self.pin_memory = pin_memory
        if self.num_samples is not None:
            self._requested_counts()  # fail now on num_samples too small to split

        self.tokenizer: TextTokenizer | None = None
        self.base_train_dataset: TokenWindowDataset | None = None  # every selected train window
        self.train_dataset: TokenWindowDataset | None = None  # what is trained on (a subset after set_train_indices)
        self.val_dataset: TokenWindowDataset | None = None
        self.info: dict[str, Any] = {}  # origins, token and window counts: for logs and reports
        self._train_positions: np.ndarray | None = None
        self._train_loader: ResumableLoader | None = None  # the training loader in use (its position is saved)
        self._resume_position: dict[str, int] | None = None
        self._train_weights: np.ndarray | None = None

    # --- loading -------------------------------------------------------------------------------------------------

    @property
    def window(self) -> int:
        """Tokens per sample: `seq_len + 1`."""
        return self.seq_len + 1

    def _requested_counts(self) -> tuple[int, int]:
        """(train, val) windows asked for by `num_samples` and `val_fraction`."""
        assert self.num_samples is not None
        n_val = max(1, round(self.num_samples * self.val_fraction))
        n_train = self.num_samples - n_val
        if n_train < 1:
            raise ValueError(
                f"num_samples={self.num_samples} with val_fraction={self.val_fraction} leaves no training window"
            )
        return n_train, n_val

    def _splits(self) -> tuple[TextTokenizer, dict[str, SplitSource]]:
        tok = load_tokenizer(self.tokenizer_name, data_dir=self.data_dir)
        splits = resolve_source(
            self.source,
            path=self.path,
            data_dir_=self.data_dir,
            hub_id=self.hub_id,
            hub_config=self.hub_config,
            hub_revision=self.hub_revision,
            text_field=self.text_field,
        )
        return tok, splits

    def prepare_data(self) -> None:
        """Tokenize and cache every split (once, on one process); `setup` then only reads the cache."""
        tok, splits = self._splits()
        for split in splits.values():
            load_tokens(split, tok, self.cache_dir)

    def _windows(self, split: SplitSource, tokens: np.ndarray) -> int:
        n = tokens.size // self.window
        if n == 0:
            raise ValueError(
                f"data set {split.dataset!r} ({split.split}, {split.origin}) has {tokens.size} tokens: not one "
                f"window of seq_len + 1 = {self.window} tokens. Use more data or a smaller seq_len."
            )
        return n

    def _warn_short(self, split: SplitSource, n_want: int, n_got: int, n_exist: int) -> None:
        log.warning(
            "%s %s (%s): %d windows of %d tokens were asked for (num_samples=%s, val_fraction=%s, "
            "num_val_windows=%s) but only %d exist in the split; using %d (metrics.json: "
            "data.splits.*.windows_short_by)",
            split.dataset,
            split.split,
            split.origin,
            n_want,
            self.window,
            self.num_samples,
            self.val_fraction,
            self.fixed_val_windows,
            n_exist,
            n_got,
        )

    def _pick(
        self, split: SplitSource, candidates: np.ndarray, n_want: int | None, seed: int, stream: int, n_exist: int
    ) -> np.ndarray:
        """`n_want` of the window numbers `candidates` (a choice seeded by (seed, stream), in stream order); all of
        them when fewer exist (with a warning)."""
        if n_want is None or n_want >= len(candidates):
            if n_want is not None and n_want > len(candidates):
                self._warn_short(split, n_want, len(candidates), n_exist)
            return np.sort(candidates)
        rng = np.random.default_rng([seed % 2**32, stream])
        return np.sort(candidates[rng.permutation(len(candidates))[:n_want]])

    def _wanted(self) -> tuple[int | None, int | None]:
        """(train, val) windows asked for; None: all there are (train) or val_fraction of them (one split)."""
        want_train, want_val = self._requested_counts() if self.num_samples is not None else (None, None)
        return want_train, self.fixed_val_windows if self.fixed_val_windows is not None else want_val

    def setup(self, stage: str | None = None) -> None:
        """Load the token streams (from the cache, tokenizing on a miss) and select the windows.

        Raises before any training: DataUnavailableError (no local copy and no Hub), ValueError (zero windows,
        too few windows to split, bad jsonl)."""
        if self.val_dataset is not None:
            return
        tok, splits = self._splits()
        streams = {name: load_token_stream(split, tok, self.cache_dir) for name, split in splits.items()}
        loaded = {name: (stream.tokens, stream.cached) for name, stream in streams.items()}
        n_windows = {name: self._windows(splits[name], tokens) for name, (tokens, _) in loaded.items()}
        want_train, want_val = self._wanted()

        if ALL in splits:  # one split: the validation windows first (by eval_seed), training from the rest (by seed)
            split, n_avail = splits[ALL], n_windows[ALL]
            if n_avail < 2:
                raise ValueError(
                    f"data set {split.dataset!r} ({split.origin}) has {loaded[ALL][0].size} tokens: "
                    f"{n_avail} window of {self.window} tokens, at least 2 are needed (train + val)"
                )
            fewer = self.num_samples is not None and self.num_samples > n_avail
            if want_val is None or (fewer and self.fixed_val_windows is None):
                n_val = max(1, round(n_avail * self.val_fraction))  # val_fraction of what exists
            else:
                n_val = want_val
            n_val = min(n_val, n_avail - 1)
            if want_val is not None and n_val < want_val:
                self._warn_short(split, want_val, n_val, n_avail)
            order = np.random.default_rng([self.eval_seed % 2**32, 2]).permutation(n_avail)
            val_idx = np.sort(order[:n_val])
            train_idx = self._pick(split, np.sort(order[n_val:]), want_train, self.seed, 0, n_avail)
            train_tokens = val_tokens = loaded[ALL][0]
        else:  # own validation split: count from each
            n_train, n_val = n_windows[TRAIN], n_windows[VAL]
            train_idx = self._pick(splits[TRAIN], np.arange(n_train), want_train, self.seed, 0, n_train)
            val_idx = self._pick(splits[VAL], np.arange(n_val), want_val, self.eval_seed, 2, n_val)
            train_tokens, val_tokens = loaded[TRAIN][0], loaded[VAL][0]

        self.tokenizer = tok
        self.base_train_dataset = TokenWindowDataset(train_tokens, self.window, train_idx)
        self.val_dataset = TokenWindowDataset(val_tokens, self.window, val_idx)
        self._select_train()
        self.info = {
            "source": self.source,
            "seq_len": self.seq_len,
            "tokenizer": tok.source,
            "tokenizer_sha256": tok.fingerprint,  # (hashed once for the token cache's keys)
            "seed": self.seed,
            "eval_seed": self.eval_seed,
            "splits": {
                name: {
                    "origin": s.origin,
                    "identity": s.identity,  # the file's sha256 (or the Hub id, config, split, revision)
                    "tokens_sha256": streams[name].sha256,
                    "tokens": int(loaded[name][0].size),
                    "windows": n_windows[name],
                    "cached": loaded[name][1],
                }
                for name, s in splits.items()
            },
            "selected": {  # the windows used, by split
                name: {
                    "windows_asked": want,
                    "windows_short_by": 0 if want is None else max(0, want - len(idx)),
                    "window_ids_sha256": window_ids_sha256(idx),
                }
                for name, want, idx in (("train", want_train, train_idx), ("validation", want_val, val_idx))
            },
            "train_windows": self.num_train_windows,
            "val_windows": self.num_val_windows,
        }
        log.info("data: %s", self.info)

    # --- hooks and sizes -----------------------------------------------------------------------------------------

    def set_train_indices(self, positions: Sequence[int] | np.ndarray | torch.Tensor | None) -> None:
        """Train on a subset of the train windows (e.g. mined hard examples): `positions` index the full train set
        (`base_train_dataset`, in its order); None restores it. Takes effect for dataloaders built afterwards."""
        self._train_positions = (
            None
            if positions is None
            else np.asarray(positions.cpu() if isinstance(positions, torch.Tensor) else positions, dtype=np.int64)
        )
        self._select_train()

    def set_train_weights(self, weights: np.ndarray | torch.Tensor | None) -> None:
        """Per-token loss weights (train windows, seq_len) over the full train set, in its order: train batches
        become dicts `{"ids", "weight"}`; None restores plain batches. Takes effect for dataloaders built afterwards."""
        self._train_weights = weights.cpu().numpy() if isinstance(weights, torch.Tensor) else weights
        self._select_train()

    def _select_train(self) -> None:
        if self.base_train_dataset is None:
            return  # applied by setup()
        base = self.base_train_dataset
        if self._train_weights is not None:
            base = base.with_weights(self._train_weights)
        self.train_dataset = base if self._train_positions is None else base.subset(self._train_positions)

    def _ready(self) -> tuple[TokenWindowDataset, TokenWindowDataset]:
        """The (train, val) datasets."""
        if self.train_dataset is None or self.val_dataset is None:
            raise RuntimeError("call setup() first")
        return self.train_dataset, self.val_dataset

    @property
    def num_train_windows(self) -> int:
        return len(self._ready()[0])

    @property
    def num_val_windows(self) -> int:
        return len(self._ready()[1])

    @property
    def vocab_size(self) -> int:
        """The tokenizer's id range (largest id + 1); loads only the tokenizer when called before `setup`."""
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.tokenizer_name, data_dir=self.data_dir)
        return self.tokenizer.vocab_size

    # --- loaders -------------------------------------------------------------------------------------------------

    def _loader(
        self, dataset: TokenWindowDataset, batch_size: int, shuffle: bool, shard: bool = False
    ) -> ResumableLoader:
        """`shard`: when Lightning trains on several processes, this rank's share of every epoch."""
        trainer = self.trainer if shard else None
        return ResumableLoader(
            dataset,
            batch_size=batch_size,
            seed=self.seed,
            shuffle=shuffle,
            rank=trainer.global_rank if trainer else 0,
            num_replicas=trainer.world_size if trainer else 1,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self, shuffle: bool = True) -> DataLoader:
        """Shuffled in an order fixed by (seed, epoch); `shuffle=False` gives stream order (e.g. to score every
        window). A shuffled loader resumes where a restored checkpoint left off (see `load_state_dict`)."""
        train, _ = self._ready()
        loader = self._loader(train, self.batch_size, shuffle, shard=shuffle)
        if shuffle:
            self._train_loader = loader
            if self._resume_position is not None:
                loader.resume_at(self._resume_position)
                self._resume_position = None
        return loader

    # Lightning saves these in every checkpoint and restores them before it builds the training loader: a
    # checkpoint taken mid-epoch resumes with the batches that were still to come.
    def state_dict(self) -> dict[str, Any]:
        return {"train_loader": self._train_loader.position()} if self._train_loader is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume_position = state_dict.get("train_loader")

    def val_dataloader(self, shard: bool = True) -> DataLoader:
        """Stream order; under DDP each rank gets its share unless `shard=False`."""
        _, val = self._ready()
        return self._loader(val, self.eval_batch_size, False, shard)
