"""The few numbers a run ends by printing (train and eval): val PPL, PPL by position, and per cache its measured
bytes per token, reduction against KV, TPOT and autoregressive PPL. Everything else is in metrics.json."""

from __future__ import annotations

from typing import Any


def _num(x: Any, digits: int = 2) -> str:
    return f"{x:,.{digits}f}" if isinstance(x, int | float) and not isinstance(x, bool) else "-"


def results_table(metrics: dict[str, Any]) -> str:
    """A short plain-text table of a run's main metrics (`metrics.json`'s schema)."""
    stages = metrics.get("stages") or []
    start = stages[0].get("start_val_ppl") if stages else None
    lines = [f"val PPL {_num(metrics.get('val_ppl'))}" + (f" (before training {_num(start)})" if start else "")]
    positions = metrics.get("val_pos_ppl") or {}
    if positions:
        lines.append("PPL by position: " + ", ".join(f"[{k}) {_num(v, 1)}" for k, v in positions.items()))
    caches = metrics.get("caches") or {}
    if caches:
        head = ("cache", "bytes/token", "vs KV", "TPOT ms", "AR PPL")
        rows = [
            (
                key,
                _num(c.get("bytes_per_token"), 0),
                f"{-100 * c['reduction'] + 0.0:+.1f}%" if isinstance(c.get("reduction"), float) else "-",
                _num(1e3 * c["tpot_s"] if isinstance(c.get("tpot_s"), float) else None),
                _num(c.get("autoregressive_ppl")),
            )
            for key, c in caches.items()
        ]
        widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
        for row in (head, *rows):
            lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        lines += [f"note: {key} {c['note']}" for key, c in caches.items() if c.get("note")]
    return "\n".join(lines)
