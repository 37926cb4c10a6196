"""Small-sample statistics of the claims: Fieller intervals on seed-paired data, simultaneous
intervals for a best/worst over several comparisons, and the alpha spent at each round.

Pure numpy and scipy (no pandas, no torch), vectorised over leading axes so the coverage and
stopping-rule simulations in the tests run the very code the claims use.

Every claim's effect is a ratio of two linear combinations of group means, ``E[u] / E[v]``,
where ``u_i`` and ``v_i`` are computed per seed ``i`` from the values of every group the claim
compares under that seed (the groups share their seeds: the same seed gives the same teacher
draw, data order and noise, so their values correlate). Fieller's interval (Fieller 1954,
J. R. Stat. Soc. B 16:175) is the set of ratios ``r`` for which a paired t-test does not reject
``E[u - r v] = 0``; it is exact under normality for any n >= 2, needs no resampling (no Monte
Carlo error), and its decision at a threshold ``t`` is exactly the paired t-test of
``u - t v``. Where the denominator is not clearly away from zero the set is unbounded and the
claim stays inconclusive.

Rounds (seeds on demand) look at the data after every round. Each look k spends
``alpha_k = A(tau_k) - A(tau_{k-1})`` of the error rate, with the Pocock-type spending function
of Lan and DeMets (1983, Biometrika 70:659), ``A(tau) = alpha * ln(1 + (e - 1) tau)``, and
``tau_k = n_k / n_max`` the share of the seed cap used. A claim is judged at look k by its
interval at level ``1 - alpha_k`` (a repeated confidence interval, Jennison and Turnbull 2000,
ch. 9). Since the levels sum to alpha, the chance of any false decision over all looks is at
most alpha whatever the correlation between looks (the union bound; conservative, and exact
tests at each look keep it valid at every n). A single look spends all of alpha.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats as _st


def t_quantile(alpha: float, df) -> np.ndarray:
    """Two-sided critical value of Student's t with ``df`` degrees of freedom at level
    ``1 - alpha``."""
    return _st.t.ppf(1.0 - np.asarray(alpha, dtype=float) / 2.0, df)


def fieller(u: np.ndarray, v: np.ndarray, alpha: float) -> tuple[np.ndarray, ...]:
    """Estimate and ``1 - alpha`` Fieller interval of ``E[u] / E[v]`` from paired rows.

    Args:
        u, v: (..., n) per-seed numerator and denominator; the last axis is the seed.
        alpha: two-sided error rate of the interval.
    Returns:
        (estimate, lo, hi), each of shape (...): ``mean(u) / mean(v)`` and the interval; NaN
        for n < 2, -inf/+inf where the set is unbounded (the denominator's own interval
        contains 0).
    """
    u, v = np.asarray(u, dtype=float), np.asarray(v, dtype=float)
    n = u.shape[-1]
    shape = u.shape[:-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        ub, vb = u.mean(-1), v.mean(-1)
        est = ub / vb
    if n < 2:
        if not shape:
            return float(est), np.nan, np.nan
        nan = np.full(shape, np.nan)
        return est, nan, nan.copy()
    du, dv = u - ub[..., None], v - vb[..., None]
    suu = (du * du).sum(-1) / (n - 1) / n  # variances of the means
    svv = (dv * dv).sum(-1) / (n - 1) / n
    suv = (du * dv).sum(-1) / (n - 1) / n
    q2 = float(t_quantile(alpha, n - 1)) ** 2
    a = vb * vb - q2 * svv
    b = -2.0 * (ub * vb - q2 * suv)
    c = ub * ub - q2 * suu
    disc = np.maximum(b * b - 4 * a * c, 0.0)
    bounded = a > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        r1 = (-b - np.sqrt(disc)) / (2 * a)
        r2 = (-b + np.sqrt(disc)) / (2 * a)
    lo = np.where(bounded, np.minimum(r1, r2), -np.inf)
    hi = np.where(bounded, np.maximum(r1, r2), np.inf)
    if not shape:
        return float(est), float(lo), float(hi)
    return est, lo, hi


def abs_interval(lo, hi) -> tuple[np.ndarray, np.ndarray]:
    """The interval of ``|x|`` given one of ``x``."""
    lo, hi = np.asarray(lo, dtype=float), np.asarray(hi, dtype=float)
    straddles = (lo <= 0) & (hi >= 0)
    a = np.where(straddles, 0.0, np.minimum(np.abs(lo), np.abs(hi)))
    b = np.maximum(np.abs(lo), np.abs(hi))
    return a, b


def spent(alpha: float, tau) -> np.ndarray:
    """Lan-DeMets Pocock-type spending function: the error rate spent by information ``tau``."""
    tau = np.clip(np.asarray(tau, dtype=float), 0.0, 1.0)
    return alpha * np.log1p((math.e - 1.0) * tau)


def look_alphas(alpha: float, ns) -> list[float]:
    """The error rate each look spends, for looks at ``ns`` seeds (increasing; the last is the
    cap). One look: ``[alpha]``."""
    ns = [int(n) for n in ns]
    if not ns:
        return []
    cum = spent(alpha, np.array(ns, dtype=float) / ns[-1])
    return [float(x) for x in np.diff(np.concatenate([[0.0], cum]))]


def schedule(start: int, step: int, cap: int) -> list[int]:
    """Seeds per group at each look: start, start + step, ..., cap (the last one capped)."""
    ns, n = [], int(start)
    while n < cap:
        ns.append(n)
        n += int(step)
    return ns + [int(cap)]


def decide(lo: float, hi: float, threshold: float, holds_if: str) -> str | None:
    """'holds' / 'does not hold' when the interval excludes ``threshold``, else None.
    ``holds_if``: 'below' (holds when the whole interval is below) or 'above'."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo <= threshold <= hi:
        return None
    below = hi < threshold
    return "holds" if below == (holds_if == "below") else "does not hold"


SEEDS_PLANNED_MAX = 100_000
"""seeds_to_decide gives up beyond this many seeds per group (the estimate sits at the threshold)."""


def seeds_to_decide(effect: float, lo: float, hi: float, threshold: float, n: int,
                    alpha: float) -> int | None:
    """Planning estimate: the smallest seeds per group m at which the interval, with the
    observed spread and t critical value at m - 1 degrees of freedom, excludes ``threshold``
    around the unchanged estimate. None when it cannot be computed (n < 2, no estimate, an
    unbounded interval, the estimate on the threshold) or the interval already excludes it."""
    if n < 2 or not all(math.isfinite(x) for x in (effect, lo, hi)):
        return None
    if lo > threshold or hi < threshold or math.isclose(effect, threshold, abs_tol=1e-12):
        return None
    half = (effect - lo) if effect > threshold else (hi - effect)
    sd = half / float(t_quantile(alpha, n - 1)) * math.sqrt(n)  # per-seed spread
    gap = abs(effect - threshold)
    m = n + 1
    while m < SEEDS_PLANNED_MAX and float(t_quantile(alpha, m - 1)) * sd / math.sqrt(m) >= gap:
        m = max(m + 1, int(m * 1.05))
    if m >= SEEDS_PLANNED_MAX:
        return None
    while m - 1 > n and float(t_quantile(alpha, m - 2)) * sd / math.sqrt(m - 1) < gap:
        m -= 1
    return m
