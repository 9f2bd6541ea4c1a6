"""Seed report 000's open next steps as a table of `make reproduce` (table "000n" of conf/reproduce/*.yaml):
grouped K/V heads (GQA-2, MQA) converted from the trained baseline by mean-pooling and uptrained, the KA cache with
and without them (PPL against measured bytes), and the KA adapter's variants (a wider bottleneck, two layers, the
unrolled loss) with their autoregressive PPL by epoch.

These are new results: every comparison is "reported" with its paired 95% CI and the side of 1 it lies on, never
"reproduced". Comparisons pair windows as the claims do (`claims.compare`: the same validation windows in every run
and seed, pooled over seeds by the hierarchical bootstrap); the KV and KA caches are both decoded token by token on
the first `eval.autoregressive.max_batches` validation batches, so they pair with each other, and the pooled GQA
model before uptraining is its stage's starting weights (`start:gqa`, `windows_start.safetensors`).
"""

from __future__ import annotations

from pathlib import Path

from kvcompress.reproduce.claims import (
    Claim,
    Judgement,
    Missing,
    Ref,
    Runs,
    Table,
    Threshold,
    adapter_curve,
    compare,
    fmt,
)

REPORTED = "reported"
NEW_RESULT = Threshold(1.0, "none: a new result, reported with the side of 1 its interval lies on")
KV, KA_PLAIN, KA = "cache:native", "cache:ka_plain", "cache:ka"  # the run's own cache is kv (standard attention)


def reported(claim_id: str, text: str, a: Ref, b: Ref) -> Claim:
    """PPL(b) / PPL(a), reported with its 95% CI and the side of 1 it lies on."""

    def check(runs: Runs, threshold: Threshold) -> Judgement:
        cmp = compare(runs, a, b)
        side = "lower" if cmp.ci[1] < 1 else "higher" if cmp.ci[0] > 1 else "inconclusive: the CI straddles 1"
        scope = f" ({cmp.n_windows} windows, {cmp.n_seeds[0]}/{cmp.n_seeds[1]} seeds)"
        return Judgement(f"{REPORTED}: {side}", "— (a new result)", cmp.text() + scope, threshold.source)

    return Claim(claim_id, text, check, NEW_RESULT)


def adapter_epochs(claim_id: str, run: str, loss: str = "adapter/val_adapter") -> Claim:
    """The adapter stage's autoregressive KA-cache PPL by epoch (mean ± std over seeds), and in how many seeds it rose
    from epoch 1 to 2 while the training objective's validation value fell (report 000's divergence)."""

    def check(runs: Runs, threshold: Threshold) -> Judgement:
        curves = [adapter_curve(Path(m["_folder"]), loss) for m in runs.get(run, []) if m.get("_folder")]
        curves = [c for c in curves if c]
        if not curves:
            raise Missing(f"no adapter-stage validation in {run}'s CSV log")
        epochs = max(len(c) for c in curves)
        by_epoch = "; ".join(f"epoch {i + 1}: {fmt([c[i][1] for c in curves if len(c) > i])}" for i in range(epochs))
        twice = [c for c in curves if len(c) > 1]
        rose = sum(c[1][0] < c[0][0] and c[1][1] > c[0][1] for c in twice)
        note = f"{rose} of {len(twice)} seeds: {loss} fell and the KA-cache PPL rose from epoch 1 to 2"
        return Judgement(REPORTED, "report 000: 439.2 → 516.7 (epoch 1 → 2)", by_epoch, threshold.source, note)

    return Claim(claim_id, f"{run}: KA-cache autoregressive PPL by epoch", check, A_CURVE)


A_CURVE = Threshold(0.0, "none: a curve, reported")


def _rows(label: str, run: str, caches: tuple[str, ...]) -> list[tuple[str, str, str, float | None]]:
    """Seed rows: the run's val PPL and, per cache, its autoregressive PPL and measured bytes per token."""
    rows: list[tuple[str, str, str, float | None]] = [(f"{label}: val PPL", run, "val_ppl", None)]
    for key in caches:
        rows.append((f"{label}, {key} cache: autoregressive PPL", run, f"caches.{key}.autoregressive_ppl", None))
        rows.append((f"{label}, {key} cache: bytes / token", run, f"caches.{key}.bytes_per_token", None))
    return rows


BASE, GQA2_START, MQA_START = Ref("baseline", KV), Ref("gqa2", "val", "start:gqa"), Ref("mqa", "val", "start:gqa")
NEXT_STEPS = Table(
    "Seed report 000's next steps: GQA / MQA with the KA cache, and the adapter variants (new results, reported)",
    [
        *_rows("MHA", "baseline", ("native", "ka_plain")),
        ("GQA-2 pooled, before uptraining: val PPL", "gqa2", "stages.gqa.start_val_ppl", None),
        *_rows("GQA-2 uptrained", "gqa2", ("native", "ka_plain")),
        ("MQA pooled, before uptraining: val PPL", "mqa", "stages.gqa.start_val_ppl", None),
        *_rows("MQA uptrained", "mqa", ("native", "ka_plain")),
        *_rows("MHA + adapter", "ka_adapter", ("ka",)),
        *_rows("GQA-2 + adapter", "gqa2_ka_adapter", ("ka",)),
        *_rows("MQA + adapter", "mqa_ka_adapter", ("ka",)),
        *_rows("MHA + adapter, bottleneck 128", "ka_adapter_wide", ("ka",)),
        *_rows("MHA + adapter, 2 layers", "ka_adapter_deep", ("ka",)),
        *_rows("MHA + adapter, unrolled loss", "ka_adapter_unrolled", ("ka",)),
    ],
    [
        reported("gqa2_pooled", "GQA-2 pooled (before uptraining) / MHA, val PPL", Ref("baseline"), GQA2_START),
        reported("gqa2_uptrained", "GQA-2 uptrained / pooled, val PPL", GQA2_START, Ref("gqa2")),
        reported("gqa2_vs_mha", "GQA-2 uptrained / MHA, val PPL", Ref("baseline"), Ref("gqa2")),
        reported("mqa_pooled", "MQA pooled (before uptraining) / MHA, val PPL", Ref("baseline"), MQA_START),
        reported("mqa_uptrained", "MQA uptrained / pooled, val PPL", MQA_START, Ref("mqa")),
        reported("mqa_vs_mha", "MQA uptrained / MHA, val PPL", Ref("baseline"), Ref("mqa")),
        reported("ka_plain_mha", "MHA: KA cache, no adapter / KV", BASE, Ref("baseline", KA_PLAIN)),
        reported("ka_plain_gqa2", "GQA-2: KA cache, no adapter / KV", Ref("gqa2", KV), Ref("gqa2", KA_PLAIN)),
        reported("ka_plain_mqa", "MQA: KA cache, no adapter / KV", Ref("mqa", KV), Ref("mqa", KA_PLAIN)),
        reported("ka_mha", "MHA: KA cache + adapter / KV cache", BASE, Ref("ka_adapter", KA)),
        reported("ka_gqa2", "GQA-2: KA cache + adapter / MHA KV cache", BASE, Ref("gqa2_ka_adapter", KA)),
        reported("ka_mqa", "MQA: KA cache + adapter / MHA KV cache", BASE, Ref("mqa_ka_adapter", KA)),
        reported("wide", "Adapter, bottleneck 128 / bottleneck 64", Ref("ka_adapter", KA), Ref("ka_adapter_wide", KA)),
        reported("deep", "Adapter, 2 layers / 1 layer", Ref("ka_adapter", KA), Ref("ka_adapter_deep", KA)),
        reported("unrolled", "Adapter, unrolled / MSE loss", Ref("ka_adapter", KA), Ref("ka_adapter_unrolled", KA)),
        adapter_epochs("epochs_mse", "ka_adapter"),
        adapter_epochs("epochs_wide", "ka_adapter_wide"),
        adapter_epochs("epochs_deep", "ka_adapter_deep"),
        adapter_epochs("epochs_unrolled", "ka_adapter_unrolled", "adapter/val_unrolled"),
    ],
)  # fmt: skip
