"""Shared test helpers (imported by the test modules; pytest puts this folder on sys.path)."""

from __future__ import annotations

from functools import partial

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


def make_runner(tmp_path, stages, net=None, reuse=True, extra_callbacks=list, fingerprint=None):
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
    )
