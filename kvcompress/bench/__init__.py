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

The package, one idea a file: `probes` (device, dtype, memory and bandwidth probes), `systems` (one decode system
per registered cache kind, seeded models, HF), `train` (training tokens/s), `decode` (TTFT / TPOT per system, each
in its own process), `table` (the JSON and the printed tables), `cli` (presets, arguments, the run).
"""

from kvcompress.bench.cli import DEFAULT_OUT, PRESETS, SCHEMA, main, parse_args, run_benchmark
from kvcompress.bench.systems import HF, systems
from kvcompress.bench.table import format_table

__all__ = ["DEFAULT_OUT", "HF", "PRESETS", "SCHEMA", "format_table", "main", "parse_args", "run_benchmark", "systems"]
