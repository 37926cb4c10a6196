"""Judge the study's claims C1-C3 (SPEC §8) from its scores, with bootstrap CIs over seeds.

Every number is computed from the results; nothing here is fixed text except the rules, which
say what the code does. Comparisons are declared before the data are seen: C1 names its fixed pair
(``C1_PAIR``, or ``pair=`` from the study) and its interval resamples exactly that pair; the
"best vs best" variant beside it repeats the selection inside every resample. Groups are chosen
by the typed result columns (loss_family, init_scheme, reset_groups, reinit, sigma_feat,
reset_output, init_source, mapping_steps), never by parsing labels.

Bootstrap: the seeds of each (loss, init) group are resampled with replacement, independently of
every other group, ``B`` = 2000 times, from a random stream of the group's own (seeded from the
output's seed and the group's name, so a claim's interval depends only on the groups it names);
each statistic is recomputed on every resample and the 95% interval is the 2.5/97.5 percentiles.
``claims_kimg`` repeats every claim at each evaluated kimg with the same streams.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from harness.config import TEACHER_SCORE_FAMILIES

from .data import B, Study, percentiles
from .style import base_loss, fmt_num, fmt_pm
from .tables import fmt_pct

C1_PAIR = ("ratio_js", "sid")
"""C1's declared pair (score-free loss, teacher-score loss), fixed before the data are seen."""

STATEMENTS = {
    "C1": "Losses that never call the teacher's score (density-ratio family) train one-step "
          "generators about as well as, or better than, losses that do (di, sid).",
    "C1-best": "As C1, comparing the best score-free loss with the best teacher-score loss.",
    "C2": "Initializing the generator from the teacher's weights is critical; random init is far "
          "worse.",
    "C3": "The benefit of teacher init comes from the teacher's internal features across noise "
          "levels, not from its latent-to-output mapping.",
    "C3a": "Resetting the output layers (matched re-init) costs little.",
    "C3b": "Keeping only the input/output layers (resetting encoder+middle+decoder, matched "
           "re-init) costs a lot.",
    "C3c": "Features taken at some noise levels help more than at others (feature transplant).",
    "C3d": "The teacher's latent-to-output mapping alone (mapping_match) does not carry the "
           "benefit of teacher init.",
    "C3e": "Features of one noise band are not enough: init from a band-limited teacher costs a "
           "large part of the benefit.",
}
THRESHOLDS = {"C1": (0.10, "below"), "C1-best": (0.10, "below"), "C2": (0.25, "above"),
              "C3a": (0.25, "below"), "C3b": (0.5, "above"), "C3c": (0.10, "above"),
              "C3d": (0.25, "below"), "C3e": (0.25, "above")}
"""claim -> (threshold, holds_if): 'below' holds if the CI upper bound < threshold and does not
hold if the CI lower bound > threshold; 'above' the mirror image."""
RULES = {
    "C1": "Declared pair, fixed before the data are seen: the score-free loss `ratio_js` vs the "
          "teacher-score loss `sid` (`C1_PAIR`, or the pair the study declares), both under "
          "teacher init (init_scheme teacher, no init_source). Effect = (mean ratio_js − mean "
          "sid) / mean sid, as a relative shortfall (> 0: the score-free loss is worse). The CI "
          "resamples the seeds of exactly these two groups. Holds if the CI upper bound < +10% "
          "(non-inferior within 10%); does not hold if the CI lower bound > +10%; else "
          "inconclusive. Not tested if either label has no teacher-init cells or the pair is not "
          "(score-free, teacher-score) by its loss_family column.",
    "C1-best": "Reported beside C1 (C1's verdict is the declared pair's): the best score-free loss "
               "(loss_family not in di, sid) vs the best teacher-score loss (loss_family di or "
               "sid), teacher init, best = best mean final score; both selections are repeated "
               "inside every resample, so the CI includes the selection. Same effect and "
               "thresholds as C1.",
    "C2": "Over the losses with both teacher-init and random-init cells, effect = (mean random − "
          "mean teacher) / mean teacher on loss-averaged means, as a relative shortfall. Holds if "
          "the CI lower bound > +25%; does not hold if the CI upper bound < +25%; else "
          "inconclusive.",
    "C3a": "reset_layers with reset_groups exactly {output} (or {output, embedding} if that is "
           "the only one) and reinit matched. Over the losses with teacher, random and reset "
           "cells, effect = (reset − teacher) / (random − teacher) on loss-averaged means: the "
           "fraction of the teacher→random gap the reset costs. Holds if the CI upper bound < "
           "0.25; does not hold if the CI lower bound > 0.25; else inconclusive. Reset cells "
           "without a recorded reinit (legacy rows: the near-zero output re-init that stalls "
           "the optimisation, SPEC §4) are never judged: 'not judged (legacy re-init)'.",
    "C3b": "As C3a for reset_groups {encoder, middle, decoder} (matched): teacher weights kept "
           "only in the input/output layers. Holds if the CI lower bound > 0.5; does not hold if "
           "the CI upper bound < 0.5; else inconclusive. Legacy reset cells are not judged.",
    "C3c": "feature_transplant cells with reset_output false (every teacher weight kept), at two "
           "or more sigma_feat, over the losses with teacher, random and every such sigma_feat: "
           "effect = |worst − best loss-averaged mean over sigma_feat| / |random − teacher|, the "
           "share of the gap that the choice of σ_feat moves. Best and worst σ_feat are fixed by "
           "the point estimates (a pair chosen from the data, not declared; how often the best "
           "stays best across resamples is reported, and the spread with the selection repeated "
           "in every resample is given in the details); the CI resamples seeds for that pair. "
           "Holds if the CI lower bound > 0.10; does not hold if the CI upper bound < 0.10; else "
           "inconclusive. Transplant cells without a recorded reset_output (legacy re-init) are "
           "not judged.",
    "C3d": "mapping_match (of several, the one with the most mapping_steps: a rule fixed before "
           "the data). Over the losses with teacher, random and mapping_match cells, effect = "
           "(random − mapping_match) / (random − teacher) on loss-averaged means: the share of "
           "the gap that the teacher's latent-to-output mapping alone closes. Holds if the CI "
           "upper bound < 0.25; does not hold if the CI lower bound > 0.25; else inconclusive.",
    "C3e": "Band-limited teacher inits (init_scheme teacher with an init_source), each band "
           "separately: cost = (band − teacher) / (random − teacher) on loss-averaged means over "
           "the losses with teacher, random and that band, reported as C3e[<band>] with its own "
           "CI and verdict. The claim over all bands combines them by the minimum cost (the band "
           "whose features come closest to the full teacher's), recomputed inside every "
           "resample: holds if the CI lower bound of the minimum > 0.25 (every band costs more "
           "than a quarter of the gap); does not hold if its CI upper bound < 0.25; else "
           "inconclusive.",
    "C3": "Holds if every sub-claim C3a-C3e holds; does not hold if any sub-claim does not hold; "
          "not tested if none is tested; else inconclusive. Untested and unjudged sub-claims are "
          "named.",
}
SEEDS_RULE = (
    "Seeds to decide (inconclusive claims): with n seeds in the claim's smallest group, estimate "
    "e and 95% CI [lo, hi], the CI at m seeds per group is taken as [e − (e − lo)·√(n/m), "
    "e + (hi − e)·√(n/m)]: the observed bootstrap spread shrinking as 1/√m around an unchanged "
    "estimate. The number given is the smallest m at which that interval excludes the threshold "
    "t: m = ⌊n·((e − lo)/(e − t))²⌋ + 1 if e > t (it would then exclude t from above), "
    "m = ⌊n·((hi − e)/(t − e))²⌋ + 1 if e < t. If e equals t the claim cannot be decided at "
    "this effect size; with one seed per group there is no spread to scale. A planning estimate, "
    "not a power analysis.")
NOT_TESTED = "not tested by this study"
NOT_JUDGED = "not judged (legacy re-init)"
UNDECIDABLE = "cannot be decided at this effect size"


@dataclass
class Verdict:
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

    def fmt(self, x: float) -> str:
        if self.pct:
            return fmt_pct(x)
        return "n/a" if not math.isfinite(x) else f"{x:+.3f}"

    @property
    def tested(self) -> bool:
        return self.verdict not in (NOT_TESTED, NOT_JUDGED)

    @property
    def inconclusive(self) -> bool:
        return self.verdict.startswith("inconclusive")


def decide(lo: float, hi: float, threshold: float, holds_if: str, n: int) -> str:
    seeds = f"inconclusive ({n} seed{'s' if n != 1 else ''})"
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return seeds
    if holds_if == "below":
        return "holds" if hi < threshold else "does not hold" if lo > threshold else seeds
    return "holds" if lo > threshold else "does not hold" if hi < threshold else seeds


def seeds_to_decide(effect: float, lo: float, hi: float, threshold: float,
                    n: int) -> tuple[int | None, str]:
    """(m, words): the smallest seeds per group m at which the CI, its half-widths scaled by
    sqrt(n/m) around the unchanged estimate, excludes ``threshold`` (SEEDS_RULE). ``m`` is None
    where it cannot be computed (the words say why) or the CI already excludes the threshold."""
    if not math.isfinite(effect):
        return None, "no estimate"
    if n < 2 or not (math.isfinite(lo) and math.isfinite(hi)):
        return None, "one seed per group: no spread to scale; run at least 2 seeds per group"
    if lo > threshold or hi < threshold:
        return None, ""
    if math.isclose(effect, threshold, rel_tol=1e-9, abs_tol=1e-12):
        return None, UNDECIDABLE + " (the estimate equals the threshold)"
    if effect > threshold:
        ratio = (effect - lo) / (effect - threshold)
    else:
        ratio = (hi - effect) / (threshold - effect)
    m = max(int(math.floor(n * ratio * ratio)) + 1, n + 1)

    def decided(k):
        a, b = scaled_ci(effect, lo, hi, n, k)
        return a > threshold or b < threshold

    for _ in range(8):  # floating point at the boundary: settle on the exact smallest m
        if not decided(m):
            m += 1
        elif m - 1 > n and decided(m - 1):
            m -= 1
        else:
            break
    return m, ""


def scaled_ci(effect: float, lo: float, hi: float, n: int, m: int) -> tuple[float, float]:
    """The CI at m seeds per group as SEEDS_RULE scales it from the one at n."""
    s = math.sqrt(n / m)
    return effect - (effect - lo) * s, effect + (hi - effect) * s


def _ci(samples: np.ndarray) -> tuple[float, float]:
    s = samples[np.isfinite(samples)]
    if len(s) < len(samples) * 0.5:
        return math.nan, math.nan
    lo, hi = percentiles(s, [0.025, 0.975])
    return float(lo), float(hi)


def _finish(v: Verdict) -> Verdict:
    """Verdict from the CI, and for an inconclusive one the seeds that would decide it."""
    v.verdict = decide(v.ci_low, v.ci_high, v.threshold, v.holds_if, v.n_seeds)
    if v.inconclusive:
        v.seeds_needed, v.seeds_note = seeds_to_decide(v.effect, v.ci_low, v.ci_high,
                                                       v.threshold, v.n_seeds)
        if v.seeds_needed is not None:
            toward = ("holds" if (v.effect < v.threshold) == (v.holds_if == "below")
                      else "does not hold")
            v.seeds_note = (f"about {v.seeds_needed} seeds per group would decide it at the "
                            f"observed spread (toward '{toward}')")
    return v


def _new(claim: str, comparison: str, effect_name: str, pct: bool = True) -> Verdict:
    t, h = THRESHOLDS[claim.split("[")[0]]
    return Verdict(claim, comparison, effect_name, pct=pct, threshold=t, holds_if=h)


def _group_values(final: pd.DataFrame) -> dict:
    """{(loss, init): seed values in seed order} (numpy, no pandas groupby iteration)."""
    if final.empty:
        return {}
    lc, lu = pd.factorize(final["loss"].astype(str), sort=True)
    ic, iu = pd.factorize(final["init"].astype(str), sort=True)
    code = lc.astype(np.int64) * len(iu) + ic
    order = np.lexsort((final["seed"].to_numpy(), code))
    code, vals = code[order], final["value"].to_numpy(dtype=float)[order]
    lu, iu = [str(x) for x in lu], [str(x) for x in iu]
    cuts = np.flatnonzero(np.diff(code)) + 1
    starts = np.concatenate([[0], cuts])
    return {(lu[code[a] // len(iu)], iu[code[a] % len(iu)]): chunk
            for a, chunk in zip(starts, np.split(vals, cuts))}


class _Groups:
    """Seed values per (loss, init) group of the cells in ``final``, and their bootstrap means
    from a stream of each group's own (``base`` and the group's name), drawn when first used."""

    def __init__(self, study: Study, final: pd.DataFrame, base: int, cache: dict | None = None):
        self.study = study
        self.values = _group_values(final)
        self.means = {k: float(v.mean()) for k, v in self.values.items()}
        fam = final[["loss", "loss_family"]].drop_duplicates("loss")
        self.family = dict(zip(fam["loss"].astype(str), fam["loss_family"]))
        self.base = int(base)
        self._boot = {}
        self._weights = {} if cache is None else cache  # (group, n) -> (B, n) resample weights
        present = {i for (_, i) in self.values}
        self.inits = [i for i in study.init_order if i in present]

    def boot(self, key) -> np.ndarray:
        """(B,) bootstrap means of the group's seed values: the mean of n draws with replacement,
        written as resample weights (counts / n) so a claims_kimg run reuses one draw per group
        for every kimg."""
        if key not in self._boot:
            v = self.values[key]
            n = len(v)
            if n < 2:
                self._boot[key] = np.full(B, np.nan)
                return self._boot[key]
            wkey = (self.base, key, n)
            if wkey not in self._weights:
                rng = np.random.default_rng([self.base,
                                             zlib.crc32(f"{key[0]}\0{key[1]}".encode())])
                idx = rng.integers(0, n, size=(B, n))
                counts = np.zeros((B, n))
                np.add.at(counts, (np.repeat(np.arange(B), n), idx.ravel()), 1.0)
                self._weights[wkey] = counts / n
            self._boot[key] = self._weights[wkey] @ v
        return self._boot[key]

    def where(self, **cols) -> list[str]:
        """Init labels present here whose typed columns equal ``cols`` (None: null)."""
        allowed = set(self.study.inits_where(**cols))
        return [i for i in self.inits if i in allowed]

    def losses_with(self, inits) -> list[str]:
        have = [{lo for (lo, i) in self.values if i == init} for init in inits]
        common = set.intersection(*have) if have else set()
        return [lo for lo in self.study.loss_order if lo in common]

    def mean(self, loss, init) -> float:
        return self.means[(loss, init)]

    def avg(self, losses, init) -> tuple[float, np.ndarray]:
        """Point mean and bootstrap means of the loss-average of group means."""
        return (float(np.mean([self.mean(lo, init) for lo in losses])),
                np.mean([self.boot((lo, init)) for lo in losses], axis=0))

    def n(self, keys) -> int:
        return min(len(self.values[k]) for k in keys) if keys else 0

    def describe(self, loss, init) -> str:
        v = self.values[(loss, init)]
        return (f"{loss} / {init}: {fmt_pm(v.mean(), v.std(ddof=1) if len(v) > 1 else math.nan)} "
                f"(n={len(v)})")

    def teacher(self) -> str | None:
        t = self.where(init_scheme="teacher", init_source=None)
        return t[0] if t else None

    def random(self) -> str | None:
        r = self.where(init_scheme="random")
        return r[0] if r else None


# ------------------------------------------------------------------------------------- C1
def _find_loss(g: _Groups, label: str, init: str) -> tuple[str | None, str]:
    losses = [lo for (lo, i) in g.values if i == init]
    if label in losses:
        return label, ""
    cands = sorted({lo for lo in losses if base_loss(lo) == label})
    if len(cands) == 1:
        return cands[0], ""
    if cands:
        return None, (f"`{label}` has {len(cands)} variants under {init} init "
                      f"({', '.join(cands)}): declare the pair with full labels")
    return None, f"no {init}-init cells of `{label}`"


def _c1_fixed(g: _Groups, pair: tuple[str, str]) -> Verdict:
    st = g.study
    a, b = pair
    v = _new("C1", f"{a} vs {b} (declared pair), teacher init",
             f"relative shortfall ({a} − {b}) / {b}")
    t = g.teacher()
    if t is None:
        v.details.append("needs teacher-init cells")
        return v
    la, why_a = _find_loss(g, a, t)
    lb, why_b = _find_loss(g, b, t)
    if la is None or lb is None:
        v.details.append(f"the declared pair {a} vs {b} is not in this study: "
                         + "; ".join(w for w in (why_a, why_b) if w))
        return v
    fa, fb = g.family.get(la), g.family.get(lb)
    if fa in TEACHER_SCORE_FAMILIES or fb not in TEACHER_SCORE_FAMILIES:
        v.details.append(f"the declared pair must be (score-free, teacher-score); loss_family is "
                         f"{fa} for {la} and {fb} for {lb}")
        return v
    v.comparison = f"{la} vs {lb} (declared pair), {t} init"
    v.effect = float(st.deficit(g.mean(la, t), g.mean(lb, t)))
    with np.errstate(divide="ignore", invalid="ignore"):
        v.ci_low, v.ci_high = _ci(st.deficit(g.boot((la, t)), g.boot((lb, t))))
    v.n_seeds = g.n([(la, t), (lb, t)])
    v.details = [f"score-free: {g.describe(la, t)}", f"teacher-score: {g.describe(lb, t)}"]
    return _finish(v)


def _c1_best(g: _Groups) -> Verdict:
    st = g.study
    v = _new("C1-best", "best score-free vs best teacher-score loss, teacher init",
             "relative shortfall (best score-free − best teacher-score) / best teacher-score")
    t = g.teacher()
    teach = g.losses_with([t]) if t else []
    fam = g.family
    ratio = [lo for lo in teach if fam.get(lo) is not None
             and fam.get(lo) not in TEACHER_SCORE_FAMILIES]
    score = [lo for lo in teach if fam.get(lo) in TEACHER_SCORE_FAMILIES]
    if not ratio or not score:
        v.details.append(f"needs teacher-init cells of at least one score-free loss and one of "
                         f"{', '.join(TEACHER_SCORE_FAMILIES)}")
        return v
    rm = np.array([g.mean(lo, t) for lo in ratio])
    sm = np.array([g.mean(lo, t) for lo in score])
    pick = np.argmax if st.higher_better else np.argmin
    best_r, best_s = ratio[int(pick(rm))], score[int(pick(sm))]
    v.comparison = (f"best score-free ({best_r}) vs best teacher-score ({best_s}), {t} init; "
                    f"selection repeated in every resample")
    v.effect = float(st.deficit(st.better(rm), st.better(sm)))
    rb = st.better(np.stack([g.boot((lo, t)) for lo in ratio], axis=-1))
    sb = st.better(np.stack([g.boot((lo, t)) for lo in score], axis=-1))
    with np.errstate(divide="ignore", invalid="ignore"):
        v.ci_low, v.ci_high = _ci(st.deficit(rb, sb))
    v.n_seeds = g.n([(lo, t) for lo in ratio + score])
    v.details = [("score-free: " if lo in ratio else "teacher-score: ") + g.describe(lo, t)
                 for lo in ratio + score]
    return _finish(v)


# ------------------------------------------------------------------------------------- C2
def _c2(g: _Groups) -> Verdict:
    st = g.study
    v = _new("C2", "random vs teacher init, averaged over losses",
             "relative shortfall (random − teacher) / teacher")
    t, r = g.teacher(), g.random()
    losses = g.losses_with([t, r]) if t and r else []
    if not losses:
        v.details.append("needs teacher-init and random-init cells of the same loss")
        return v
    tm, tb = g.avg(losses, t)
    rm, rb = g.avg(losses, r)
    v.comparison = f"{r} vs {t} init, averaged over {len(losses)} losses"
    v.effect = float(st.deficit(rm, tm))
    with np.errstate(divide="ignore", invalid="ignore"):
        v.ci_low, v.ci_high = _ci(st.deficit(rb, tb))
    v.n_seeds = g.n([(lo, i) for lo in losses for i in (t, r)])
    v.details = [f"{lo}: teacher {fmt_num(g.mean(lo, t))}, random {fmt_num(g.mean(lo, r))} "
                 f"({fmt_pct(st.deficit(g.mean(lo, r), g.mean(lo, t)))})" for lo in losses]
    return _finish(v)


def judge(study: Study, rng: np.random.Generator, final: pd.DataFrame | None = None,
          pair: tuple[str, str] | None = None, base: int | None = None,
          cache: dict | None = None) -> list[Verdict]:
    """Every claim on ``final`` (default: the study's final scores): C1 (declared ``pair``,
    default C1_PAIR), C1-best, C2, C3 and its sub-claims C3a-C3e (C3e's per-band rows after it).
    ``base`` seeds the per-group bootstrap streams (default: drawn from ``rng``)."""
    from .claims_c3 import _c3, _c3c, _c3d, _c3e, _reset_claim  # (it imports this module)

    base = int(rng.integers(2 ** 62)) if base is None else base
    g = _Groups(study, study.final if final is None else final, base, cache)
    c3e = _c3e(g)
    subs = [_reset_claim(g, "C3a", {"output"}),
            _reset_claim(g, "C3b", {"encoder", "middle", "decoder"}), _c3c(g), _c3d(g), c3e[0]]
    return ([_c1_fixed(g, tuple(pair or C1_PAIR)), _c1_best(g), _c2(g), _c3(subs)] + subs
            + c3e[1:])


# -------------------------------------------------------------------------------- writing
