"""The benchmark's command line: presets, arguments, and the run (decode grid, then training)."""

from __future__ import annotations

import argparse
import json
import platform
from datetime import datetime, timezone
from typing import Any

import torch
import transformers

from kvcompress.bench.decode import RESULT_TAG, add_bandwidth, bench_decode, worker
from kvcompress.bench.probes import cpu_name, dtype_name, measure_bandwidth, resolve_device, resolve_dtype
from kvcompress.bench.systems import HF, base_cfg, systems
from kvcompress.bench.table import format_table, write_json
from kvcompress.bench.train import bench_train
from kvcompress.models.config import NAMED_SHAPES
from kvcompress.models.gpt_neox import ATTENTIONS

SCHEMA = "kvcompress.bench/2"
DEFAULT_OUT = "outputs/bench/bench.json"


PRESETS: dict[str, dict[str, Any]] = {
    "cpu": dict(
        cells="1x64,8x256", new_tokens=8, repeats=1, compile="off", systems="all",
        train_batch=4, seq_lens="64", train_steps=2, warmup=1, train_attentions="standard",
    ),
    "bars": dict(
        cells="1x128,8x2000", new_tokens=16, repeats=2, compile="both", systems="all",
        train_batch=2, seq_lens="128,512", train_steps=2, warmup=1, train_attentions="standard,ka",
    ),
    "gpu": dict(
        cells="1x128,8x2000,32x2000,64x4000", new_tokens=64, repeats=5, compile="both",
        systems="all", train_batch=64, seq_lens="128,512", train_steps=20, warmup=5,
        train_attentions="standard,ka",
    ),
}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kvcompress.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=None, choices=sorted(PRESETS), help="defaults: cpu, or gpu on CUDA")
    p.add_argument("--model", default="pythia-70m", choices=sorted(NAMED_SHAPES), help="shape name")
    p.add_argument("--vocab-size", type=int, default=None, help="override the vocabulary (quick CPU runs)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 on CUDA, else fp32")
    p.add_argument("--systems", default=None, help=f"comma-separated, from {[*systems(), HF]}, or all; kv is always in")
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
    known = [*systems(), HF]
    args.systems = [s.strip() for s in str(args.systems).split(",") if s.strip()]
    args.systems = known if args.systems == ["all"] else args.systems
    unknown = [s for s in args.systems if s not in known]
    if unknown:
        p.error(f"--systems: unknown {unknown}; known {known}")
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
        "systems": {s: systems().get(s, "transformers generate(), DynamicCache, SDPA") for s in args.systems},
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
