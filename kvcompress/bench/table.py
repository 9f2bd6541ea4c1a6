"""The benchmark's output: the JSON (written atomically) and the tables printed on stdout."""

from __future__ import annotations

import os
from typing import Any

from kvcompress.utils import atomic_write_json


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """The results as JSON, written atomically (a temporary file beside the target, then a rename)."""
    atomic_write_json(path, data)


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.1f}"


def _x(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def format_table(result: dict[str, Any]) -> str:
    meta = result["meta"]
    bw = meta.get("bandwidth") or {}
    lines = [
        f"kvcompress bench ({meta['preset']}): {meta['model']['name']} on {meta['device']} ({meta['dtype']})",
    ]
    if bw:
        lines.append(
            f"measured read bandwidth {bw['read_bytes_per_s'] / 1e9:.1f} GB/s, "
            f"matrix-vector {bw['matvec_bytes_per_s'] / 1e9:.1f} GB/s"
        )
    for key, cell in (result.get("decode") or {}).items():
        lines.append(f"\ndecode {key} (batch x context); TPOT median ms; ratios vs kv in the same mode")
        lines.append(
            f"{'system':<11}{'TTFT ms':>9}{'TPOT eager':>11}{'TPOT comp':>10}{'comp/eager':>11}{'vs kv':>8}"
            f"{'mem MB':>8}{'mem vs kv':>10}{'B/token':>9}{'GB/s':>7}{'of read':>8}{'vs floor':>9}"
        )
        for system, e in cell.items():
            best = e.get("compiled") or e.get("eager")
            mem = best.get("decode_peak_mem_bytes")
            bpt, gbs = e.get("bytes_per_token"), best.get("achieved_bytes_per_s")
            share = best.get("vs_read_bandwidth")
            lines.append(
                f"{system:<11}{_ms(best['ttft_s']):>9}{_ms((e.get('eager') or {}).get('tpot_s')):>11}"
                f"{_ms((e.get('compiled') or {}).get('tpot_s')):>10}"
                f"{_x(1 / e['compiled_speedup'] if 'compiled_speedup' in e else None):>11}"
                f"{_x(best['tpot_vs_kv']):>8}{'-' if mem is None else f'{mem / 1e6:.0f}':>8}"
                f"{_x(best.get('decode_mem_vs_kv')):>10}"
                f"{'-' if bpt is None else f'{bpt:.0f}':>9}"
                f"{'-' if gbs is None else f'{gbs / 1e9:.1f}':>7}"
                f"{'-' if share is None else f'{share:.0%}':>8}"
                f"{_x(best.get('tpot_vs_floor')):>9}"
            )
    for t in result.get("train") or []:
        lines.append(
            f"train {t['attention']} {t['batch']}x{t['seq_len']}: ours {t['ours']:.0f} tok/s, {t['baseline']} "
            f"{t[t['baseline']]:.0f} tok/s: {t['ratio']:.2f}x throughput, step time {t['step_time_ratio']:.2f}x; "
            "first loss " + ", ".join(f"{k} {v:.4f}" for k, v in t["first_loss"].items())
        )
    return "\n".join(lines)
