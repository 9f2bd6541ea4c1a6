"""Shared test helpers (imported by the test modules; pytest puts this folder on sys.path)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from kvcompress.models import GPTNeoX, ModelConfig, generate
from kvcompress.training import LMModule, PhaseRunner


def randomized(model: GPTNeoX, std: float = 0.2, seed: int = 0, dtype: torch.dtype | None = None) -> GPTNeoX:
    """Scaled-up random weights, biases included, so attention is far from uniform and wiring errors show."""
    if dtype is not None:
        model = model.to(dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
    return model.eval()


def random_ids(B: int, T: int, vocab: int = 512, seed: int = 0) -> Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def assert_cached_equals_uncached(
    model: GPTNeoX, prompt: Tensor, new_tokens: int, temperature: float = 0.0, seed: int = 0, atol: float = 1e-10
) -> Tensor:
    """Decoding with and without the cache gives the same tokens and logits (sampling from one seed)."""
    runs = [
        generate(
            model,
            prompt,
            new_tokens,
            temperature=temperature,
            generator=torch.Generator().manual_seed(seed),
            use_cache=use_cache,
            return_logits=True,
        )
        for use_cache in (True, False)
    ]
    (tok_c, log_c), (tok_u, log_u) = runs
    assert torch.equal(tok_c, tok_u)
    torch.testing.assert_close(log_c, log_u, atol=atol, rtol=0)
    return tok_c


class RandomTokens(L.LightningDataModule):
    def __init__(self, n: int = 32, seq_len: int = 16, batch_size: int = 8, vocab: int = 512) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.train = torch.randint(0, vocab, (n, seq_len + 1), generator=g)
        self.val = torch.randint(0, vocab, (n // 4, seq_len + 1), generator=g)
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(
            TensorDataset(self.train), batch_size=self.batch_size, collate_fn=lambda b: torch.stack([x[0] for x in b])
        )

    def val_dataloader(self):
        return DataLoader(
            TensorDataset(self.val), batch_size=self.batch_size, collate_fn=lambda b: torch.stack([x[0] for x in b])
        )


def make_runner(tmp_path, stages, net=None, reuse=True, extra_callbacks=list, fingerprint=None, **runner_kwargs):
    torch.manual_seed(0)
    net = net or GPTNeoX(ModelConfig.from_name("tiny"))

    def make_trainer(stage, callbacks, max_epochs):
        return L.Trainer(
            accelerator="cpu",
            max_epochs=max_epochs,
            callbacks=callbacks,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            inference_mode=False,
        )

    def make_module(model, stage):
        return LMModule(model, partial(torch.optim.AdamW, lr=stage.lr), losses=stage.losses, metric_prefix=stage.name)

    return PhaseRunner(
        net,
        stages,
        make_datamodule=lambda overrides: RandomTokens(**overrides),
        make_trainer=make_trainer,
        make_module=make_module,
        stage_root=tmp_path / "stages",
        fingerprint=fingerprint or {"model": "tiny"},
        reuse=reuse,
        extra_callbacks=extra_callbacks,
        **runner_kwargs,
    )


def train_tokenizer(corpus: list[str], path: Path, vocab_size: int = 400) -> str:
    """A byte-level BPE with "<|endoftext|>", trained on `corpus` in milliseconds, saved as `path` (tokenizer.json).

    For tests that need *a* tokenizer, not Pythia's: they run on any machine, without the offline data."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    tok.save(str(path))
    return str(path)


def wandb_offline_run(run_dir: Path, timeout: float = 20.0) -> dict:
    """The config, name, group and tags an offline W&B run recorded, read from its `run-*.wandb` file (waiting
    for W&B's writer process to log the run's exit record).

    The file is W&B's LevelDB-style log (a 7-byte header, then 32 KiB blocks of records, each with a 7-byte
    header: crc, length, type FULL/FIRST/MIDDLE/LAST) of `wandb_internal_pb2.Record` protobufs."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        out = _read_wandb_records(run_dir)
        if out["exited"] or time.monotonic() > deadline:
            return out
        time.sleep(0.2)


def _read_wandb_records(run_dir: Path) -> dict:
    import json
    import struct

    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunk, out = 7, 32768, b"", {"config": {}, "exited": False}
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind not in (1, 4):  # FIRST / MIDDLE: the record goes on
            continue
        record = wandb_internal_pb2.Record()
        record.ParseFromString(chunk)
        chunk = b""
        kind_name = record.WhichOneof("record_type")
        if kind_name == "run":
            out.update(name=record.run.display_name, group=record.run.run_group, tags=list(record.run.tags))
        update = record.run.config.update if kind_name == "run" else record.config.update
        if kind_name in ("run", "config"):
            out["config"].update({item.key: json.loads(item.value_json) for item in update})
        out["exited"] |= kind_name == "exit"
    return out
