"""LEGO's decode speed (report 002's generation speed): full-depth greedy decoding vs true early exit (each fill
policy) vs greedy self-speculation, timed back to back in this process with the project's one timer.

`LegoDecodeBenchmark` is an end-of-run evaluation (`eval=lego` adds it as `eval.extra.lego_decode`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from kvcompress.data.batch import split_batch
from kvcompress.evaluation.evaluate import set_up_val_dataset
from kvcompress.evaluation.metrics import timed
from kvcompress.methods.lego import FILL_POLICIES, LegoGPTNeoX, compute_cost
from kvcompress.methods.lego_decode import Decoded, check_fillable, generate_early_exit, generate_self_speculative
from kvcompress.models.generate import generate

if TYPE_CHECKING:
    from kvcompress.data.datamodule import TokenWindowDataModule

__all__ = ["LegoDecodeBenchmark", "early_exit_speed"]


def _mean_seconds(fn: Callable[[], Any], repeats: int, device: torch.device) -> tuple[float, Any]:
    """Mean seconds of `fn()` over `repeats` calls after one warm-up, and the last result."""
    fn()
    total, out = 0.0, None
    for _ in range(repeats):
        seconds, out = timed(fn, device)
        total += seconds
    return total / repeats, out


@torch.no_grad()
def early_exit_speed(
    model: LegoGPTNeoX,
    prompts: Sequence[Tensor],
    new_tokens: int,
    *,
    fills: Sequence[str] = FILL_POLICIES,
    draft_tokens: int = 4,
    repeats: int = 1,
    cache: str = "native",
) -> dict[str, Any]:
    """Tokens/s of full-depth greedy decoding, of early exit (each fill policy, the model's threshold) and of
    greedy self-speculation, each over all `prompts` (batches of ids), timed back to back after a warm-up.

    `compute_cost` (and `theoretical_speedup` = 1 / compute_cost) counts layers at the decode's own shallow share.
    """
    device = model.embed_out.weight.device
    n = sum(p.shape[0] for p in prompts) * new_tokens

    def over_prompts(decode: Callable[[Tensor], Any]) -> Callable[[], list[Any]]:
        return lambda: [decode(p) for p in prompts]

    full_s, full = _mean_seconds(over_prompts(lambda p: generate(model, p, new_tokens, cache=cache)), repeats, device)
    out: dict[str, Any] = {"new_tokens": new_tokens, "sequences": n // new_tokens, "full_tokens_per_s": n / full_s}
    for fill in fills:

        def early_exit(p: Tensor, fill: str = fill) -> Decoded:
            return generate_early_exit(model, p, new_tokens, fill=fill, cache=cache)

        decode = over_prompts(early_exit)
        secs, runs = _mean_seconds(decode, repeats, device)
        share = float(torch.cat([r.shallow.flatten() for r in runs]).float().mean())
        cost = compute_cost(share, model.shallow_exit, model.deep_exit)
        out[fill] = {
            "tokens_per_s": n / secs,
            "speedup": full_s / secs,
            "shallow_share": share,
            "compute_cost": cost,
            "theoretical_speedup": 1 / cost,
            "speedup_vs_theoretical": full_s / secs * cost,
            "same_tokens_as_full": sum(bool(torch.equal(r.tokens, f)) for r, f in zip(runs, full)) / len(runs),
        }
    decode = over_prompts(
        lambda p: generate_self_speculative(model, p, new_tokens, draft_tokens=draft_tokens, cache=cache)
    )
    secs, runs = _mean_seconds(decode, repeats, device)
    drafted, accepted = sum(r.drafted for r in runs), sum(r.accepted for r in runs)
    out["self_speculative"] = {
        "tokens_per_s": n / secs,
        "speedup": full_s / secs,
        "acceptance_rate": accepted / drafted if drafted else 0.0,
        "draft_tokens": draft_tokens,
        "same_tokens_as_full": float(all(torch.equal(r.tokens, f) for r, f in zip(runs, full))),
    }
    return out


class LegoDecodeBenchmark:
    """An `eval.extra` entry: decode tokens/s of full depth, true early exit (each fill policy, the calibrated
    threshold) and greedy self-speculation, back to back on the first validation windows' starts.

    Settings are checked when it is built, and `check(net)` checks the caches before any training."""

    def __init__(
        self,
        prompts: int = 16,
        prompt_len: int = 8,
        new_tokens: int = 24,
        batch_size: int = 1,
        draft_tokens: int = 4,
        repeats: int = 2,
        fills: Sequence[str] = FILL_POLICIES,
        cache: str = "native",
    ) -> None:
        for name, value in (("prompts", prompts), ("prompt_len", prompt_len), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"eval.extra.lego_decode.{name} must be an integer >= 1, got {value!r}")
        if new_tokens < 2 or repeats < 1 or draft_tokens < 1:
            raise ValueError(
                "eval.extra.lego_decode needs new_tokens >= 2, repeats >= 1 and draft_tokens >= 1, got "
                f"{new_tokens}, {repeats}, {draft_tokens}"
            )
        unknown = [f for f in fills if f not in FILL_POLICIES]
        if unknown:
            raise ValueError(f"eval.extra.lego_decode.fills: unknown {unknown}; use some of {list(FILL_POLICIES)}")
        self.prompts, self.prompt_len, self.new_tokens = prompts, prompt_len, new_tokens
        self.batch_size, self.draft_tokens, self.repeats = batch_size, draft_tokens, repeats
        self.fills, self.cache = list(fills), cache

    def check(self, net: Any) -> None:
        """The net is a LEGO model whose caches each fill policy can fill."""
        net = _lego(net)
        caches = net.build_caches(1, 2, kind=self.cache)
        for fill in self.fills:
            check_fillable(net, caches, fill)

    @torch.no_grad()
    def __call__(self, *, net: Any, datamodule: TokenWindowDataModule) -> dict[str, Any]:
        net = _lego(net)
        net.eval()
        val = set_up_val_dataset(datamodule)
        device = net.embed_out.weight.device
        n = min(self.prompts, len(val))
        starts = torch.stack([split_batch(val[i])[0][: self.prompt_len] for i in range(n)]).to(device)
        out = early_exit_speed(
            net,
            list(starts.split(self.batch_size)),
            self.new_tokens,
            fills=self.fills,
            draft_tokens=self.draft_tokens,
            repeats=self.repeats,
            cache=self.cache,
        )
        info = {"threshold": float(net.threshold), "batch_size": self.batch_size, "prompt_len": self.prompt_len}
        return {**info, "cache": self.cache, **out}


def _lego(net: Any) -> LegoGPTNeoX:
    if not isinstance(net, LegoGPTNeoX):
        raise TypeError(f"eval=lego needs model=lego, got {type(net).__name__}")
    return net
