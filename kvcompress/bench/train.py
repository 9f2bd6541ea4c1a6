"""Training tokens/s: forward + cross-entropy + backward + AdamW, ours vs HF `GPTNeoXForCausalLM` (same weights,
in-process, alternating), and another attention vs standard attention."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kvcompress.bench.probes import alternate, median, timed
from kvcompress.bench.systems import hf_model, seeded_model


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision for training: autocast to `dtype` over fp32 parameters (nothing for fp32)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


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

        def step(
            batch: Tensor, module: Callable[..., Any] = module, opt: torch.optim.Optimizer = opt, is_hf: bool = is_hf
        ) -> Tensor:
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
    for warm_up in steps.values():
        for i in range(max(args.warmup - 1, 0)):
            warm_up(batches[(i + 1) % len(batches)])
    samples: dict[str, list[float]] = {name: [] for name in steps}
    tokens = args.train_batch * seq_len * args.train_steps
    for r in range(args.repeats):
        for name in alternate(list(steps), r):

            def run(step: Callable[[Tensor], Tensor] = steps[name]) -> None:
                for i in range(args.train_steps):
                    step(batches[i % len(batches)])

            samples[name].append(tokens / timed(run, device)[0])
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
