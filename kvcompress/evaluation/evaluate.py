"""The end-of-run evaluation of a trained net: the numbers every run (and `python -m kvcompress.eval`) records
beside its val PPL, computed with `kvcompress.evaluation.metrics`, for the run's cache and every cache in
`eval.caches`, each with its own settings."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch

from kvcompress.config import CacheConfig, EvalConfig
from kvcompress.evaluation import metrics
from kvcompress.models import GPTNeoX

log = logging.getLogger(__name__)
PLAIN_KINDS = ("kv", "native")  # the caches the others are measured against


def _val_batches(datamodule: L.LightningDataModule, max_batches: int, device: torch.device) -> list[torch.Tensor]:
    batches = []
    for i, batch in enumerate(datamodule.val_dataloader(shard=False)):  # type: ignore[call-arg]  # all of it
        if i >= max_batches:
            break
        batches.append(batch.to(device))
    return batches


@torch.no_grad()
def evaluate_cache(net: GPTNeoX, cache: CacheConfig, cfg: EvalConfig, batches: list[torch.Tensor]) -> dict[str, Any]:
    """Measured size, decode speed and (optionally) autoregressive PPL of one cache kind with its settings."""
    kind, kwargs = cache.name, cache.kwargs
    ours = metrics.cache_bytes_per_token(net, cache=kind, **kwargs)
    kv = metrics.kv_bytes_per_token(net)
    out: dict[str, Any] = {"kind": kind, "bytes_per_token": ours, "kv_bytes_per_token": kv, "reduction": 1 - ours / kv}
    if kwargs:
        out["kwargs"] = dict(kwargs)
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
            **kwargs,
        )
        out.update(speed)  # ttft_s, tpot_s, decode_tokens_per_s = batch_size / tpot_s
    if batches:
        losses = torch.cat([metrics.autoregressive_token_losses(net, b, kind, **kwargs) for b in batches])
        out["autoregressive_ppl"] = metrics.perplexity(losses)
        out["autoregressive_pos_ppl"] = metrics.position_ppl(losses)
    return out


@torch.no_grad()
def evaluate(net: GPTNeoX, datamodule: L.LightningDataModule, cfg: EvalConfig | None = None) -> dict[str, Any]:
    """`cfg.cache` is the run's cache; `cfg.caches` lists more to compare (e.g. report 000: kv, ka_plain, ka).

    Results: `cache` (the run's), `caches` (every one, by its key: the kind's name, or name(settings)), and the
    run's TTFT / TPOT / autoregressive PPL at the top level."""
    cfg = cfg or EvalConfig()
    net.eval()
    device = net.embed_out.weight.device
    ar = cfg.autoregressive
    batches = _val_batches(datamodule, ar.max_batches, device) if ar.enabled else []
    main = cfg.cache
    per_cache = {key: evaluate_cache(net, cache, cfg, batches) for key, cache in cfg.all_caches().items()}
    warn_about_caches(net, cfg, per_cache, int(getattr(datamodule, "seq_len", 128)))
    main_result = next(iter(per_cache.values()))
    out: dict[str, Any] = {"cache": main_result, "caches": per_cache}
    for key in ("decode_tokens_per_s", "ttft_s", "tpot_s"):
        if key in main_result:
            out[key] = main_result[key]
    if batches:  # the teacher-forced PPL on the same batches, next to the autoregressive one
        out["parallel_ppl"] = metrics.perplexity(torch.cat([metrics.token_losses(net, b) for b in batches]))
        out["autoregressive_ppl"] = main_result["autoregressive_ppl"]
    if cfg.reversal.enabled:
        out["reversal"] = metrics.reversal_probe(
            net,
            datamodule.tokenizer,  # type: ignore[attr-defined]
            n_facts=cfg.reversal.n_facts,
            cache=main.name if batches else None,
            cache_kwargs=main.kwargs,
        )
    return out


def warn_about_caches(net: GPTNeoX, cfg: EvalConfig, results: dict[str, dict[str, Any]], seq_len: int) -> None:
    """A cache that at its settings equals another (e.g. int4 whose window holds the whole context) or holds more
    than KV gets a `note` in its results (the report marks it) and one warning line for all of them."""
    for key, cache in cfg.all_caches().items():
        result, notes = results[key], []
        same = net.build_caches(1, seq_len, kind=cache.name, device="meta", **cache.kwargs)[0].equals()
        if same and same != cache.name:
            notes.append(f"equals {same} at {seq_len}-token windows")
        if cache.name not in PLAIN_KINDS and result["bytes_per_token"] > result["kv_bytes_per_token"]:
            ours, kv = result["bytes_per_token"], result["kv_bytes_per_token"]
            notes.append(f"holds more than KV ({ours:.0f} vs {kv:.0f} B/token)")
        if notes:
            result["note"] = "; ".join(notes)
    noted = [f"{key} {results[key]['note']}" for key in results if "note" in results[key]]
    if noted:
        log.warning("eval caches: %s (check their settings)", "; ".join(noted))
