"""Percentile bootstrap of a mean over seeds, per group, vectorised (the verifier figure's
interval), and a fast quantile over the last axis.

A percentile interval from 2-3 seeds is wide and can be misleading; figures that compare
groups draw every seed instead and use these intervals only where a table asks for them.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

B = 2000
LEVEL = 0.95


def mean_ci(df: pd.DataFrame, keys: list, rng: np.random.Generator, value: str = "value",
            b: int = B) -> pd.DataFrame:
    """Per group of ``keys``: n, mean, std (ddof 1) and a 95% percentile bootstrap CI of the mean
    over the group's rows (its seeds). Groups of equal size share one draw of resampling weights
    (each group's interval is still a correct marginal interval). n < 2 gives a NaN interval."""
    d = df.dropna(subset=[value])
    if d.empty:
        return pd.DataFrame(columns=list(keys) + ["n", "mean", "std", "ci_low", "ci_high"])
    g = d.groupby(keys, sort=True, dropna=False)[value]
    stats = g.agg(n="count", mean="mean", std="std").reset_index()
    codes = g.ngroup().to_numpy()
    order = np.argsort(codes, kind="stable")
    vals = d[value].to_numpy(dtype=float)[order]
    counts = np.bincount(codes, minlength=len(stats))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    lo = np.full(len(stats), np.nan)
    hi = np.full(len(stats), np.nan)
    q = [(1 - LEVEL) / 2, 1 - (1 - LEVEL) / 2]
    for n in sorted(set(counts.tolist())):
        if n < 2:
            continue
        idx = np.nonzero(counts == n)[0]
        w = rng.multinomial(n, np.full(n, 1.0 / n), size=b).astype(float) / n  # (b, n)
        chunk = max(1, 4_000_000 // b)
        for s in range(0, len(idx), chunk):
            sel = idx[s:s + chunk]
            means = vals[starts[sel][:, None] + np.arange(n)] @ w.T  # (g, b)
            lo[sel], hi[sel] = percentiles(means, q)
    stats["ci_low"], stats["ci_high"] = lo, hi
    return stats


def percentiles(a: np.ndarray, qs) -> np.ndarray:
    """np.quantile(a, qs, axis=-1) (linear interpolation) via one np.partition: ~3x faster."""
    a = np.asarray(a, dtype=float)
    n = a.shape[-1]
    pos = np.asarray(qs, dtype=float) * (n - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    p = np.partition(a, sorted(set(lo.tolist() + hi.tolist())), axis=-1)
    fr = pos - lo
    out = p[..., lo] * (1 - fr) + p[..., hi] * fr
    return np.moveaxis(out, -1, 0)
