"""Benchmark: decoding (TTFT / TPOT) of every cache kind against the KV cache, and training against HF.

    python -m kvcompress.bench                       # CPU preset: a small grid, every cache kind, <= 3 min
    python -m kvcompress.bench --preset bars         # the issue-11 bars: batch 8 x 2000 cached tokens, batch 1
    python -m kvcompress.bench --preset gpu          # GPU-sized grid, compiled and eager
    python -m kvcompress.bench --systems kv,int8 --cells 8x2000 --compile both

Decoding, per system (a cache kind, or `hf` = transformers `generate`) and grid cell (batch x context):
- TTFT: seconds of the prefill of `context` prompt tokens (up to the first token's logits);
- TPOT: the median seconds of one decode step (one new token in every row), over `--new-tokens - 1` steps,
  eager and/or with the `torch.compile`d step; HF's TPOT is (t(generate n) - t(generate 1)) / (n - 1);
- peak memory during decode, measured (CPU: the process's peak RSS after the prefill, less its RSS with
  the weights alone; CUDA: peak allocated bytes less the weights), the cache's bytes per token, and the
  achieved bandwidth (weights + cache bytes read per step / TPOT) against this machine's measured read
  bandwidth (`x.sum()` over 512 MiB) and matrix-vector bandwidth (the output head's `F.linear` at batch 1).
Each system runs in its own subprocess (figures drift up to 40% within one process), systems alternate
over `--repeats` rounds, and medians are reported; ratios are against `kv` from the same run.

Training: tokens/s of forward + cross-entropy + backward + AdamW, ours vs HF `GPTNeoXForCausalLM` (same
weights, in-process, alternating), and KA-Attention vs standard attention, at each `--seq-lens`.
Results go to a JSON file (written atomically) and tables on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn

import kvcompress  # noqa: F401  (registers every method's attention and cache)
from kvcompress.eval.metrics import time_decode
from kvcompress.models.config import NAMED_SHAPES, ModelConfig
from kvcompress.models.generate import compiled_decode_step, decode_step, mark_static
from kvcompress.models.gpt_neox import ATTENTIONS, GPTNeoX
from kvcompress.models.hf import to_hf_model

SCHEMA = "kvcompress.bench/2"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_OUT = "outputs/bench/bench.json"
RESULT_TAG = "KVC_BENCH_RESULT "

# Decode systems: (attention, attention kwargs, cache kind); weights shared with the standard model.
SYSTEMS: dict[str, tuple[str, dict[str, Any], str]] = {
    "kv": ("standard", {}, "kv"),
    "int8": ("standard", {}, "int8"),
    "int4": ("standard", {}, "int4"),
    "vdproj": ("vdproj", {"rank": 0.625}, "native"),  # 320 of 512 at Pythia-70M
    "vdproj_k": ("vdproj", {"rank": 0.625, "compress_k": True, "k_rank": 0.5}, "native"),  # K: 128 + 192
    "ka": ("ka", {}, "native"),
    "ka_adapter": ("ka_adapter", {}, "ka"),
    "mka": ("mka", {}, "native"),
}
HF = "hf"  # transformers generate(), standard weights; measured in batch-1 cells only

PRESETS: dict[str, dict[str, Any]] = {
    "cpu": dict(
        cells="1x64,8x256", new_tokens=8, repeats=1, compile="off", systems=",".join([*SYSTEMS, HF]),
        train_batch=4, seq_lens="64", train_steps=2, warmup=1, train_attentions="standard",
    ),
    "bars": dict(
        cells="1x128,8x2000", new_tokens=16, repeats=2, compile="both", systems=",".join([*SYSTEMS, HF]),
        train_batch=2, seq_lens="128,512", train_steps=2, warmup=1, train_attentions="standard,ka",
    ),
    "gpu": dict(
        cells="1x128,8x2000,32x2000,64x4000", new_tokens=64, repeats=5, compile="both",
        systems=",".join([*SYSTEMS, HF]), train_batch=64, seq_lens="128,512", train_steps=20, warmup=5,
        train_attentions="standard,ka",
    ),
}  # fmt: skip


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kvcompress.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=None, choices=sorted(PRESETS), help="defaults: cpu, or gpu on CUDA")
    p.add_argument("--model", default="pythia-70m", choices=sorted(NAMED_SHAPES), help="shape name")
    p.add_argument("--vocab-size", type=int, default=None, help="override the vocabulary (quick CPU runs)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 on CUDA, else fp32")
    p.add_argument("--systems", default=None, help=f"comma-separated, from {[*SYSTEMS, HF]}; kv is always in")
    p.add_argument("--cells", default=None, help="decode grid, comma-separated BATCHxCONTEXT, e.g. 1x128,8x2000")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens per timed generation (>= 2)")
    p.add_argument("--repeats", type=int, default=None, help="rounds over the systems; medians are reported")
    p.add_argument("--compile", default=None, choices=["off", "on", "both"], help="time the compiled decode step")
    p.add_argument("--train-batch", type=int, default=None)
    p.add_argument("--seq-lens", default=None, help="training sequence lengths, comma-separated")
    p.add_argument("--train-steps", type=int, default=None, help="timed training steps per repeat")
    p.add_argument("--warmup", type=int, default=None, help="untimed training steps before timing")
    p.add_argument("--train-attentions", default=None, help="'standard' (vs HF) and/or others (vs standard)")
    p.add_argument("--train-compile", action="store_true", help="torch.compile both sides of the training step")
    p.add_argument("--no-train", dest="train", action="store_false", help="skip the training measurement")
    p.add_argument("--no-decode", dest="decode", action="store_false", help="skip the decoding measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=DEFAULT_OUT, help="JSON path (written atomically)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one system in this process
    args = p.parse_args(argv)
    if args.worker:
        return args
    preset = args.preset or ("gpu" if resolve_device(args.device).type == "cuda" else "cpu")
    args.preset = preset
    for key, value in PRESETS[preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        args.cells = [tuple(int(x) for x in c.lower().split("x")) for c in str(args.cells).split(",") if c.strip()]
        assert args.cells and all(len(c) == 2 and min(c) >= 1 for c in args.cells)
    except (ValueError, AssertionError):
        p.error(f"--cells must be BATCHxCONTEXT items, e.g. 1x128,8x2000; got {args.cells!r}")
    args.systems = [s.strip() for s in str(args.systems).split(",") if s.strip()]
    unknown = [s for s in args.systems if s not in SYSTEMS and s != HF]
    if unknown:
        p.error(f"--systems: unknown {unknown}; known {[*SYSTEMS, HF]}")
    args.systems = ["kv", *[s for s in args.systems if s != "kv"]]
    args.seq_lens = [int(x) for x in str(args.seq_lens).split(",") if x.strip()]
    args.train_attentions = [a.strip() for a in str(args.train_attentions).split(",") if a.strip()]
    for a in args.train_attentions:
        if a not in ATTENTIONS:
            p.error(f"--train-attentions: unknown attention {a!r}; registered {sorted(ATTENTIONS)}")
    if args.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (a prefill token, then decode steps)")
    for name in ("repeats", "train_batch", "train_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or not args.seq_lens or min(args.seq_lens) < 1:
        p.error("--warmup must be >= 0 and --seq-lens >= 1")
    return args


# ----------------------------------------------------------------------------- helpers


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but CUDA is not available")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall seconds of fn(), with the device drained before and after."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision for training: autocast to `dtype` over fp32 parameters (nothing for fp32)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def copy_shared_weights(dst: nn.Module, src: nn.Module) -> int:
    """Copy every same-named, same-shaped tensor of src into dst; returns how many were copied."""
    src_state = src.state_dict()
    shared = {k: v for k, v in src_state.items() if k in dst.state_dict() and dst.state_dict()[k].shape == v.shape}
    dst.load_state_dict(shared, strict=False)
    return len(shared)


def set_sdpa(hf_model: nn.Module) -> None:
    """Make a transformers model attend with SDPA, like ours."""
    if hasattr(hf_model, "set_attn_implementation"):
        hf_model.set_attn_implementation("sdpa")
    else:  # older transformers
        hf_model.config._attn_implementation = "sdpa"


def cpu_name() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    return platform.processor() or platform.machine()


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def alternate(names: list[str], r: int) -> Iterator[str]:
    """Systems in order on even repeats, reversed on odd ones (cancels slow drift)."""
    return iter(names if r % 2 == 0 else names[::-1])


def rss_bytes(field: str = "VmRSS") -> int:
    """This process's resident memory (VmRSS) or its peak since the last reset (VmHWM), from /proc."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc), so RSS shows what is live."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux: `5` into /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def weights_read_per_step(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter but the input embedding (B rows of it)."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not n.startswith("embed_in."))


def measure_bandwidth(device: torch.device, dtype: torch.dtype, n_embd: int, vocab: int) -> dict[str, float]:
    """Bytes/s of a plain read (`x.sum()` over 512 MiB) and of a matrix-vector product (the head at batch 1)."""
    x = torch.ones(128 * 2**20, device=device)  # 512 MiB fp32
    w = torch.randn(vocab, n_embd, device=device, dtype=dtype)
    v = torch.randn(1, n_embd, device=device, dtype=dtype)
    read = [x.numel() * 4 / timed(lambda: x.sum(), device) for _ in range(7)]
    matvec = [w.numel() * w.element_size() / timed(lambda: F.linear(v, w), device) for _ in range(7)]
    return {"read_bytes_per_s": median(read[1:]), "matvec_bytes_per_s": median(matvec[1:])}


# ----------------------------------------------------------------------------- models


def base_cfg(args: argparse.Namespace, attention: str = "standard", kwargs: dict | None = None) -> ModelConfig:
    overrides: dict[str, Any] = dict(attention=attention, attention_kwargs=kwargs or {})
    if args.vocab_size is not None:
        overrides["vocab_size"] = args.vocab_size
    return ModelConfig.from_name(args.model, **overrides)


def seeded_model(args: argparse.Namespace, attention: str = "standard", kwargs: dict | None = None) -> GPTNeoX:
    """The standard model from `--seed`; another attention gets its weights where names and shapes match."""
    torch.manual_seed(args.seed)
    standard = GPTNeoX(base_cfg(args))
    if attention == "standard":
        return standard
    model = GPTNeoX(base_cfg(args, attention, kwargs))
    copy_shared_weights(model, standard)
    return model


def hf_model(standard: GPTNeoX, info: dict[str, Any] | None = None) -> nn.Module:
    hf = to_hf_model(standard).to(standard.embed_out.weight.device)
    set_sdpa(hf)  # our model uses SDPA too
    if info is not None:
        info["hf_attn_implementation"] = hf.config._attn_implementation
    hf.generation_config.eos_token_id = None  # never stop early: exactly the asked number of tokens
    return hf


# ----------------------------------------------------------------------------- training


def bench_train(
    args: argparse.Namespace, attention: str, seq_len: int, device: torch.device, dtype: torch.dtype, info: dict
) -> dict[str, Any]:
    """Training tokens/s: ours vs HF for standard attention, else `attention` vs standard (same weights)."""
    ours = seeded_model(args, attention).to(device)
    standard = seeded_model(args).to(device)
    baseline = "hf" if attention == "standard" else "standard"
    models: dict[str, nn.Module] = {"ours": ours, baseline: hf_model(standard, info) if baseline == "hf" else standard}
    V = ours.cfg.vocab_size
    gen = torch.Generator().manual_seed(args.seed + 1)
    # A few distinct batches, rotated, shared by every system: (B, T + 1) -> inputs and next-token targets.
    batches = [torch.randint(0, V, (args.train_batch, seq_len + 1), generator=gen).to(device) for _ in range(4)]
    fused = device.type == "cuda"

    steps: dict[str, Callable[[Tensor], Tensor]] = {}
    for name, model in models.items():
        model.train()
        module = torch.compile(model) if args.train_compile else model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused or None)
        is_hf = name == "hf"

        def step(batch: Tensor, module: nn.Module = module, opt: torch.optim.Optimizer = opt, is_hf=is_hf) -> Tensor:
            x, y = batch[:, :-1], batch[:, 1:]
            with autocast(device, dtype):
                logits = module(input_ids=x, use_cache=False).logits if is_hf else module(x)
                loss = F.cross_entropy(logits.reshape(-1, V), y.reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        steps[name] = step

    # Same weights and data: the first losses must agree where the attention is the same (a fairness check).
    first_loss = {name: float(step(batches[0])) for name, step in steps.items()}
    for step in steps.values():
        for i in range(max(args.warmup - 1, 0)):
            step(batches[(i + 1) % len(batches)])
    samples: dict[str, list[float]] = {name: [] for name in steps}
    tokens = args.train_batch * seq_len * args.train_steps
    for r in range(args.repeats):
        for name in alternate(list(steps), r):

            def run(step: Callable[[Tensor], Tensor] = steps[name]) -> None:
                for i in range(args.train_steps):
                    step(batches[i % len(batches)])

            samples[name].append(tokens / timed(run, device))
    entry = {
        "attention": attention,
        "batch": args.train_batch,
        "seq_len": seq_len,
        "baseline": baseline,
        **{name: median(xs) for name, xs in samples.items()},
        "samples": samples,
        "first_loss": first_loss,
    }
    entry["ratio"] = entry["ours"] / entry[baseline]  # tokens/s: > 1 is faster
    entry["step_time_ratio"] = entry[baseline] / entry["ours"]  # step time vs the baseline: < 1 is faster
    return entry


# ----------------------------------------------------------------------------- decoding (one system per process)


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one system at every cell, in this process: TTFT, TPOT (eager and/or compiled), peak memory."""
    args = argparse.Namespace(**spec["args"])
    device, dtype = torch.device(spec["device"]), DTYPES[spec["dtype"]]
    torch.set_num_threads(spec["threads"])
    name = spec["system"]
    attention, kwargs, cache = SYSTEMS.get(name, ("standard", {}, "kv"))
    model = seeded_model(args, attention, kwargs).to(device=device, dtype=dtype).eval()
    if name == HF:
        model = hf_model(model)
    release_free_memory()
    base_mem = torch.cuda.memory_allocated(device) if device.type == "cuda" else rss_bytes()
    gen = torch.Generator().manual_seed(args.seed + 2)
    modes = {"off": ["eager"], "on": ["compiled"], "both": ["eager", "compiled"]}[args.compile]
    out: dict[str, Any] = {}
    for B, ctx in args.cells:
        if name == HF and B != 1:
            continue
        prompt = torch.randint(0, model.config.vocab_size if name == HF else model.cfg.vocab_size, (B, ctx),
                               generator=gen).to(device)  # fmt: skip
        cell: dict[str, Any] = {}
        if name == HF:
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
            synchronize(device)
            start = time.perf_counter()
            logits = decode_step(model, nxt, caches, step_fn)
            synchronize(device)
            times.append(time.perf_counter() - start)
            nxt = logits.argmax(-1, keepdim=True)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else rss_bytes("VmHWM")
        out[mode] = {"ttft_s": timing["ttft_s"], "tpot_s": median(times), "decode_peak_mem_bytes": peak - base_mem}
    return out


def hf_times(hf: nn.Module, prompt: Tensor, new_tokens: int, device: torch.device) -> dict[str, float]:
    """HF generate: TTFT = time of a 1-token generation; TPOT = (t(n tokens) - t(1 token)) / (n - 1)."""

    def gen(n: int) -> None:
        hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                    do_sample=False, use_cache=True, pad_token_id=0)  # fmt: skip

    with torch.no_grad():
        gen(new_tokens)  # warm-up
        one = median([timed(lambda: gen(1), device) for _ in range(3)])
        full = median([timed(lambda: gen(new_tokens), device) for _ in range(3)])
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


# ----------------------------------------------------------------------------- output


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Atomic write: a temporary file beside the target, then os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


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


# ----------------------------------------------------------------------------- main


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if device.type == "cuda":  # identical math settings for every system
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    transformers.logging.set_verbosity_error()  # HF generate() chatters about generation flags
    cfg = base_cfg(args)
    needed = max(ctx for _, ctx in args.cells) + args.new_tokens
    if args.decode and needed > cfg.max_position_embeddings:
        raise ValueError(f"{needed} positions exceed max_position_embeddings={cfg.max_position_embeddings}")
    meta: dict[str, Any] = {
        "schema": SCHEMA,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "preset": args.preset,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cpu_name()})",
        "device_type": device.type,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "dtype": dtype_name(dtype),
        "model": cfg.to_dict(),
        "systems": {s: SYSTEMS.get(s, "transformers generate(), DynamicCache, SDPA") for s in args.systems},
        "ttft": "seconds of prefill (cache reset + prompt forward) up to the first token's logits",
        "tpot": "median seconds of one decode step (one token per row); HF: (t(generate n) - t(generate 1)) / (n-1)",
        "decode_peak_mem": "CPU: peak RSS during the decode steps less RSS with the weights alone; CUDA: peak "
        "allocated less the weights",
        "hf_attn_implementation": None,
        "args": {k: v for k, v in vars(args).items() if k != "worker"},
    }
    result: dict[str, Any] = {"meta": meta, "decode": None, "train": None}
    if args.decode:
        meta["bandwidth"] = measure_bandwidth(device, dtype, cfg.n_embd, cfg.vocab_size)
        result["decode"] = bench_decode(args, device, dtype)
        add_bandwidth(result["decode"], meta["bandwidth"])
    if args.train:
        result["train"] = [
            bench_train(args, attention, T, device, dtype, meta) for attention in args.train_attentions
            for T in args.seq_lens
        ]  # fmt: skip
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.worker:
        result = worker(json.loads(args.worker))
        print(RESULT_TAG + json.dumps(result), flush=True)
        return result
    result = run_benchmark(args)
    write_json(args.out, result)
    print(format_table(result))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
