"""Every seed on the page: per-group summaries that keep each seed's value, and the strip of
dots (one per seed) with the median on top that every per-group figure draws.

With two or three seeds a group can be bimodal (one seed succeeds, two fail: 3.27 / 95.9 / 183),
where a mean ± std (94 ± 90) or a bootstrap band describes no run at all. So figures draw each
seed and mark the median, and tables print the median and the seeds of a ``wide`` group.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.style import fmt_num

WIDE_RATIO = 3.0
"""A group whose largest and smallest seed differ by more than this factor is ``wide``."""


def wide(values) -> bool:
    """Seeds too far apart for a mean ± std to describe them: at least two seeds, and the
    largest more than WIDE_RATIO times the smallest (or a spread larger than the median's size
    where values are not all positive)."""
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if len(v) < 2:
        return False
    if v.min() > 0:
        return bool(v.max() / v.min() > WIDE_RATIO)
    return bool(np.ptp(v) > abs(np.median(v)))


def seed_summary(df: pd.DataFrame, keys: list, value: str = "value") -> pd.DataFrame:
    """Per group of ``keys``: n, median, mean, std (ddof 1), min, max, ``wide``, and the seeds
    and their values in seed order (``seeds`` '0;1;2', ``values`` '3.27;95.9;183')."""
    cols = list(keys) + ["n", "median", "mean", "std", "min", "max", "wide", "seeds", "values"]
    d = df.dropna(subset=[value])
    if d.empty:
        return pd.DataFrame(columns=cols)
    out = []
    for k, g in d.sort_values("seed", kind="stable").groupby(keys, sort=True, dropna=False):
        v = g[value].to_numpy(float)
        out.append([*(k if isinstance(k, tuple) else (k,)), len(v), float(np.median(v)),
                    float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else np.nan,
                    float(v.min()), float(v.max()), wide(v),
                    ";".join(str(int(s)) for s in g["seed"]),
                    ";".join(f"{x:.6g}" for x in v)])
    return pd.DataFrame(out, columns=cols)


def seeds_text(values: str, sep: str = " / ") -> str:
    """'3.27;95.9;182.8' -> '3.27 / 95.9 / 183' (3 significant digits)."""
    return sep.join(fmt_num(float(x)) for x in str(values).split(";") if x)


def offsets(n: int, width: float) -> np.ndarray:
    """x offsets of n seed dots spread evenly over ``width`` (no random jitter: stable)."""
    if n <= 1:
        return np.zeros(max(n, 0))
    return np.linspace(-width / 2, width / 2, n)


def strip(ax, x: float, values, color: str, width: float = 0.16, filled: bool = True,
          zorder: int = 3) -> None:
    """One dot per seed around ``x`` and the median as a short dark bar on top."""
    v = np.asarray([y for y in values if np.isfinite(y)], dtype=float)
    if not len(v):
        return
    xs = x + offsets(len(v), width)
    ax.scatter(xs, v, s=14, marker="o", facecolors=color if filled else "white",
               edgecolors=color, linewidths=1.0, zorder=zorder, alpha=0.9)
    half = max(width / 2 + 0.05, 0.09)
    ax.plot([x - half, x + half], [np.median(v)] * 2, color="#222222", lw=1.6,
            solid_capstyle="butt", zorder=zorder + 1)
