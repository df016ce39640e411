"""Bootstrap intervals over held-out groups: how much a mean over a handful of groups can be trusted.

A study holds out few groups (6 on the embedded default: 2 cell types x 3 days, or 3 mice x 7 cell types), so a
difference of 0.01 in a mean over them may be noise. Each interval resamples the groups with replacement
(percentile bootstrap, fixed seed). Resampling uses the same group draws for every model that has the same
groups, so differences between models are paired.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

N_BOOT = 2000
LEVEL = 0.95


def _draws(n: int, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def bootstrap_interval(values, n_boot: int = N_BOOT, level: float = LEVEL, seed: int = 0) -> tuple[float, float]:
    """(lo, hi) percentile interval of the mean of `values` over resampled groups; NaN values are skipped."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    means = values[_draws(len(values), n_boot, seed)].mean(axis=1)
    tail = (1 - level) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def paired_difference(a, b, n_boot: int = N_BOOT, level: float = LEVEL, seed: int = 0) -> dict[str, float]:
    """Mean of a − b over groups both score (same order), its interval, and per-group wins / losses / ties of a."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    diff = a[keep] - b[keep]
    lo, hi = bootstrap_interval(diff, n_boot, level, seed)
    return {"diff": float(diff.mean()) if len(diff) else float("nan"), "diff_lo": lo, "diff_hi": hi,
            "wins": int((diff > 0).sum()), "losses": int((diff < 0).sum()), "ties": int((diff == 0).sum()),
            "n_groups": len(diff)}


def with_intervals(summary: dict[str, float], groups: pd.DataFrame, metrics, seed: int = 0) -> dict[str, float]:
    """summary plus <metric>_lo / <metric>_hi for each metric column of the per-group table."""
    out = dict(summary)
    for metric in metrics:
        if metric in groups:
            out[f"{metric}_lo"], out[f"{metric}_hi"] = bootstrap_interval(groups[metric], seed=seed)
    return out
