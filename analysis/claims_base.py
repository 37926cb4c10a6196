"""What every claim shares: its result object, the seed-paired groups it compares, and the one
way an effect's interval is computed (``analysis.stats``: Fieller intervals of per-seed
contrasts; a best or worst over several comparisons from simultaneous intervals).

Pure numpy/pandas (no torch, no Ray); ``analysis.claims`` judges, ``analysis.claims_c3`` and
``analysis.verifier`` add C3 and C4.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis.data import PLAIN_TEACHER
from analysis.stats import SEEDS_PLANNED_MAX, abs_interval, decide, fieller, seeds_to_decide
from analysis.style import fmt_pm, loss_sort_key
from analysis.tables import fmt_pct

NOT_TESTED = "not tested by this study"
METHOD = ("Fieller interval of a ratio of seed-paired means (paired t on the per-seed contrast "
          "u − r·v, n − 1 degrees of freedom)")
METHOD_SIMULTANEOUS = (METHOD + "; the best/worst over k comparisons from their simultaneous "
                       "(Bonferroni, error rate / k) intervals")


@dataclass
class ClaimResult:
    """One claim judged at one level of the other grid axes (and one kimg, or the final).

    ``claim`` is the claim's name (C1, C3e[band], ...), ``name`` adds the level. ``ci_low`` /
    ``ci_high`` (also ``lo`` / ``hi``) bound ``effect`` at level ``1 - alpha``; ``round`` is the
    round (look) the verdict was reached at, of ``rounds`` in the seeds-on-demand plan (None:
    not decided); ``seeds`` the seed values used; ``next_seeds`` the seeds the next round adds
    to ``cells``' groups while the claim is open."""

    claim: str
    comparison: str
    effect_name: str = ""
    effect: float = math.nan
    ci_low: float = math.nan
    ci_high: float = math.nan
    n_seeds: int = 0
    verdict: str = NOT_TESTED
    details: list = field(default_factory=list)
    pct: bool = True
    threshold: float = math.nan
    holds_if: str = ""
    seeds_needed: int | None = None
    seeds_note: str = ""
    method: str = METHOD
    alpha: float = math.nan
    round: int | None = None
    rounds: int = 1
    seeds: tuple = ()
    level: dict = field(default_factory=dict)
    kimg: float | None = None
    groups: list = field(default_factory=list)  # (loss, init) keys compared
    cells: list = field(default_factory=list)  # cell ids of those groups (every seed)
    next_seeds: tuple = ()
    comparisons: int = 1  # a best/worst over k comparisons: each interval at alpha / k

    @property
    def name(self) -> str:
        lv = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in self.level.items())
        return f"{self.claim} ({lv})" if lv else self.claim

    @property
    def lo(self) -> float:
        return self.ci_low

    @property
    def hi(self) -> float:
        return self.ci_high

    def fmt(self, x: float) -> str:
        if isinstance(x, float) and math.isinf(x):
            return "−∞" if x < 0 else "+∞"
        if self.pct:
            return fmt_pct(x)
        return "n/a" if not math.isfinite(x) else f"{x:+.3f}"

    @property
    def tested(self) -> bool:
        return self.verdict != NOT_TESTED

    @property
    def decided(self) -> bool:
        return self.verdict in ("holds", "does not hold")

    @property
    def inconclusive(self) -> bool:
        return self.tested and not self.decided


def verdict_head(verdict: str) -> str:
    """'holds', 'does not hold', 'inconclusive', 'open' or the not-tested words: a verdict
    without its parenthesis or its 'at the cap' (for colours and legends)."""
    return verdict.split(" (")[0].removesuffix(" at the cap")


def seeds_words(ns, by: str = "claim") -> tuple[str, bool]:
    """Words for the seeds a set of judged claims used, and whether they differ (a
    seeds-on-demand study stops each claim at its own round): ('32 seeds', False) or
    ('32-40 seeds, by claim', True)."""
    ns = sorted({int(n) for n in ns if n and n == n})
    if not ns:
        return "no seeds", False
    if len(ns) == 1:
        return f"{ns[0]} seed{'s' if ns[0] != 1 else ''}", False
    return f"{ns[0]}-{ns[-1]} seeds, by {by}", True


def over_losses(n: int) -> str:
    """How a claim pools its losses, for its comparison line."""
    return "for its one loss" if n == 1 else f"averaged over {n} losses"


def finish(v: ClaimResult) -> ClaimResult:
    """Verdict from the interval, and for an undecided one the seeds that would decide it."""
    d = decide(v.ci_low, v.ci_high, v.threshold, v.holds_if)
    n = v.n_seeds
    v.verdict = d or f"inconclusive ({n} seed{'s' if n != 1 else ''})"
    v.seeds_needed, v.seeds_note = None, ""
    if d is None:
        if n < 2:
            v.seeds_note = "one seed per group: no spread; run at least 2 seeds per group"
        elif not (math.isfinite(v.ci_low) and math.isfinite(v.ci_high)):
            v.seeds_note = ("no bounded interval at this error rate (the denominator's interval "
                            "contains 0)")
        else:
            v.seeds_needed = seeds_to_decide(v.effect, v.ci_low, v.ci_high, v.threshold, n,
                                             v.alpha / v.comparisons)
            if v.seeds_needed is not None:
                toward = ("holds" if (v.effect < v.threshold) == (v.holds_if == "below")
                          else "does not hold")
                v.seeds_note = (f"about {v.seeds_needed} seeds per group would decide it at the "
                                f"observed spread (toward '{toward}')")
            else:
                v.seeds_note = (f"more than {SEEDS_PLANNED_MAX:,} seeds per group at the observed "
                                f"spread: the estimate sits at the threshold")
    return v


class Groups:
    """Seed values per (loss, init) group of one level, restricted to ``seeds`` (None: all),
    and the error rate ``alpha`` of this look's intervals."""

    def __init__(self, study, final: pd.DataFrame, spec, alpha: float, seeds=None,
                 level: dict | None = None):
        self.study, self.spec, self.alpha = study, spec, float(alpha)
        self.level = level or {}
        f = final if seeds is None else final[final["seed"].isin(list(seeds))]
        self.values = {k: pd.Series(d["value"].to_numpy(float), index=d["seed"].to_numpy())
                       for k, d in f.groupby(["lkey", "init"], sort=True)}
        self.means = {k: float(v.mean()) for k, v in self.values.items()}
        fam = final[["lkey", "loss_family"]].drop_duplicates("lkey")
        self.family = dict(zip(fam["lkey"].astype(str), fam["loss_family"]))
        present = {i for (_, i) in self.values}
        self.inits = [i for i in study.init_order if i in present]
        self.loss_order = sorted({lo for (lo, _) in self.values}, key=loss_sort_key)

    def where(self, **cols) -> list[str]:
        allowed = set(self.study.inits_where(**cols))
        return [i for i in self.inits if i in allowed]

    def losses_with(self, inits) -> list[str]:
        have = [{lo for (lo, i) in self.values if i == init} for init in inits]
        common = set.intersection(*have) if have else set()
        return [lo for lo in self.loss_order if lo in common]

    def mean(self, loss, init) -> float:
        return self.means[(loss, init)]

    def matrix(self, keys) -> tuple[list, np.ndarray]:
        """(seeds common to every group of ``keys``, (n_seeds, n_groups) values)."""
        common = set.intersection(*(set(self.values[k].index) for k in keys))
        seeds = sorted(common)
        return seeds, np.stack([self.values[k].groupby(level=0).mean().loc[seeds].to_numpy()
                                for k in keys], axis=-1).reshape(len(seeds), len(keys))

    def describe(self, loss, init) -> str:
        v = self.values[(loss, init)]
        return (f"{loss} / {init}: {fmt_pm(v.mean(), v.std(ddof=1) if len(v) > 1 else math.nan)} "
                f"(n={len(v)})")

    def teacher(self) -> str | None:
        t = self.where(**PLAIN_TEACHER)
        return t[0] if t else None

    def random(self) -> str | None:
        r = self.where(init_scheme="random")
        return r[0] if r else None

    def new(self, claim: str, comparison: str, effect_name: str, pct: bool = True):
        t, h = self.spec.threshold(claim)
        return ClaimResult(claim, comparison, effect_name, pct=pct, threshold=t, holds_if=h,
                           alpha=self.alpha, level=dict(self.level))

    # -- effects ----------------------------------------------------------------------------
    def ratio(self, keys, num, den, alpha: float | None = None,
              abs_den: bool = False) -> tuple[float, float, float, list]:
        """(estimate, lo, hi, seeds) of mean(X @ num) / mean(X @ den) over the seeds common to
        ``keys`` (``abs_den``: over |mean(X @ den)|, as a relative shortfall is)."""
        seeds, x = self.matrix(keys)
        if not seeds:
            return math.nan, math.nan, math.nan, []
        u, w = x @ np.asarray(num, float), x @ np.asarray(den, float)
        if abs_den and w.mean() < 0:
            w = -w
        e, lo, hi = fieller(u, w, self.alpha if alpha is None else alpha)
        return float(e), float(lo), float(hi), seeds

    def fill(self, v: ClaimResult, keys, num, den, abs_den: bool = False) -> ClaimResult:
        v.effect, v.ci_low, v.ci_high, seeds = self.ratio(keys, num, den, abs_den=abs_den)
        self.used(v, keys, seeds)
        return finish(v)

    def used(self, v: ClaimResult, keys, seeds):
        v.groups, v.seeds, v.n_seeds = list(keys), tuple(int(s) for s in seeds), len(seeds)

    def sign(self) -> float:
        """+1 when lower is better, -1 when higher is: a relative shortfall's numerator sign."""
        return -1.0 if self.study.higher_better else 1.0


def extreme(effects, los, his, worst: bool) -> tuple[float, float, float]:
    """Estimate and interval of the max (``worst``) or min over comparisons, from their
    simultaneous intervals: [max lo, max hi] (or [min lo, min hi])."""
    f = np.max if worst else np.min
    return float(f(effects)), float(f(los)), float(f(his))


def abs_ratio(e: float, lo: float, hi: float) -> tuple[float, float, float]:
    a, b = abs_interval(lo, hi)
    return abs(e), float(a), float(b)
