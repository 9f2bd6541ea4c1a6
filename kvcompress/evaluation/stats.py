"""Paired statistics for comparing runs scored on the same validation windows.

The unit is the window: every run scored on one fixed set of windows gives, for a metric (all tokens, a position
bucket, or a cache's autoregressive losses), one mean loss per window (nats per token; every window of a metric
has the same number of tokens, so the metric's loss is the mean over windows). A configuration run with several
seeds gives a (seeds, windows) array. The ratio of two configurations' PPLs is `exp(mean loss B - mean loss A)`.

`paired_ratio(a, b)` gives that ratio with a confidence interval, by one of two named methods:
- `"bootstrap"` (the default): a hierarchical paired bootstrap. Each resample draws each configuration's seeds
  with replacement (training noise) and one set of windows with replacement, shared by both configurations
  (the pairing: the choice of text is noise too, but the same text for A and B). Percentile interval.
- `"t"`: a t interval over windows of the seed-averaged paired differences (text noise only; it ignores the
  seed-to-seed spread). Exact and cheap; used where it can be computed by hand.

Verdict rules on a `Comparison` (three outcomes; "inconclusive" when the interval straddles the threshold):
`verdict_greater` (the ratio exceeds a threshold), `verdict_less`, `verdict_within` (an equivalence test,
TOST: both one-sided tests at level alpha, i.e. the (1 - 2 alpha) interval inside the margin).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "INCONCLUSIVE",
    "METHODS",
    "NOT_REPRODUCED",
    "REPRODUCED",
    "Comparison",
    "paired_ratio",
    "verdict_greater",
    "verdict_less",
    "verdict_within",
]

METHODS = ("bootstrap", "t")
REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"


@dataclass(frozen=True)
class Comparison:
    """PPL(B) / PPL(A) on paired windows, with its interval at `level`."""

    ratio: float
    ci: tuple[float, float]
    level: float
    n_windows: int
    n_seeds: tuple[int, int]  # (A, B)
    method: str
    per_seed: list[float] = field(default_factory=list)  # the ratio of each seed pair (seed i of A with seed i of B)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ci"] = list(self.ci)
        out["n_seeds"] = list(self.n_seeds)
        return out

    def text(self, digits: int = 3) -> str:
        lo, hi = self.ci
        return f"{self.ratio:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _as_2d(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 2:
        raise ValueError(f"{name}: per-window losses must be (seeds, windows) with >= 2 windows, got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: per-window losses hold NaN or inf (a diverged run cannot be compared)")
    return arr


def _t_quantile(p: float, dof: int) -> float:
    """The p-quantile of Student's t with `dof` degrees of freedom (scipy-free: bisection on the CDF)."""
    if dof > 1000:
        return _normal_quantile(p)

    def cdf(t: float) -> float:  # regularized incomplete beta via the continued fraction (Numerical Recipes)
        x = dof / (dof + t * t)
        tail = 0.5 * _betainc(dof / 2, 0.5, x)
        return 1 - tail if t > 0 else tail

    lo, hi = -1e3, 1e3
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def _normal_quantile(p: float) -> float:
    lo, hi = -40.0, 40.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 0.5 * math.erfc(-mid / math.sqrt(2)) < p else (lo, mid)
    return (lo + hi) / 2


def _betainc(a: float, b: float, x: float) -> float:
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1 - front * _betacf(b, a, 1 - x) / b


def _betacf(a: float, b: float, x: float) -> float:
    tiny = 1e-300
    c, d = 1.0, 1 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1 + num * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return h


def paired_ratio(
    a: Any,
    b: Any,
    *,
    level: float = 0.95,
    method: str = "bootstrap",
    resamples: int = 2000,
    seed: int = 0,
) -> Comparison:
    """PPL(B) / PPL(A) from per-window mean losses `a` (seeds_a, windows) and `b` (seeds_b, windows), the same
    windows in the same order, with a `level` interval by `method` (see the module docstring)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    a, b = _as_2d(a, "A"), _as_2d(b, "B")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"A and B are scored on different numbers of windows ({a.shape[1]} vs {b.shape[1]})")
    n = a.shape[1]
    diff = b.mean(axis=0) - a.mean(axis=0)  # (windows,) seed-averaged paired differences
    ratio = math.exp(float(diff.mean()))
    per_seed = [math.exp(float((b[i] - a[i]).mean())) for i in range(min(len(a), len(b)))]
    alpha = 1 - level
    if method == "t":
        se = float(diff.std(ddof=1)) / math.sqrt(n)
        half = _t_quantile(1 - alpha / 2, n - 1) * se
        lo, hi = math.exp(float(diff.mean()) - half), math.exp(float(diff.mean()) + half)
    else:
        rng = np.random.default_rng(seed)
        draws = np.empty(resamples)
        for r in range(resamples):
            windows = rng.integers(0, n, n)
            seeds_a = rng.integers(0, len(a), len(a))
            seeds_b = rng.integers(0, len(b), len(b))
            draws[r] = b[seeds_b][:, windows].mean() - a[seeds_a][:, windows].mean()
        lo, hi = (math.exp(float(q)) for q in np.quantile(draws, [alpha / 2, 1 - alpha / 2]))
    return Comparison(ratio, (lo, hi), level, n, (len(a), len(b)), method, per_seed)


def verdict_greater(cmp: Comparison, threshold: float) -> str:
    """The claim "ratio > threshold": reproduced if the whole interval is above, not reproduced if the whole
    interval is at or below, inconclusive if it straddles the threshold."""
    lo, hi = cmp.ci
    if lo > threshold:
        return REPRODUCED
    if hi <= threshold:
        return NOT_REPRODUCED
    return INCONCLUSIVE


def verdict_less(cmp: Comparison, threshold: float) -> str:
    """The claim "ratio < threshold" (e.g. B is better than A: threshold 1)."""
    lo, hi = cmp.ci
    if hi < threshold:
        return REPRODUCED
    if lo >= threshold:
        return NOT_REPRODUCED
    return INCONCLUSIVE


def verdict_within(equivalence: Comparison, difference: Comparison, margin: float) -> str:
    """The claim "B is within `margin` of A" (e.g. 0.02 for 2%), by TOST.

    `equivalence` is the comparison at level 1 - 2 alpha (0.90 for alpha = 0.05), `difference` the same at
    1 - alpha (0.95): reproduced when the equivalence interval lies inside [1 / (1 + margin), 1 + margin];
    not reproduced when the difference interval lies wholly outside it; inconclusive otherwise."""
    lo_m, hi_m = 1 / (1 + margin), 1 + margin
    lo, hi = equivalence.ci
    if lo_m <= lo and hi <= hi_m:
        return REPRODUCED
    lo, hi = difference.ci
    if lo > hi_m or hi < lo_m:
        return NOT_REPRODUCED
    return INCONCLUSIVE
