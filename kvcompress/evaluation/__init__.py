"""Evaluation, one wing: `metrics` (plain-PyTorch metrics, the one timer, decode speed, cache size), `evaluate`
(the end-of-run evaluation every run records), `report` (tables and plots over runs), `lego` (LEGO's decode
speed). Entry points: `python -m kvcompress.eval` and `python -m kvcompress.report`."""

from kvcompress.evaluation.metrics import (
    autoregressive_token_losses,
    cache_bytes_per_token,
    decode_speed,
    kv_bytes_per_token,
    perplexity,
    position_ppl,
    timed,
    token_losses,
)

__all__ = [
    "autoregressive_token_losses",
    "cache_bytes_per_token",
    "decode_speed",
    "kv_bytes_per_token",
    "perplexity",
    "position_ppl",
    "timed",
    "token_losses",
]
