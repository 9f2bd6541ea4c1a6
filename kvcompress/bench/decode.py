"""Decoding: TTFT and TPOT (eager and / or compiled) and peak memory of each system, each system in its own
process (`python -m kvcompress.bench --worker`), alternating over the repeats; ratios against `kv`."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from kvcompress.bench.probes import (
    DTYPES,
    alternate,
    dtype_name,
    median,
    release_free_memory,
    reset_peak_rss,
    rss_bytes,
    timed,
    weights_read_per_step,
)
from kvcompress.bench.systems import HF, hf_model, seeded_model, systems
from kvcompress.evaluation.metrics import time_decode
from kvcompress.models.generate import compiled_decode_step, decode_step, mark_static
from kvcompress.models.gpt_neox import GPTNeoX

if TYPE_CHECKING:
    from transformers import GPTNeoXForCausalLM

RESULT_TAG = "KVC_BENCH_RESULT "


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one system at every cell, in this process: TTFT, TPOT (eager and/or compiled), peak memory."""
    args = argparse.Namespace(**spec["args"])
    device, dtype = torch.device(spec["device"]), DTYPES[spec["dtype"]]
    torch.set_num_threads(spec["threads"])
    name = spec["system"]
    attention, kwargs, cache = systems().get(name, ("standard", {}, "kv"))
    ours = seeded_model(args, attention, kwargs).to(device=device, dtype=dtype).eval()
    model: GPTNeoX | GPTNeoXForCausalLM = hf_model(ours) if name == HF else ours
    del ours  # (HF: our copy of the weights is freed before memory is measured)
    release_free_memory()
    base_mem = torch.cuda.memory_allocated(device) if device.type == "cuda" else rss_bytes()
    gen = torch.Generator().manual_seed(args.seed + 2)
    modes = {"off": ["eager"], "on": ["compiled"], "both": ["eager", "compiled"]}[args.compile]
    out: dict[str, Any] = {}
    for B, ctx in args.cells:
        if name == HF and B != 1:
            continue
        vocab = model.cfg.vocab_size if isinstance(model, GPTNeoX) else model.config.vocab_size  # ours, or HF's
        prompt = torch.randint(0, vocab, (B, ctx), generator=gen).to(device)
        cell: dict[str, Any] = {}
        if not isinstance(model, GPTNeoX):  # name == HF
            cell["eager"] = hf_times(model, prompt, args.new_tokens, device)
        else:
            caches = model.build_caches(B, ctx + args.new_tokens, kind=cache)
            cell["cache_bytes"] = caches.nbytes()
            cell["bytes_per_token"] = caches.nbytes() / (B * caches.state.max_len)
            cell["weights_read_bytes"] = weights_read_per_step(model)
            cell.update(decode_modes(model, prompt, args.new_tokens, caches, modes, base_mem))
            del caches
        out[f"{B}x{ctx}"] = cell
    return out


@torch.no_grad()
def decode_modes(model, prompt: Tensor, new_tokens: int, caches, modes: list[str], base_mem: int) -> dict[str, Any]:
    """One prefill (TTFT), then the decode steps of each mode from the same prefilled cache (the slot is set
    back between modes); per mode the median step time and the peak memory of its steps above the weights."""
    device, T = prompt.device, prompt.shape[1]
    fns = {mode: compiled_decode_step() if mode == "compiled" else None for mode in modes}
    if "compiled" in modes:  # compile once on a short prompt: the step's shapes depend on batch and max_len only
        if device.type == "cuda":
            mark_static(caches)
        time_decode(model, prompt[:, :2], 3, caches, fns["compiled"])
    release_free_memory()
    timing = time_decode(model, prompt, 2, caches)  # prefill (+ one eager step, unused)
    out: dict[str, Any] = {}
    for mode, step_fn in fns.items():
        caches.state.length = T
        caches.state.slot.fill_(T)
        nxt = torch.zeros(prompt.shape[0], 1, dtype=torch.long, device=device)
        decode_step(model, nxt, caches, step_fn)  # one untimed step per mode
        release_free_memory()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        else:
            reset_peak_rss()
        times = []
        for _ in range(new_tokens - 1):
            seconds, logits = timed(lambda: decode_step(model, nxt, caches, step_fn), device)  # noqa: B023
            times.append(seconds)
            nxt = logits.argmax(-1, keepdim=True)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else rss_bytes("VmHWM")
        out[mode] = {"ttft_s": timing["ttft_s"], "tpot_s": median(times), "decode_peak_mem_bytes": peak - base_mem}
    return out


def hf_times(hf: GPTNeoXForCausalLM, prompt: Tensor, new_tokens: int, device: torch.device) -> dict[str, float]:
    """HF generate: TTFT = time of a 1-token generation; TPOT = (t(n tokens) - t(1 token)) / (n - 1)."""

    def gen(n: int) -> None:
        hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                    do_sample=False, use_cache=True, pad_token_id=0)  # fmt: skip

    with torch.no_grad():
        gen(new_tokens)  # warm-up
        one = median([timed(lambda: gen(1), device)[0] for _ in range(3)])
        full = median([timed(lambda: gen(new_tokens), device)[0] for _ in range(3)])
    return {"ttft_s": one, "tpot_s": (full - one) / (new_tokens - 1)}


def run_worker(system: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    keys = ("model", "vocab_size", "seed", "cells", "new_tokens", "compile")
    spec = {
        "system": system,
        "device": str(device),
        "dtype": dtype_name(dtype),
        "threads": torch.get_num_threads(),
        "args": {k: getattr(args, k) for k in keys},
    }
    cmd = [sys.executable, "-m", "kvcompress.bench", "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    raise RuntimeError(f"bench worker for {system!r} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def bench_decode(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Every system in its own subprocess, alternating over the repeats; medians and ratios against kv."""
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in args.systems}
    for r in range(args.repeats):
        for system in alternate(args.systems, r):
            runs[system].append(run_worker(system, args, device, dtype))
    cells: dict[str, Any] = {}
    for B, ctx in args.cells:
        key = f"{B}x{ctx}"
        cell: dict[str, Any] = {}
        for system, results in runs.items():
            if key not in results[0]:
                continue
            entry = {k: v for k, v in results[0][key].items() if not isinstance(v, dict)}
            for mode in ("eager", "compiled"):
                if mode in results[0][key]:
                    samples = [res[key][mode] for res in results]
                    entry[mode] = {m: median([s[m] for s in samples]) for m in samples[0]}
                    entry[mode]["tpot_samples_s"] = [s["tpot_s"] for s in samples]
            cell[system] = entry
        add_decode_ratios(cell, B)
        cells[key] = cell
    return cells


def add_decode_ratios(cell: dict[str, Any], batch: int) -> None:
    """TPOT and memory vs kv (same mode), compiled vs eager, and bandwidth figures (filled in by `run_benchmark`)."""
    kv = cell["kv"]
    for entry in cell.values():
        for mode in ("eager", "compiled"):
            e = entry.get(mode)
            if e is None:
                continue
            e["decode_tokens_per_s"] = batch / e["tpot_s"]
            ref = kv.get(mode) or kv.get("eager")
            e["tpot_vs_kv"] = e["tpot_s"] / ref["tpot_s"]
            if "decode_peak_mem_bytes" in e and ref.get("decode_peak_mem_bytes"):
                e["decode_mem_vs_kv"] = e["decode_peak_mem_bytes"] / ref["decode_peak_mem_bytes"]
        if "eager" in entry and "compiled" in entry:
            entry["compiled_speedup"] = entry["eager"]["tpot_s"] / entry["compiled"]["tpot_s"]


def add_bandwidth(cells: dict[str, Any], bandwidth: dict[str, float]) -> None:
    for cell in cells.values():
        for entry in cell.values():
            if "cache_bytes" not in entry:
                continue
            read = entry["weights_read_bytes"] + entry["cache_bytes"]
            entry["bytes_read_per_step"] = read
            entry["floor_s"] = read / bandwidth["read_bytes_per_s"]
            entry["matvec_floor_s"] = read / bandwidth["matvec_bytes_per_s"]
            for mode in ("eager", "compiled"):
                if mode in entry:
                    e = entry[mode]
                    e["achieved_bytes_per_s"] = read / e["tpot_s"]
                    e["vs_read_bandwidth"] = e["achieved_bytes_per_s"] / bandwidth["read_bytes_per_s"]
                    e["vs_matvec_bandwidth"] = e["achieved_bytes_per_s"] / bandwidth["matvec_bytes_per_s"]
                    e["tpot_vs_floor"] = e["tpot_s"] / entry["floor_s"]
