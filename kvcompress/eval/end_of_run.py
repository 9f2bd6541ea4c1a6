"""The end-of-run evaluation of a trained net: the numbers every run (and `python -m kvcompress.eval`) records
beside its val PPL, computed with `kvcompress.eval.metrics`."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from kvcompress.config import EvalConfig
from kvcompress.eval import metrics
from kvcompress.models import GPTNeoX


def _val_batches(datamodule: L.LightningDataModule, max_batches: int, device: torch.device) -> list[torch.Tensor]:
    batches = []
    for i, batch in enumerate(datamodule.val_dataloader(shard=False)):  # all of it, also after a DDP fit
        if i >= max_batches:
            break
        batches.append(batch.to(device))
    return batches


@torch.no_grad()
def evaluate_cache(
    net: GPTNeoX, kind: str, cfg: EvalConfig, batches: list[torch.Tensor], **cache_kwargs: Any
) -> dict[str, Any]:
    """Measured size, decode speed and (optionally) autoregressive PPL of one cache kind."""
    ours = metrics.cache_bytes_per_token(net, cache=kind, **cache_kwargs)
    kv = metrics.kv_bytes_per_token(net)
    out: dict[str, Any] = {"bytes_per_token": ours, "kv_bytes_per_token": kv, "reduction": 1 - ours / kv}
    decode = cfg.decode
    if decode.new_tokens > 1:
        speed = metrics.decode_speed(
            net,
            decode.batch_size,
            decode.prompt_len,
            decode.new_tokens,
            cache=kind,
            repeats=decode.repeats,
            compile=decode.compile,
            **cache_kwargs,
        )
        out.update(speed)  # ttft_s, tpot_s, decode_tokens_per_s = batch_size / tpot_s
    if batches:
        losses = torch.cat([metrics.autoregressive_token_losses(net, b, kind, **cache_kwargs) for b in batches])
        out["autoregressive_ppl"] = metrics.perplexity(losses)
        out["autoregressive_pos_ppl"] = metrics.position_ppl(losses)
    return out


@torch.no_grad()
def run_evaluation(net: GPTNeoX, datamodule: L.LightningDataModule, cfg: EvalConfig | None = None) -> dict[str, Any]:
    """`cfg.cache` is the run's cache; `cfg.caches` lists more to compare (e.g. report 000: kv, ka_plain, ka)."""
    cfg = cfg or EvalConfig()
    net.eval()
    device = net.embed_out.weight.device
    main = cfg.cache
    kinds = [main, *[k for k in cfg.caches if k != main]]
    ar = cfg.autoregressive
    batches = _val_batches(datamodule, ar.max_batches, device) if ar.enabled else []
    kwargs = {main: cfg.cache_kwargs}  # the run's cache settings (e.g. int4's group_size)
    per_cache = {kind: evaluate_cache(net, kind, cfg, batches, **kwargs.get(kind, {})) for kind in kinds}
    out: dict[str, Any] = {"cache": {"kind": main, **per_cache[main]}, "caches": per_cache}
    for key in ("decode_tokens_per_s", "ttft_s", "tpot_s"):
        if key in per_cache[main]:
            out[key] = per_cache[main][key]
    if batches:  # the teacher-forced PPL on the same batches, next to the autoregressive one
        out["parallel_ppl"] = metrics.perplexity(torch.cat([metrics.token_losses(net, b) for b in batches]))
        out["autoregressive_ppl"] = per_cache[main]["autoregressive_ppl"]
    if cfg.reversal.enabled:
        out["reversal"] = metrics.reversal_probe(
            net, datamodule.tokenizer, n_facts=cfg.reversal.n_facts, cache=main if batches else None
        )
    return out
