"""The end-of-run evaluation of a trained net: the numbers every run (and `python -m kvcompress.eval`) records
beside its val PPL, computed with `kvcompress.evaluation.metrics`, for the run's cache and every cache in
`eval.caches`, each with its own settings; with `windows` given, also the per-window records of each cache and
of the context check (`kvcompress.evaluation.windows`)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from kvcompress.config import CacheConfig, ContextCheckConfig, EvalConfig
from kvcompress.data.tokenizer import TextTokenizer
from kvcompress.evaluation import long_context, metrics
from kvcompress.evaluation.windows import add_window_losses
from kvcompress.models import GPTNeoX

if TYPE_CHECKING:
    from kvcompress.data.datamodule import TokenWindowDataModule, TokenWindowDataset

log = logging.getLogger(__name__)
PLAIN_KINDS = ("kv", "native")  # the caches the others are measured against


def set_up_val_dataset(datamodule: TokenWindowDataModule) -> TokenWindowDataset:
    """The validation windows of a datamodule that has been set up."""
    if datamodule.val_dataset is None:
        raise RuntimeError("evaluation needs the datamodule set up: call datamodule.setup() first")
    return datamodule.val_dataset


def set_up_tokenizer(datamodule: TokenWindowDataModule) -> TextTokenizer:
    """The tokenizer of a datamodule that has been set up."""
    if datamodule.tokenizer is None:
        raise RuntimeError("evaluation needs the datamodule set up: call datamodule.setup() first")
    return datamodule.tokenizer


def _val_batches(datamodule: TokenWindowDataModule, max_batches: int, device: torch.device) -> list[torch.Tensor]:
    batches = []
    for i, batch in enumerate(datamodule.val_dataloader(shard=False)):  # all of it
        if i >= max_batches:
            break
        batches.append(batch.to(device))
    return batches


def val_window_ids(datamodule: TokenWindowDataModule, n: int) -> np.ndarray:
    """The ids of the first `n` validation windows in loader order (unsharded, unshuffled)."""
    dataset = getattr(datamodule, "val_dataset", None)
    indices = getattr(dataset, "indices", None)
    return np.asarray(indices[:n] if indices is not None else np.arange(n), dtype=np.int64)


@torch.no_grad()
def context_losses(net: GPTNeoX, batch: torch.Tensor, lo: int, hi: int, window: int, chunk: int = 512) -> torch.Tensor:
    """Per-token losses (B, hi - lo) at loss positions [lo, hi) of `batch` (B, T + 1), each predicted from only
    the last `window` tokens: the sub-windows `batch[:, p - window + 1 : p + 2]`, run as their own sequences
    (positions from 0), `chunk` of them at a time."""
    subs = torch.stack([batch[:, p - window + 1 : p + 2] for p in range(lo, hi)], dim=1).flatten(0, 1)
    losses = []
    for part in subs.split(chunk):
        logits = net(part[:, :-1], last_only=True)[:, -1]
        losses.append(F.cross_entropy(logits.float(), part[:, -1], reduction="none"))
    return torch.cat(losses).view(batch.shape[0], hi - lo)


@torch.no_grad()
def context_check(
    net: GPTNeoX,
    datamodule: TokenWindowDataModule,
    cfg: ContextCheckConfig,
    windows: dict[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Full context vs the last `cfg.window` tokens at the positions of `cfg` (see `ContextCheckConfig`):
    `{window, positions, windows, full_ppl, last<k>_ppl, ratio}` (ratio = last<k> / full); per window into
    `windows` as `context:full`, `context:last<k>`."""
    device = net.embed_out.weight.device
    seq_len = int(getattr(datamodule, "seq_len", 0)) or None
    full, last, n, lo, hi = [], [], 0, 0, 0
    for i, batch in enumerate(datamodule.val_dataloader(shard=False)):
        if cfg.max_batches is not None and i >= cfg.max_batches:
            break
        batch = batch.to(device)
        lo, hi = cfg.span(seq_len or batch.shape[1] - 1)
        full.append(metrics.token_losses(net, batch)[:, lo:hi].double())
        last.append(context_losses(net, batch, lo, hi, cfg.window).double())
        n += batch.shape[0]
    if n == 0:
        raise ValueError("eval.context_check: there is no validation batch to check")
    full_losses, last_losses = torch.cat(full), torch.cat(last)
    k = cfg.window
    if windows is not None:
        ids = val_window_ids(datamodule, n)
        windows["context:full"] = full_losses.mean(-1).cpu().numpy()
        windows[f"context:last{k}"] = last_losses.mean(-1).cpu().numpy()
        if "ids" not in windows or not np.array_equal(windows["ids"], ids):
            windows["context:ids"] = ids
    full_ppl, last_ppl = math.exp(float(full_losses.mean())), math.exp(float(last_losses.mean()))
    return {
        "window": k,
        "positions": [lo, hi],
        "windows": n,
        "full_ppl": full_ppl,
        f"last{k}_ppl": last_ppl,
        "ratio": last_ppl / full_ppl,
    }


@torch.no_grad()
def evaluate_cache(
    net: GPTNeoX,
    cache: CacheConfig,
    cfg: EvalConfig,
    batches: list[torch.Tensor],
    windows: dict[str, np.ndarray] | None = None,
    window_ids: np.ndarray | None = None,
    buckets: Sequence[tuple[int, int]] = metrics.DEFAULT_BUCKETS,
    key: str | None = None,
) -> dict[str, Any]:
    """Measured size, decode speed and (optionally) autoregressive PPL of one cache kind with its settings; the
    autoregressive per-window losses go into `windows` as `cache:<key>` (on the windows `window_ids`)."""
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
        if windows is not None and window_ids is not None:
            add_window_losses(windows, f"cache:{key or cache.key}", window_ids, losses, buckets)
        # Bytes at the length these windows decode to (a budget or a window of int4 depends on it).
        out["eval_bytes_per_token"] = metrics.cache_bytes_per_token(net, kind, losses.shape[1], **kwargs)
    return out


@torch.no_grad()
def evaluate(
    net: GPTNeoX,
    datamodule: TokenWindowDataModule,
    cfg: EvalConfig | None = None,
    windows: dict[str, np.ndarray] | None = None,
    buckets: Sequence[tuple[int, int]] = metrics.DEFAULT_BUCKETS,
) -> dict[str, Any]:
    """`cfg.cache` is the run's cache; `cfg.caches` lists more to compare (e.g. report 000: kv, ka_plain, ka).

    Results: `cache` (the run's), `caches` (every one, by its key: the kind's name, or name(settings)), the
    run's TTFT / TPOT / autoregressive PPL at the top level, and `context_check` when enabled. With `windows` (a
    dict of per-window records, e.g. the final validation's), the per-window losses of each autoregressive cache
    and of the context check are added to it, per position bucket of `buckets`."""
    cfg = cfg or EvalConfig()
    net.eval()
    device = net.embed_out.weight.device
    ar = cfg.autoregressive
    batches = _val_batches(datamodule, ar.max_batches, device) if ar.enabled else []
    main = cfg.cache
    ids = val_window_ids(datamodule, sum(len(b) for b in batches)) if batches else None
    per_cache = {
        key: evaluate_cache(net, cache, cfg, batches, windows, ids, buckets, key)
        for key, cache in cfg.all_caches().items()
    }
    warn_about_caches(net, cfg, per_cache, int(getattr(datamodule, "seq_len", 128)))
    main_result = next(iter(per_cache.values()))
    out: dict[str, Any] = {"cache": main_result, "caches": per_cache}
    for key in ("decode_tokens_per_s", "ttft_s", "tpot_s"):
        if key in main_result:
            out[key] = main_result[key]
    if batches:  # the teacher-forced PPL on the same batches, next to the autoregressive one
        out["parallel_ppl"] = metrics.perplexity(torch.cat([metrics.token_losses(net, b) for b in batches]))
        out["autoregressive_ppl"] = main_result["autoregressive_ppl"]
    if cfg.context_check.enabled:
        out["context_check"] = context_check(net, datamodule, cfg.context_check, windows)
    out.update(evaluate_long_context(net, datamodule, cfg))
    if cfg.reversal.enabled:
        out["reversal"] = metrics.reversal_probe(
            net,
            set_up_tokenizer(datamodule),
            n_facts=cfg.reversal.n_facts,
            cache=main.name if batches else None,
            cache_kwargs=main.kwargs,
        )
    return out


@torch.no_grad()
def evaluate_long_context(net: GPTNeoX, datamodule: TokenWindowDataModule, cfg: EvalConfig) -> dict[str, Any]:
    """`long_context` and `passkey` results, when enabled (kvcompress.evaluation.long_context)."""
    out: dict[str, Any] = {}
    lc, pk = cfg.long_context, cfg.passkey
    long_context.check_long_context(cfg, net.cfg.max_position_embeddings)
    if lc.enabled:
        tokens = set_up_val_dataset(datamodule).tokens  # the validation stream
        caches = cfg.caches_for(lc.caches, "eval.long_context.caches")
        out["long_context"] = long_context.long_context(net, tokens, caches, lc.lengths, lc.windows)
    if pk.enabled:
        caches = cfg.caches_for(pk.caches, "eval.passkey.caches")
        tokenizer = set_up_tokenizer(datamodule)
        out["passkey"] = long_context.passkey_probe(net, tokenizer, caches, pk.lengths, pk.depths, pk.trials, pk.digits)
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
