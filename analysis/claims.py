"""Judge the study's claims C1-C3 (SPEC, top) from its final scores, with bootstrap CIs.

Every number is computed from the results; nothing here is fixed text except the rules.
Bootstrap: for each (loss, init) group its seeds are resampled with replacement, independently of
every other group, 2000 times (numpy Generator seeded from ``seed``); each statistic is recomputed
on every resample and the 95% interval is the 2.5/97.5 percentiles.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .data import B, Study, boot_means, percentiles
from .style import base_loss, fmt_num, fmt_pm, init_sort_key
from .tables import footer_md, footer_tex, fmt_pct, md_escape, tex_escape

STATEMENTS = {
    "C1": "Losses that never call the teacher's score (density-ratio family) train one-step "
          "generators about as well as, or better than, losses that do (di, sid).",
    "C2": "Initializing the generator from the teacher's weights is critical; random init is far "
          "worse.",
    "C3": "The benefit of teacher init comes from the teacher's internal features across noise "
          "levels, not from its latent-to-output mapping.",
    "C3a": "Resetting the output layers costs little.",
    "C3b": "Keeping only the input/output layers (resetting encoder+middle+decoder) costs a lot.",
    "C3c": "Features taken at some noise levels help more than at others (feature transplant).",
}
RULES = {
    "C1": "Under teacher init, effect = (best score-free loss − best teacher-score loss) / best "
          "teacher-score loss, as a relative shortfall (> 0: score-free is worse); score-free = "
          "loss labels starting `ratio_`, teacher-score = di, sid (any parameters). Holds if the CI "
          "upper bound < +10% (non-inferior within 10%); does not hold if the CI lower bound > "
          "+10%; else inconclusive.",
    "C2": "Over the losses with both teacher- and random-init cells, effect = (mean random − mean "
          "teacher) / mean teacher, as a relative shortfall. Holds if the CI lower bound > +25%; "
          "does not hold if the CI upper bound < +25%; else inconclusive.",
    "C3a": "Over the losses with teacher, random and reset_layers[output] cells, effect = "
           "(reset − teacher) / (random − teacher) on loss-averaged means: the fraction of the "
           "random-init gap that resetting the output layers costs. Holds if the CI upper bound < "
           "0.25; does not hold if the CI lower bound > 0.25; else inconclusive.",
    "C3b": "As C3a for reset_layers[encoder+middle+decoder] (teacher weights kept only in the "
           "input/output layers). Holds if the CI lower bound > 0.5; does not hold if the CI upper "
           "bound < 0.5; else inconclusive.",
    "C3c": "Over the losses with teacher, random and feature_transplant cells at two or more "
           "σ_feat, effect = (worst − best loss-averaged mean over σ_feat) / (random − teacher): "
           "the share of the random-init gap that the choice of σ_feat moves. Best and worst σ_feat "
           "are fixed by the point estimates; the CI resamples seeds for that difference, so noise "
           "alone does not widen it (a max − min over resamples would). Holds if the CI lower "
           "bound > 0.10; does not hold if the CI upper bound < 0.10; else inconclusive. How often "
           "the best σ_feat is best across resamples is reported.",
    "C3": "Holds if every sub-claim holds; does not hold if any sub-claim does not hold; not "
          "tested if none is tested; else inconclusive. Untested sub-claims are named.",
}
NOT_TESTED = "not tested by this study"


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

    def fmt(self, x: float) -> str:
        if self.pct:
            return fmt_pct(x)
        return "n/a" if not math.isfinite(x) else f"{x:+.3f}"


def decide(lo: float, hi: float, threshold: float, holds_if: str, n: int) -> str:
    seeds = f"inconclusive ({n} seed{'s' if n != 1 else ''})"
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return seeds
    if holds_if == "below":
        return "holds" if hi < threshold else "does not hold" if lo > threshold else seeds
    return "holds" if lo > threshold else "does not hold" if hi < threshold else seeds


def _ci(samples: np.ndarray) -> tuple[float, float]:
    s = samples[np.isfinite(samples)]
    if len(s) < len(samples) * 0.5:
        return math.nan, math.nan
    lo, hi = percentiles(s, [0.025, 0.975])
    return float(lo), float(hi)


class _Groups:
    """Seed values and their bootstrap means per (loss, init) group of included cells."""

    def __init__(self, study: Study, rng: np.random.Generator):
        self.study = study
        f = study.final.sort_values(["loss", "init", "seed"], kind="stable")
        self.values = {k: g["value"].to_numpy(dtype=float)
                       for k, g in f.groupby(["loss", "init"], sort=True)}
        self.boot = {}
        for k in sorted(self.values):  # fixed order: deterministic draws
            v = self.values[k]
            self.boot[k] = boot_means(v, rng) if len(v) > 1 else np.full(B, np.nan)
        self.sigma = (f.dropna(subset=["sigma_feat"]).drop_duplicates("init")
                      .set_index("init")["sigma_feat"].to_dict())

    def losses_with(self, inits) -> list[str]:
        have = [{lo for (lo, i) in self.values if i == init} for init in inits]
        common = set.intersection(*have) if have else set()
        return [lo for lo in self.study.loss_order if lo in common]

    def mean(self, loss, init) -> float:
        return float(self.values[(loss, init)].mean())

    def avg(self, losses, init) -> tuple[float, np.ndarray]:
        """Point mean and bootstrap means of the loss-average of group means."""
        return (float(np.mean([self.mean(lo, init) for lo in losses])),
                np.mean([self.boot[(lo, init)] for lo in losses], axis=0))

    def n(self, keys) -> int:
        return min(len(self.values[k]) for k in keys) if keys else 0

    def describe(self, loss, init) -> str:
        v = self.values[(loss, init)]
        return (f"{loss} / {init}: {fmt_pm(v.mean(), v.std(ddof=1) if len(v) > 1 else math.nan)} "
                f"(n={len(v)})")


def _c1(g: _Groups) -> Verdict:
    st = g.study
    teach = g.losses_with(["teacher"])
    ratio = [lo for lo in teach if base_loss(lo).startswith("ratio_")]
    score = [lo for lo in teach if base_loss(lo).split("[")[0] in ("di", "sid")]
    v = Verdict("C1", "best score-free vs best teacher-score loss, teacher init",
                "relative shortfall (score-free − teacher-score) / teacher-score")
    if not ratio or not score:
        v.details.append("needs teacher-init cells of at least one `ratio_*` loss and one of "
                         "di / sid")
        return v
    rm = np.array([g.mean(lo, "teacher") for lo in ratio])
    sm = np.array([g.mean(lo, "teacher") for lo in score])
    best_r = ratio[int(np.argmax(rm) if st.higher_better else np.argmin(rm))]
    best_s = score[int(np.argmax(sm) if st.higher_better else np.argmin(sm))]
    v.comparison = f"best score-free ({best_r}) vs best teacher-score ({best_s}), teacher init"
    v.effect = float(st.deficit(st.better(rm), st.better(sm)))
    rb = st.better(np.stack([g.boot[(lo, "teacher")] for lo in ratio], axis=-1))
    sb = st.better(np.stack([g.boot[(lo, "teacher")] for lo in score], axis=-1))
    v.ci_low, v.ci_high = _ci(st.deficit(rb, sb))
    v.n_seeds = g.n([(lo, "teacher") for lo in ratio + score])
    v.verdict = decide(v.ci_low, v.ci_high, 0.10, "below", v.n_seeds)
    v.details = [("score-free: " if lo in ratio else "teacher-score: ") + g.describe(lo, "teacher")
                 for lo in ratio + score]
    return v


def _c2(g: _Groups) -> Verdict:
    st = g.study
    losses = g.losses_with(["teacher", "random"])
    v = Verdict("C2", "random vs teacher init, averaged over losses",
                "relative shortfall (random − teacher) / teacher")
    if not losses:
        v.details.append("needs teacher-init and random-init cells of the same loss")
        return v
    t, tb = g.avg(losses, "teacher")
    r, rb = g.avg(losses, "random")
    v.comparison = f"random vs teacher init, averaged over {len(losses)} losses"
    v.effect = float(st.deficit(r, t))
    v.ci_low, v.ci_high = _ci(st.deficit(rb, tb))
    v.n_seeds = g.n([(lo, i) for lo in losses for i in ("teacher", "random")])
    v.verdict = decide(v.ci_low, v.ci_high, 0.25, "above", v.n_seeds)
    v.details = [f"{lo}: teacher {fmt_num(g.mean(lo, 'teacher'))}, random "
                 f"{fmt_num(g.mean(lo, 'random'))} ({fmt_pct(st.deficit(g.mean(lo, 'random'), g.mean(lo, 'teacher')))})"  # noqa: E501
                 for lo in losses]
    return v


def _reset_label(g: _Groups, groups: set) -> str | None:
    for init in sorted({i for (_, i) in g.values}, key=init_sort_key):
        if init.startswith("reset_layers[") and set(init[13:-1].split("+")) == groups:
            return init
    return None


def _c3_gap(g: _Groups, name: str, groups: set, threshold: float, holds_if: str) -> Verdict:
    init = (_reset_label(g, groups) or _reset_label(g, groups | {"embedding"})
            or f"reset_layers[{'+'.join(sorted(groups))}]")
    v = Verdict(name, f"{init} vs teacher and random init",
                "fraction of the random-init gap: (reset − teacher) / (random − teacher)",
                pct=False)
    losses = g.losses_with(["teacher", "random", init])
    if not losses:
        v.details.append(f"needs teacher, random and {init} cells of the same loss")
        return v
    t, tb = g.avg(losses, "teacher")
    r, rb = g.avg(losses, "random")
    x, xb = g.avg(losses, init)
    v.comparison = f"{init} within the teacher→random gap, averaged over {len(losses)} losses"
    v.effect = float((x - t) / (r - t)) if r != t else math.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        v.ci_low, v.ci_high = _ci((xb - tb) / (rb - tb))
    v.n_seeds = g.n([(lo, i) for lo in losses for i in ("teacher", "random", init)])
    v.verdict = decide(v.ci_low, v.ci_high, threshold, holds_if, v.n_seeds)
    v.details = [f"{lo}: teacher {fmt_num(g.mean(lo, 'teacher'))}, {init} "
                 f"{fmt_num(g.mean(lo, init))}, random {fmt_num(g.mean(lo, 'random'))}"
                 for lo in losses]
    return v


def _c3c(g: _Groups) -> Verdict:
    st = g.study
    v = Verdict("C3c", "spread of feature-transplant scores over σ_feat",
                "share of the random-init gap: (worst − best σ_feat) / (random − teacher)",
                pct=False)
    inits = sorted(g.sigma, key=lambda i: g.sigma[i])
    losses = g.losses_with(["teacher", "random"] + inits) if len(inits) >= 2 else []
    if not losses:
        v.details.append("needs teacher-init, random-init and feature_transplant cells at two or "
                         "more σ_feat values for the same loss")
        return v
    t, tb = g.avg(losses, "teacher")
    r, rb = g.avg(losses, "random")
    pts = [g.avg(losses, i) for i in inits]
    m = np.array([p[0] for p in pts])
    mb = np.stack([p[1] for p in pts], axis=-1)  # (B, n_sigma)
    pick = np.argmax if st.higher_better else np.argmin
    best, worst = int(pick(m)), int(np.argmin(m) if st.higher_better else np.argmax(m))
    v.effect = float(abs(m[worst] - m[best]) / abs(r - t)) if r != t else math.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        v.ci_low, v.ci_high = _ci(np.abs(mb[:, worst] - mb[:, best]) / np.abs(rb - tb))
    bests = pick(mb, -1)
    share = float(np.mean(bests[np.isfinite(mb).all(-1)] == best)) if np.isfinite(mb).any() \
        else math.nan
    v.comparison = (f"σ_feat in {{{', '.join(f'{g.sigma[i]:g}' for i in inits)}}}, averaged over "
                    f"{len(losses)} losses; best σ_feat = {g.sigma[inits[best]]:g}"
                    + (f" (best in {100 * share:.0f}% of resamples)" if math.isfinite(share) else "")
                    + f", worst {g.sigma[inits[worst]]:g}")
    v.n_seeds = g.n([(lo, i) for lo in losses for i in ["teacher", "random"] + inits])
    v.verdict = decide(v.ci_low, v.ci_high, 0.10, "above", v.n_seeds)
    v.details = [f"σ_feat={g.sigma[i]:g}: loss-averaged mean {fmt_num(mi)} "
                 f"(teacher init {fmt_num(t)}, random init {fmt_num(r)})"
                 for i, mi in zip(inits, m)]
    return v


def _c3(subs: list[Verdict]) -> Verdict:
    tested = [s for s in subs if s.verdict != NOT_TESTED]
    untested = [s.claim for s in subs if s.verdict == NOT_TESTED]
    v = Verdict("C3", "sub-claims C3a, C3b, C3c", "see sub-claims")
    if not tested:
        return v
    verdicts = [s.verdict for s in tested]
    if any(x == "does not hold" for x in verdicts):
        v.verdict = "does not hold"
    elif all(x == "holds" for x in verdicts) and not untested:
        v.verdict = "holds"
    else:
        n = min(s.n_seeds for s in tested)
        v.verdict = f"inconclusive ({n} seed{'s' if n != 1 else ''})"
    v.n_seeds = min(s.n_seeds for s in tested)
    v.details = [f"{s.claim}: {s.verdict}" for s in subs]
    if untested:
        v.details.append(f"not tested: {', '.join(untested)}")
    return v


def judge(study: Study, rng: np.random.Generator) -> list[Verdict]:
    g = _Groups(study, rng)
    subs = [_c3_gap(g, "C3a", {"output"}, 0.25, "below"),
            _c3_gap(g, "C3b", {"encoder", "middle", "decoder"}, 0.5, "above"), _c3c(g)]
    return [_c1(g), _c2(g), _c3(subs)] + subs


def write_claims(study: Study, out_dir: str, rng: np.random.Generator) -> list[str]:
    verdicts = judge(study, rng)
    os.makedirs(out_dir, exist_ok=True)
    data = pd.DataFrame([{"claim": v.claim, "metric": study.metric, "comparison": v.comparison,
                          "effect_name": v.effect_name, "effect": v.effect, "ci_low": v.ci_low,
                          "ci_high": v.ci_high, "n_seeds": v.n_seeds, "verdict": v.verdict}
                         for v in verdicts])
    csv = os.path.join(out_dir, "claims.data.csv")
    data.to_csv(csv, index=False, float_format="%.6g")
    direction = "higher" if study.higher_better else "lower"
    head = (f"Metric: `{study.metric}` ({direction} is better), final score = value at each "
            f"cell's last kimg. Bootstrap: {B} resamples of seeds within each (loss, init) group, "
            f"Generator seed set by `seed`, 95% percentile intervals.")
    md = ["# Claims judged from this study's results", "", head, "",
          "| claim | comparison | effect | 95% CI | seeds | verdict |", "|---|---|---|---|---|---|"]
    for v in verdicts:
        tested = v.verdict != NOT_TESTED and v.claim != "C3"
        ci = f"[{v.fmt(v.ci_low)}, {v.fmt(v.ci_high)}]" if tested else "—"
        eff = v.fmt(v.effect) if tested else "—"
        md.append(f"| {v.claim} | {md_escape(v.comparison)} | {eff} | {ci} | {v.n_seeds or '—'} "
                  f"| **{v.verdict}** |")
    for v in verdicts:
        md += ["", f"## {v.claim}: {v.verdict}", "", f"*Claim:* {STATEMENTS[v.claim]}", "",
               f"- comparison: {v.comparison}", f"- effect: {v.effect_name}"]
        if v.verdict != NOT_TESTED and v.claim != "C3":
            md.append(f"- estimate: {v.fmt(v.effect)}, 95% CI [{v.fmt(v.ci_low)}, "
                      f"{v.fmt(v.ci_high)}], seeds per group ≥ {v.n_seeds}")
        md.append(f"- rule: {RULES[v.claim]}")
        md += [f"- {md_escape(d)}" for d in v.details]
    md += ["", footer_md(study)]
    md_path = os.path.join(out_dir, "claims.md")
    with open(md_path, "w") as f:
        f.write("\n".join(md))
    tex = ["\\begin{table}[t]", "\\centering", "\\small",
           f"\\caption{{Claims judged on {tex_escape(study.metric)} ({direction} is better); "
           f"95\\% bootstrap CI over seeds ({B} resamples).}}", "\\label{tab:claims}",
           "\\begin{tabular}{lp{0.34\\linewidth}llcp{0.14\\linewidth}}", "\\toprule",
           "claim & comparison & effect & 95\\% CI & seeds & verdict \\\\", "\\midrule"]
    for v in verdicts:
        tested = v.verdict != NOT_TESTED and v.claim != "C3"
        ci = f"[{v.fmt(v.ci_low)}, {v.fmt(v.ci_high)}]" if tested else "--"
        tex.append(" & ".join([v.claim, tex_escape(v.comparison),
                               tex_escape(v.fmt(v.effect)) if tested else "--", tex_escape(ci),
                               str(v.n_seeds or "--"), tex_escape(v.verdict)]) + " \\\\")
    tex += ["\\bottomrule", "\\end{tabular}", footer_tex(study).rstrip("\n"), "\\end{table}", ""]
    tex_path = os.path.join(out_dir, "claims.tex")
    with open(tex_path, "w") as f:
        f.write("\n".join(tex))
    return [md_path, tex_path, csv]
