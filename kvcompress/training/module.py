"""The base LightningModule: LM loss plus any auxiliary losses the attention layers emit."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.optim.lr_scheduler import LRScheduler
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from kvcompress.data.batch import Batch, split_batch
from kvcompress.models import GPTNeoX


def token_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-token CE (B, T), in fp32."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)


def weighted_mean(token_losses: Tensor, weight: Tensor | None = None) -> Tensor:
    """Mean of per-token losses, weighted per token when `weight` is given (all-zero weights give 0)."""
    if weight is None:
        return token_losses.mean()
    weight = weight.to(token_losses.dtype)
    return (token_losses * weight).sum() / weight.sum().clamp_min(torch.finfo(weight.dtype).tiny)


class NonFiniteLossError(RuntimeError):
    """Raised when the training loss becomes NaN/inf; checkpoints written before it are kept."""


def loss_weight(spec: float | Mapping[str, float], progress: float) -> float:
    """A loss weight: a constant, or `{start, end}` moved linearly over the stage (progress in [0, 1])."""
    if isinstance(spec, int | float):
        return float(spec)
    return float(spec["start"]) + (float(spec["end"]) - float(spec["start"])) * min(max(progress, 0.0), 1.0)


class LMModule(L.LightningModule):
    """Trains a `GPTNeoX` on next-token prediction.

    Losses are named: `lm` is the cross-entropy; any other name is an auxiliary loss that attention
    layers add to the forward's `aux` dict (e.g. `recon` for V-DProj, `adapter` for the KA adapter),
    averaged over layers. `losses` maps names to weights (constants or `{start, end}` schedules).
    Metrics are logged under `metric_prefix` (the stage name), e.g. `lm/val_ppl`, the learning rate too
    (`lm/lr-AdamW`, via the scheduler's name). `scheduler` is a partial `scheduler(optimizer, ...)` such as
    transformers' `get_cosine_with_min_lr_schedule_with_warmup`, completed with `num_training_steps` (the
    stage's step total) when it takes one; None: a constant lr.
    Validation steps return per-token losses (B, T) for callbacks such as position-wise PPL.
    A method that trains differently subclasses this and overrides hooks: `compute_losses(batch)` (the named
    training losses) and `extra_val_metrics()` (see `kvcompress.training.lego.LegoModule`).
    """

    def __init__(
        self,
        net: GPTNeoX,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., LRScheduler] | None = None,
        losses: Mapping[str, Any] | None = None,
        metric_prefix: str = "lm",
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.net = net
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.losses = dict(losses or {"lm": 1.0})
        self.metric_prefix = metric_prefix
        self.compile = compile
        self.forward_fn: Callable[..., Tensor] = net
        self.total_steps = 0  # set by configure_optimizers; loss-weight schedules run over it
        vocab = net.cfg.vocab_size
        self.train_loss = MeanMetric()
        self.val_loss = MeanMetric()
        self.val_acc = MulticlassAccuracy(num_classes=vocab, top_k=1, average="micro")
        self._aux_metrics = torch.nn.ModuleDict()

    def configure_model(self) -> None:
        if self.compile and self.forward_fn is self.net:
            self.forward_fn = torch.compile(self.net)

    def _aux_metric(self, name: str) -> MeanMetric:
        if name not in self._aux_metrics:
            self._aux_metrics[name] = MeanMetric().to(self.device)
        return self._aux_metrics[name]

    def step(self, ids: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Per-token losses (B, T), logits, and the per-name auxiliary losses (each averaged over layers)."""
        inputs, targets = ids[:, :-1], ids[:, 1:]
        # The weighted names arrive as keys, so a layer may compute a costly loss only when it is asked for.
        aux: dict[str, list[Tensor]] = {name: [] for name in self.losses if name != "lm"}
        logits = self.forward_fn(inputs, aux=aux)
        aux_losses = {name: torch.stack(values).mean() for name, values in aux.items() if values}
        return token_cross_entropy(logits, targets), logits, aux_losses

    def compute_losses(self, batch: Batch) -> dict[str, Tensor]:
        """The named training losses of a batch: `lm` (token-weighted when the batch has weights) and the aux ones."""
        ids, weight = split_batch(batch)
        token_losses, _, aux_losses = self.step(ids)
        return {"lm": weighted_mean(token_losses, weight), **aux_losses}

    def progress(self) -> float:
        return self.global_step / self.total_steps if self.total_steps else 0.0

    def objective(self, losses: Mapping[str, Tensor]) -> Tensor:
        progress = self.progress()
        total = next(iter(losses.values())).new_zeros(())
        for name, spec in self.losses.items():
            if name not in losses:
                raise KeyError(f"loss {name!r} was not produced by this model (it produced {sorted(losses)})")
            total = total + loss_weight(spec, progress) * losses[name]
        return total

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        losses = self.compute_losses(batch)
        loss = self.objective(losses)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"{self.metric_prefix}: loss is {loss.item()} at step {self.global_step}; stopping. "
                "Checkpoints written before this step are kept."
            )
        p = self.metric_prefix
        self.train_loss(loss.detach())
        self.log(f"{p}/train_loss", loss.detach(), prog_bar=True)
        self.log(f"{p}/train_loss_epoch", self.train_loss, on_step=False, on_epoch=True)
        for name, value in losses.items():
            self.log(f"{p}/train_{name}", value.detach())
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> dict[str, Tensor]:
        ids, _ = split_batch(batch)
        token_losses, logits, aux_losses = self.step(ids)
        self.update_val_metrics(token_losses, logits, ids[:, 1:], aux_losses)
        return {"token_losses": token_losses.detach()}

    def update_val_metrics(
        self, token_losses: Tensor, logits: Tensor, targets: Tensor, aux_losses: Mapping[str, Tensor]
    ) -> None:
        self.val_loss.update(token_losses.mean(), weight=token_losses.numel())
        self.val_acc.update(logits.argmax(-1).flatten(), targets.flatten())
        for name, value in aux_losses.items():
            self._aux_metric(name).update(value)

    def val_metric_names(self) -> set[str]:
        """What validation logs (without the stage prefix): what a stage may monitor. The auxiliary losses are those
        the model emits on a 3-token input (2 inputs: the unrolled KA loss scores at least one next token)."""
        with torch.no_grad():
            ids = torch.zeros(1, 3, dtype=torch.long, device=self.net.embed_out.weight.device)
            aux_losses = self.step(ids)[2]
        return {"val_loss", "val_ppl", "val_acc", *(f"val_{name}" for name in aux_losses)}

    def extra_val_metrics(self) -> dict[str, Tensor]:
        """Hook: more validation metrics, computed (and reset) at each validation end; logged as `<stage>/<name>`."""
        return {}

    def on_validation_epoch_end(self) -> None:
        p = self.metric_prefix
        val_loss = self.val_loss.compute()
        self.log(f"{p}/val_loss", val_loss, prog_bar=True)
        self.log(f"{p}/val_ppl", torch.exp(val_loss), prog_bar=True)
        self.log(f"{p}/val_acc", self.val_acc.compute())
        self.val_loss.reset()
        self.val_acc.reset()
        for name, metric in self._aux_metrics.items():
            if metric.update_count:
                self.log(f"{p}/val_{name}", metric.compute())
            metric.reset()
        for name, value in self.extra_val_metrics().items():
            self.log(f"{p}/{name}", value)

    def configure_optimizers(self):
        params = [p for p in self.net.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"stage {self.metric_prefix!r} has no trainable parameters")
        optimizer = self.optimizer_factory(params=params)
        total = self.trainer.estimated_stepping_batches
        self.total_steps = int(total) if math.isfinite(total) else 0
        scheduler = make_scheduler(self.scheduler_factory, optimizer, self.total_steps)
        name = f"{self.metric_prefix}/lr-{type(optimizer).__name__}"  # LearningRateMonitor's key
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": name}}


def make_scheduler(
    factory: Callable[..., LRScheduler] | None, optimizer: torch.optim.Optimizer, total_steps: int
) -> LRScheduler:
    """Complete a partial schedule: `factory(optimizer)`, plus `num_training_steps` when it takes it."""
    if factory is None:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    if "num_training_steps" in inspect.signature(factory).parameters:
        return factory(optimizer, num_training_steps=total_steps)
    return factory(optimizer)
