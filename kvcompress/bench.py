"""Throughput benchmark: our GPT-NeoX against `transformers.GPTNeoXForCausalLM`, same weights and shapes.

    python -m kvcompress.bench --model pythia-70m                      # ours vs HF, standard attention
    python -m kvcompress.bench --attention vdproj --attention-kwargs '{"rank": 320}'   # vs our standard KV

Measures, in one process and on one device:
- training tokens/s: forward + cross-entropy + backward + AdamW step, timed over `--train-steps` steps
  after `--warmup` steps (bf16 autocast over fp32 parameters on CUDA, fp32 on CPU);
- decoding tokens/s at each `--decode-batches` size: batch * new_tokens / wall time of one greedy
  generation (prefill included, cache allocation included), exactly `--new-tokens` tokens for both.

Every measurement is repeated `--repeats` times, systems alternating, and the median is reported.
Results go to a JSON file (written atomically) and a short table on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
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

import kvcompress  # noqa: F401  (registers every method's attention)
from kvcompress.models.config import NAMED_SHAPES, ModelConfig
from kvcompress.models.generate import generate
from kvcompress.models.gpt_neox import ATTENTIONS, GPTNeoX
from kvcompress.models.hf import to_hf_model

SCHEMA = "kvcompress.bench/1"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_OUT = "outputs/bench/bench.json"


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kvcompress.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="pythia-70m", choices=sorted(NAMED_SHAPES), help="shape name")
    p.add_argument("--vocab-size", type=int, default=None, help="override the vocabulary (quick CPU runs)")
    p.add_argument("--attention", default="standard", help="registered attention of our model")
    p.add_argument("--attention-kwargs", type=json.loads, default={}, help="JSON, e.g. '{\"rank\": 320}'")
    p.add_argument("--cache", default="native", help="cache kind our model decodes with")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 on CUDA, else fp32")
    p.add_argument("--train-batch", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--train-steps", type=int, default=20, help="timed steps per repeat")
    p.add_argument("--warmup", type=int, default=5, help="untimed training steps before timing")
    p.add_argument("--decode-warmup", type=int, default=1, help="untimed generations per system and batch size")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement; the median is reported")
    p.add_argument("--decode-batches", default="1,32", help="comma-separated batch sizes")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--compile", action="store_true", help="torch.compile both models for the training measurement")
    p.add_argument(
        "--compare-hf",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="measure HF GPTNeoXForCausalLM (default: on for attention=standard, off otherwise)",
    )
    p.add_argument("--no-train", dest="train", action="store_false", help="skip the training measurement")
    p.add_argument("--no-decode", dest="decode", action="store_false", help="skip the decoding measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=DEFAULT_OUT, help="JSON path (written atomically)")
    args = p.parse_args(argv)
    args.decode_batches = [int(b) for b in str(args.decode_batches).split(",") if b.strip()]
    if args.compare_hf is None:
        args.compare_hf = args.attention == "standard"
    for name in ("train_batch", "seq_len", "train_steps", "repeats", "prompt_len", "new_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or args.decode_warmup < 0 or not args.decode_batches or min(args.decode_batches) < 1:
        p.error("--warmup and --decode-warmup must be >= 0, decode batches >= 1")
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


def cache_bytes_per_token(caches: list) -> float:
    """Bytes of all layers' caches per cached token per sequence."""
    c0 = caches[0]
    return sum(c.nbytes() for c in caches) / (c0.batch_size * c0.max_len)


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


# ----------------------------------------------------------------------------- systems


class System:
    """One thing to measure: a forward for training and a greedy decoder, over its own weights."""

    def __init__(self, name: str, model: nn.Module, kind: str, cache: str = "native") -> None:
        self.name = name
        self.model = model  # GPTNeoX (kind "ours") or GPTNeoXForCausalLM (kind "hf")
        self.kind = kind
        self.cache = cache
        self.last_caches: list | None = None

    def logits(self, module: nn.Module, x: Tensor) -> Tensor:
        if self.kind == "hf":
            return module(input_ids=x, use_cache=False).logits
        return module(x)

    def decode(self, prompt: Tensor, new_tokens: int) -> Tensor:
        if self.kind == "hf":
            return self.model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=0,
            )
        B, T = prompt.shape
        caches = self.model.build_caches(B, T + new_tokens, kind=self.cache)
        out = generate(self.model, prompt, new_tokens, use_cache=True, caches=caches)
        self.last_caches = caches
        return out


def build_base_model(args: argparse.Namespace) -> tuple[GPTNeoX, ModelConfig]:
    if args.attention not in ATTENTIONS:
        raise ValueError(f"unknown attention {args.attention!r}; registered: {sorted(ATTENTIONS)}")
    overrides: dict[str, Any] = dict(attention=args.attention, attention_kwargs=args.attention_kwargs)
    if args.vocab_size is not None:
        overrides["vocab_size"] = args.vocab_size
    cfg = ModelConfig.from_name(args.model, **overrides)
    needed = max(args.seq_len, args.prompt_len + args.new_tokens) if args.decode else args.seq_len
    if needed > cfg.max_position_embeddings:
        raise ValueError(f"{needed} positions exceed max_position_embeddings={cfg.max_position_embeddings}")
    torch.manual_seed(args.seed)
    return GPTNeoX(cfg), cfg


def build_systems(
    base: GPTNeoX, args: argparse.Namespace, dtype: torch.dtype | None = None, info: dict[str, Any] | None = None
) -> dict[str, System]:
    """Fresh copies of the pristine weights: ours, the baseline(s); cast to `dtype` when given.

    `info` receives what the HF model actually runs with (its attention implementation).
    """
    ours = copy.deepcopy(base)
    if dtype is not None:
        ours = ours.to(dtype)
    systems = {"ours": System("ours", ours, "ours", args.cache)}
    standard = ours
    if base.cfg.attention != "standard":
        # Same shape with standard attention and its KV cache; shared weights copied where they fit.
        standard = GPTNeoX(base.cfg.with_(attention="standard", attention_kwargs={})).to(ours.embed_out.weight)
        copy_shared_weights(standard, ours)
        systems["standard"] = System("standard", standard, "ours", "native")
    if args.compare_hf:
        hf = to_hf_model(standard).to(ours.embed_out.weight.device)
        set_sdpa(hf)  # our model uses SDPA too
        if info is not None:
            info["hf_attn_implementation"] = hf.config._attn_implementation
        hf.generation_config.eos_token_id = None  # never stop early: exactly new_tokens tokens
        systems["hf"] = System("hf", hf, "hf")
    return systems


# ----------------------------------------------------------------------------- measurements


def bench_train(
    base: GPTNeoX, args: argparse.Namespace, device: torch.device, dtype: torch.dtype, info: dict[str, Any]
) -> dict[str, Any]:
    """Training tokens/s of each system (fp32 parameters, `dtype` autocast)."""
    systems = build_systems(base, args, info=info)
    V = base.cfg.vocab_size
    gen = torch.Generator().manual_seed(args.seed + 1)
    # A few distinct batches, rotated, shared by every system: (B, T + 1) -> inputs and next-token targets.
    batches = [torch.randint(0, V, (args.train_batch, args.seq_len + 1), generator=gen).to(device) for _ in range(4)]
    fused = device.type == "cuda"

    steps: dict[str, Callable[[Tensor], Tensor]] = {}
    for name, s in systems.items():
        s.model.train()
        module = torch.compile(s.model) if args.compile else s.model
        opt = torch.optim.AdamW(s.model.parameters(), lr=1e-4, fused=fused or None)

        def step(batch: Tensor, s: System = s, module: nn.Module = module, opt: torch.optim.Optimizer = opt) -> Tensor:
            x, y = batch[:, :-1], batch[:, 1:]
            with autocast(device, dtype):
                logits = s.logits(module, x)
                loss = F.cross_entropy(logits.reshape(-1, V), y.reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        steps[name] = step

    # Same weights and data: the first losses must agree (a check that the comparison is fair).
    first_loss = {name: float(step(batches[0])) for name, step in steps.items()}
    for step in steps.values():
        for i in range(max(args.warmup - 1, 0)):
            step(batches[(i + 1) % len(batches)])

    samples: dict[str, list[float]] = {name: [] for name in steps}
    tokens = args.train_batch * args.seq_len * args.train_steps
    for r in range(args.repeats):
        for name in alternate(list(steps), r):

            def run(step: Callable[[Tensor], Tensor] = steps[name]) -> None:
                for i in range(args.train_steps):
                    step(batches[i % len(batches)])

            samples[name].append(tokens / timed(run, device))
    del steps, systems
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "batch": args.train_batch,
        "seq_len": args.seq_len,
        "steps": args.train_steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "tokens_per_step": args.train_batch * args.seq_len,
        **{name: median(xs) for name, xs in samples.items()},
        "samples": samples,
        "first_loss": first_loss,  # moved to checks by run_benchmark
    }


@torch.no_grad()
def bench_decode(
    base: GPTNeoX, args: argparse.Namespace, device: torch.device, dtype: torch.dtype, info: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Decoding tokens/s of each system at each batch size (weights cast to `dtype`), plus checks."""
    systems = build_systems(base, args, dtype, info)
    for s in systems.values():
        s.model.eval()
    V = base.cfg.vocab_size
    gen = torch.Generator().manual_seed(args.seed + 2)
    results: dict[str, Any] = {}
    checks: dict[str, Any] = {}

    if "hf" in systems:  # one prompt forward: how far apart are the two implementations' logits?
        ref = systems["standard" if "standard" in systems else "ours"]
        x = torch.randint(0, V, (2, args.prompt_len), generator=gen).to(device)
        diff = (ref.model(x).float() - systems["hf"].model(input_ids=x).logits.float()).abs().max()
        checks["prefill_logits_max_abs_diff"] = float(diff)

    for B in args.decode_batches:
        prompt = torch.randint(0, V, (B, args.prompt_len), generator=gen).to(device)
        outs: dict[str, Tensor] = {}
        for name, s in systems.items():
            for _ in range(args.decode_warmup):
                s.decode(prompt, args.new_tokens)
            outs[name] = s.decode(prompt, args.new_tokens)  # untimed too: kept for the tokens check
            if outs[name].shape != (B, args.prompt_len + args.new_tokens):
                raise RuntimeError(f"{name} generated shape {tuple(outs[name].shape)}, expected exactly new_tokens")
        samples: dict[str, list[float]] = {name: [] for name in systems}
        for r in range(args.repeats):
            for name in alternate(list(systems), r):
                secs = timed(lambda s=systems[name], p=prompt: s.decode(p, args.new_tokens), device)
                samples[name].append(B * args.new_tokens / secs)
        entry: dict[str, Any] = {
            "batch": B,
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            **{name: median(xs) for name, xs in samples.items()},
            "samples": samples,
            "cache_bytes_per_token": cache_bytes_per_token(systems["ours"].last_caches),
        }
        if "standard" in systems:
            entry["cache_bytes_per_token_standard"] = cache_bytes_per_token(systems["standard"].last_caches)
        if "hf" in systems:
            ref = "standard" if "standard" in systems else "ours"
            entry["tokens_match"] = bool(torch.equal(outs[ref], outs["hf"]))
        results[f"batch_{B}"] = entry
    if "hf" in systems:
        checks["tokens_match"] = all(e["tokens_match"] for e in results.values())
    del systems
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results, checks


def add_ratios(entry: dict[str, Any], baseline: str | None) -> None:
    """ratio = ours / baseline; with a standard baseline and HF measured too, also ratio_hf = ours / hf."""
    entry["ratio"] = entry["ours"] / entry[baseline] if baseline in entry else None
    if baseline == "standard" and "hf" in entry:
        entry["ratio_hf"] = entry["ours"] / entry["hf"]


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


def format_table(result: dict[str, Any]) -> str:
    meta = result["meta"]
    base = meta["baseline"]
    lines = [
        f"kvcompress bench: {meta['model']['name']} attention={meta['attention']} cache={meta['cache']} "
        f"on {meta['device']} ({meta['dtype']}{', compiled' if meta['compile'] else ''})",
        f"{'measurement':<22}{'ours tok/s':>14}{(base or '-') + ' tok/s':>16}{'ratio':>9}",
    ]

    def row(label: str, e: dict[str, Any]) -> str:
        other = f"{e[base]:>16.1f}" if base in e else f"{'-':>16}"
        ratio = f"{e['ratio']:>8.2f}x" if e.get("ratio") is not None else f"{'-':>9}"
        extra = f"  (vs hf {e['ratio_hf']:.2f}x)" if "ratio_hf" in e else ""
        return f"{label:<22}{e['ours']:>14.1f}{other}{ratio}{extra}"

    if result.get("train"):
        t = result["train"]
        lines.append(row(f"train {t['batch']}x{t['seq_len']}", t))
    for e in (result.get("decode") or {}).values():
        lines.append(row(f"decode b={e['batch']}", e))
    decode = list((result.get("decode") or {}).values())
    if decode:
        line = f"cache bytes/token: ours {decode[0]['cache_bytes_per_token']:.0f}"
        if "cache_bytes_per_token_standard" in decode[0]:
            line += f", standard {decode[0]['cache_bytes_per_token_standard']:.0f}"
        lines.append(line)
    checks = result["checks"]
    if "tokens_match" in checks:
        lines.append(
            f"greedy tokens match hf: {checks['tokens_match']}; "
            f"prefill logits max |diff| {checks['prefill_logits_max_abs_diff']:.3g}"
        )
    if "first_loss" in checks:
        lines.append("first training loss: " + ", ".join(f"{k} {v:.4f}" for k, v in checks["first_loss"].items()))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if device.type == "cuda":  # identical math settings for every system in this process
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    transformers.logging.set_verbosity_error()  # HF generate() chatters about generation flags

    base, cfg = build_base_model(args)
    base = base.to(device)
    baseline = "standard" if cfg.attention != "standard" else ("hf" if args.compare_hf else None)

    meta: dict[str, Any] = {
        "schema": SCHEMA,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cpu_name()})",
        "device_type": device.type,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "dtype": dtype_name(dtype),
        "train_precision": "fp32" if dtype == torch.float32 else f"{dtype_name(dtype)} autocast, fp32 parameters",
        "decode_precision": f"{dtype_name(dtype)} weights and cache",
        "tf32": device.type == "cuda",
        "compile": args.compile,
        "optimizer": f"AdamW(lr=1e-4{', fused' if device.type == 'cuda' else ''})",
        "attention": cfg.attention,
        "attention_kwargs": cfg.attention_kwargs,
        "cache": args.cache,
        "baseline": baseline,
        "hf_attn_implementation": None,  # filled in from the HF model itself
        "hf_generate": "generate(do_sample=False, min_new_tokens=max_new_tokens, eos_token_id=None), DynamicCache"
        if args.compare_hf
        else None,
        "decode_tokens_per_s": "batch * new_tokens / wall time of one generation, prefill and cache allocation in",
        "model": cfg.to_dict(),
        "n_params": base.num_parameters(),
        "args": {k: v for k, v in vars(args).items()},
    }
    result: dict[str, Any] = {"meta": meta, "train": None, "decode": None, "checks": {}}
    if args.train:
        result["train"] = bench_train(base, args, device, dtype, meta)
        add_ratios(result["train"], baseline)
        result["checks"]["first_loss"] = result["train"].pop("first_loss")
    if args.decode:
        decode, checks = bench_decode(base, args, device, dtype, meta)
        for entry in decode.values():
            add_ratios(entry, baseline)
        result["decode"] = decode
        result["checks"].update(checks)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = run_benchmark(args)
    write_json(args.out, result)
    print(format_table(result))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
