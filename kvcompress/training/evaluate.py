"""End-of-run evaluation: the numbers every run records beside its val PPL."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from kvcompress import evaluation
from kvcompress.models import GPTNeoX, KVCache


def kv_bytes_per_token(net: GPTNeoX) -> float:
    """The standard [K, V] cache's bytes per token for this shape, measured from KVCache tensors."""
    param = net.embed_out.weight
    caches = [KVCache(1, 8, net.cfg.n_head, net.cfg.head_size, param.device, param.dtype) for _ in net.layers]
    return sum(c.nbytes() for c in caches) / 8


@torch.no_grad()
def run_evaluation(net: GPTNeoX, datamodule: L.LightningDataModule, cfg: dict[str, Any]) -> dict[str, Any]:
    net.eval()
    kind = cfg.get("cache", "native")
    ours = evaluation.cache_bytes_per_token(net, cache=kind)
    kv = kv_bytes_per_token(net)
    out: dict[str, Any] = {
        "cache": {"kind": kind, "bytes_per_token": ours, "kv_bytes_per_token": kv, "reduction": 1 - ours / kv},
    }
    decode = cfg.get("decode") or {}
    if decode.get("new_tokens", 0) > 0:
        out["decode_tokens_per_s"] = evaluation.decode_tokens_per_second(
            net, decode["batch_size"], decode["prompt_len"], decode["new_tokens"], cache=kind
        )
    ar = cfg.get("autoregressive") or {}
    if ar.get("enabled"):
        parallel, autoregressive = [], []
        for i, batch in enumerate(datamodule.val_dataloader()):
            if i >= ar.get("max_batches", 8):
                break
            batch = batch.to(net.embed_out.weight.device)
            parallel.append(evaluation.token_losses(net, batch))
            autoregressive.append(evaluation.autoregressive_token_losses(net, batch, cache=kind))
        parallel_losses, ar_losses = torch.cat(parallel), torch.cat(autoregressive)
        out["parallel_ppl"] = evaluation.perplexity(parallel_losses)
        out["autoregressive_ppl"] = evaluation.perplexity(ar_losses)
        out["autoregressive_pos_ppl"] = evaluation.position_ppl(ar_losses)
    reversal = cfg.get("reversal") or {}
    if reversal.get("enabled"):
        probe_cache = kind if ar.get("enabled") else None
        out["reversal"] = evaluation.reversal_probe(
            net, datamodule.tokenizer, n_facts=reversal.get("n_facts", 100), cache=probe_cache
        )
    return out
