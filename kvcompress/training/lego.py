"""LEGO's Lightning side: `LegoModule` (per-exit losses and metrics) and the hooks of `phase=lego`.

Stage hooks (`hook(runner=, stage=, net=, datamodule=)`, returning metrics for the stage's record); a hook with
settings is a class that checks them when it is built, before any training:
- `MineHardExamples(ratio)` (after the shallow stage): the shallow exit's confidence on every train and validation
  token; the lowest `ratio` are hard. Saved in the stage folder (`hard_examples.safetensors`), so a reused stage
  reuses its mining. Records `hard_ppl_before` (shallow exit on the hard validation tokens).
- `extend_from_shallow` (before the deep stage): the deep exit starts as a copy of the phase-1 exit.
- `TrainOnHardExamples(selection)` (before the deep stage): token loss weights (1 on hard tokens, 0 elsewhere), or
  with `selection="sample"` the `ratio` windows of lowest mean confidence (`set_train_indices`).
- `Calibrate(ratio, threshold_from)` (after the deep stage): sets the model's threshold so `ratio` of validation
  tokens go deep, under the phase-2 model (`threshold_from="deep"`) or, as report 002 did, under the phase-1 model
  that mined them (`"mining"`: the shallow ratio then measures how phase 2 moved the confidences); records per-exit
  and routed PPL / accuracy, hard-token PPL after, shallow ratio and compute cost, and keeps the per-token losses
  and routes of every validation window in the stage folder (`calibration.safetensors`), so that hard-token PPL
  before and after can be paired window by window.
LEGO's decode speed is an end-of-run evaluation: `kvcompress.evaluation.lego.LegoDecodeBenchmark`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import load_file, save
from torch import Tensor
from torchmetrics import MeanMetric

from kvcompress.data.batch import Batch, split_batch
from kvcompress.evaluation.evaluate import val_window_ids
from kvcompress.methods import lego
from kvcompress.methods.lego import LegoGPTNeoX
from kvcompress.training.module import LMModule, token_cross_entropy, weighted_mean
from kvcompress.utils import atomic_write

log = logging.getLogger(__name__)

EXITS = ("shallow", "deep")  # loss and metric names of the two exits
MINING_FILE = "hard_examples.safetensors"
CALIBRATION_FILE = "calibration.safetensors"
SELECTIONS = ("token", "sample")
THRESHOLD_FROM = ("deep", "mining")


class LegoModule(LMModule):
    """Losses `shallow` and `deep`: each exit's cross-entropy, weighted per token when the batch carries weights.

    Only the layers the stage's losses need run (a `shallow`-only stage never runs the deep layers). The stage's
    `val_loss` / `val_ppl` / `val_acc` are those of its deepest trained exit; every computed exit also gets
    `val_ppl_<exit>` and `val_acc_<exit>`.
    """

    net: LegoGPTNeoX

    def __init__(self, net: LegoGPTNeoX, *args: Any, **kwargs: Any) -> None:
        super().__init__(net, *args, **kwargs)
        if not isinstance(net, LegoGPTNeoX):
            raise TypeError(f"module=lego trains a LEGO model (model=lego), got {type(net).__name__}")
        unknown = sorted(set(self.losses) - set(EXITS))
        if unknown:
            raise ValueError(f"stage {self.metric_prefix!r}: LEGO losses are {list(EXITS)}, got {unknown}")
        self.main_exit = "deep" if "deep" in self.losses else "shallow"
        self.upto = net.deep_exit if self.main_exit == "deep" else net.shallow_exit
        names = EXITS if self.main_exit == "deep" else ("shallow",)
        self.exit_metrics = torch.nn.ModuleDict({f"{n}_{k}": MeanMetric() for n in names for k in ("loss", "acc")})

    def exit_metric(self, key: str) -> MeanMetric:
        return cast(MeanMetric, self.exit_metrics[key])  # ModuleDict items are typed as Module

    def exit_logits(self, ids: Tensor) -> dict[str, Tensor]:
        out = self.net.forward_exits(ids[:, :-1], upto=self.upto)
        return {name: out[layer] for name, layer in zip(EXITS, self.net.exits) if layer in out}

    def compute_losses(self, batch: Batch) -> dict[str, Tensor]:
        ids, weight = split_batch(batch)
        if set(self.losses) == {"deep"}:  # the full forward: no shallow head to compute
            exits = {"deep": self.net(ids[:, :-1])}
        else:
            exits = self.exit_logits(ids)
        return {name: weighted_mean(token_cross_entropy(logits, ids[:, 1:]), weight) for name, logits in exits.items()}

    def validation_step(self, batch: Batch, batch_idx: int) -> dict[str, Tensor]:
        ids, _ = split_batch(batch)
        targets = ids[:, 1:]
        for name, logits in self.exit_logits(ids).items():
            token_losses = token_cross_entropy(logits, targets)
            n = token_losses.numel()
            self.exit_metric(f"{name}_loss").update(token_losses.mean(), weight=n)
            self.exit_metric(f"{name}_acc").update((logits.argmax(-1) == targets).float().mean(), weight=n)
            if name == self.main_exit:
                main = token_losses, logits
        self.update_val_metrics(*main, targets, {})
        return {"token_losses": main[0].detach()}

    def val_metric_names(self) -> set[str]:
        names = {"val_loss", "val_ppl", "val_acc"}
        return names | {f"val_{kind}_{key.rsplit('_', 1)[0]}" for key in self.exit_metrics for kind in ("ppl", "acc")}

    def extra_val_metrics(self) -> dict[str, Tensor]:
        out = {}
        for key in self.exit_metrics:
            name, kind = key.rsplit("_", 1)
            metric = self.exit_metric(key)
            if metric.update_count:
                value = metric.compute()
                out[f"val_ppl_{name}" if kind == "loss" else f"val_acc_{name}"] = (
                    torch.exp(value) if kind == "loss" else value
                )
            metric.reset()
        return out


# --- stage hooks -------------------------------------------------------------------------------------------------


def _check_lego(net: Any) -> LegoGPTNeoX:
    if not isinstance(net, LegoGPTNeoX):
        raise TypeError(f"phase=lego needs model=lego, got {type(net).__name__}")
    return net


def _ppl(losses: Tensor, mask: Tensor | None = None) -> float:
    picked = losses if mask is None else losses[mask]
    return math.exp(picked.double().mean().item()) if picked.numel() else float("nan")


@torch.no_grad()
def exit_stats(net: LegoGPTNeoX, loader, upto: int | None = None) -> dict[str, dict[str, Tensor]]:
    """Per exit: confidence, loss and correctness of every predicted token, (N, seq_len) in loader order."""
    was_training = net.training
    net.eval()
    device = net.embed_out.weight.device
    parts: dict[str, dict[str, list[Tensor]]] = {}
    for batch in loader:
        ids = split_batch(batch)[0].to(device)
        targets = ids[:, 1:]
        out = net.forward_exits(ids[:, :-1], upto=upto)
        for name, layer in zip(EXITS, net.exits):
            if layer not in out:
                continue
            logits = out[layer]
            stats = parts.setdefault(name, {"confidence": [], "loss": [], "correct": []})
            stats["confidence"].append(lego.confidence(logits).float().cpu())
            stats["loss"].append(token_cross_entropy(logits, targets).cpu())
            stats["correct"].append((logits.argmax(-1) == targets).cpu())
    net.train(was_training)
    return {name: {k: torch.cat(v) for k, v in stats.items()} for name, stats in parts.items()}


def find_mining(runner: Any) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The mining of the latest earlier stage that mined (its folder's `hard_examples.safetensors`)."""
    for result in reversed(runner.results):
        path = Path(result.weights).parent / MINING_FILE
        if path.is_file():
            return load_mining(path)
    raise RuntimeError(
        "no hard-example mining found: phase=lego's deep stage needs an earlier stage with "
        "kvcompress.training.lego.MineHardExamples in its `after` hooks"
    )


def load_mining(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    return load_file(str(path)), meta


class MineHardExamples:
    """After the shallow stage: score every train and validation token by the shallow exit's confidence; the
    lowest `ratio` are hard."""

    def __init__(self, ratio: float = 0.5) -> None:
        self.ratio = lego.check_ratio(ratio, "phase.hard_example_ratio")

    def __call__(self, *, runner: Any, stage: Any, net: Any, datamodule: Any) -> dict[str, Any]:
        net, ratio = _check_lego(net), self.ratio
        path = Path(runner.folder) / MINING_FILE
        train_n = len(datamodule.train_dataset)
        mining = None
        if path.is_file():  # a reused (or resumed) stage: the same weights, so the same mining
            mining, meta = load_mining(path)
            if meta.get("ratio") != repr(ratio) or mining["train_confidence"].shape[0] != train_n:
                log.warning("stage %s: %s was made for other settings; mining again", stage.name, path)
                mining = None
        reused = mining is not None
        if mining is None:
            if any(getattr(datamodule, name, None) is not None for name in ("_train_weights", "_train_positions")):
                raise RuntimeError("mining scores the full train set; it already has a selection or weights")
            train = exit_stats(net, datamodule.train_dataloader(shuffle=False), upto=net.shallow_exit)["shallow"]
            val = exit_stats(net, datamodule.val_dataloader(shard=False), upto=net.shallow_exit)["shallow"]
            mining = {
                "train_confidence": train["confidence"],
                "train_hard": lego.hard_mask(train["confidence"], ratio).to(torch.uint8),
                "val_confidence": val["confidence"],
                "val_hard": lego.hard_mask(val["confidence"], ratio).to(torch.uint8),
                "val_loss_before": val["loss"],
            }
            if runner.is_writer:  # under DDP every rank mines the same (unsharded) data; rank 0 keeps the file
                blob = save(mining, metadata={"ratio": repr(ratio), "stage": stage.name})
                atomic_write(path, lambda f: f.write(blob), mode="wb")
        hard_val = mining["val_hard"].bool()
        return {
            "mining_reused": int(reused),
            "hard_share_train": float(mining["train_hard"].float().mean()),
            "hard_confidence_max": float(mining["train_confidence"][mining["train_hard"].bool()].max()),
            "hard_ppl_before": _ppl(mining["val_loss_before"], hard_val),
            "easy_ppl_before": _ppl(mining["val_loss_before"], ~hard_val),
        }


@torch.no_grad()
def extend_from_shallow(*, runner: Any, stage: Any, net: Any, datamodule: Any) -> dict[str, Any]:
    """Phase 2 extends the phase-1 model by new layers: the deep exit's LayerNorm and head start as copies of
    the shallow exit's (which itself stays as phase 1 left it), so only the added layers start from scratch."""
    net = _check_lego(net)
    net.final_layer_norm.load_state_dict(net.shallow_head.norm.state_dict())
    net.embed_out.weight.copy_(net.shallow_head.out.weight)
    return {"deep_exit_from_shallow": 1}


class TrainOnHardExamples:
    """Before the deep stage: point the stage's data at the mined hard examples, as token weights
    (`selection="token"`) or as the hardest windows (`"sample"`)."""

    def __init__(self, selection: str = "token") -> None:
        if selection not in SELECTIONS:
            raise ValueError(f"phase.selection must be one of {list(SELECTIONS)}, got {selection!r}")
        self.selection = selection

    def __call__(self, *, runner: Any, stage: Any, net: Any, datamodule: Any) -> dict[str, Any]:
        mining, meta = find_mining(runner)
        if self.selection == "token":
            datamodule.set_train_weights(mining["train_hard"].float())
            return {"selection": self.selection}
        windows = lego.hard_windows(mining["train_confidence"], float(meta["ratio"]))
        datamodule.set_train_indices(windows)
        return {"selection": self.selection, "hard_windows": len(windows)}


class Calibrate:
    """After the deep stage: set the threshold that routes `ratio` of validation tokens deep; record the two-stage
    metrics."""

    def __init__(self, ratio: float = 0.5, threshold_from: str = "deep") -> None:
        self.ratio = lego.check_ratio(ratio, "phase.hard_example_ratio")
        if threshold_from not in THRESHOLD_FROM:
            raise ValueError(f"phase.threshold_from must be one of {list(THRESHOLD_FROM)}, got {threshold_from!r}")
        self.threshold_from = threshold_from

    def __call__(self, *, runner: Any, stage: Any, net: Any, datamodule: Any) -> dict[str, Any]:
        net, ratio = _check_lego(net), self.ratio
        stats = exit_stats(net, datamodule.val_dataloader(shard=False))  # all of it on every rank: one threshold
        shallow, deep = stats["shallow"], stats["deep"]
        mining, _ = find_mining(runner)
        calibrated_on = mining["val_confidence"] if self.threshold_from == "mining" else shallow["confidence"]
        threshold = lego.calibrate_threshold(calibrated_on, ratio)
        net.threshold.fill_(threshold)
        take = shallow["confidence"] >= threshold
        routed_loss = torch.where(take, shallow["loss"], deep["loss"])
        routed_correct = torch.where(take, shallow["correct"], deep["correct"])
        share = float(take.float().mean())
        out: dict[str, Any] = {
            "threshold": threshold,
            "threshold_from": self.threshold_from,
            "shallow_ratio": share,
            "compute_cost": lego.compute_cost(share, net.shallow_exit, net.deep_exit),
            "val_ppl_routed": _ppl(routed_loss),
            "val_acc_routed": float(routed_correct.float().mean()),
        }
        for name in EXITS:
            out[f"val_ppl_{name}"] = _ppl(stats[name]["loss"])
            out[f"val_acc_{name}"] = float(stats[name]["correct"].float().mean())
        hard = mining["val_hard"].bool()
        out["hard_ppl_before"] = _ppl(mining["val_loss_before"], hard)
        out["hard_ppl_after"] = _ppl(deep["loss"], hard)
        out["hard_ppl_after_routed"] = _ppl(routed_loss, hard)
        if runner.is_writer:
            tensors = {
                "ids": torch.from_numpy(val_window_ids(datamodule, len(take))),
                "val_loss_shallow": shallow["loss"],  # (windows, seq_len): the phase-2 model's, per exit
                "val_loss_deep": deep["loss"],
                "val_shallow_confidence": shallow["confidence"],
                "val_take_shallow": take.to(torch.uint8),
            }
            meta = {"threshold": repr(threshold), "threshold_from": self.threshold_from, "ratio": repr(ratio)}
            blob = save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta)
            atomic_write(Path(runner.folder) / CALIBRATION_FILE, lambda f: f.write(blob), mode="wb")
        return out
