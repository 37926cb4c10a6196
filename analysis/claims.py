"""Judge a study's claims C1-C4 from its scores, seed-paired, within each level of the other
grid axes, round by round when the study adds seeds on demand.

Public API (stable; figures, reports and ``harness run`` read claims only through it):

    claim_results(study, spec=None, rows=None, final=None, kimg=None) -> list[ClaimResult]

``study`` is ``analysis.data.load_study``'s; ``spec`` the study's ``harness.declare.claims_spec.
ClaimsSpec`` (thresholds, C1's declared pair, alpha, pooled axes, seeds plan; default: the
declared defaults); ``rows`` the stored rows (for C4, the verifier); ``final`` a frame like
``study.final`` (default), e.g. the scores at one kimg (``kimg`` is then recorded). Every
number is computed from the results; the thresholds and the pair come from ``spec`` only.

Method: groups share their seeds, so each claim's effect is written as a ratio of seed-paired
means, E[u]/E[v], with u and v computed per seed from every group the claim compares, and gets
a Fieller interval (``analysis.stats``): exact at any n >= 2 under normality, analytic (no
resampling, so no Monte Carlo error). A claim whose effect is a best or worst over several
comparisons uses their simultaneous (Bonferroni) intervals. Claims are judged within each level
of every grid axis other than loss, init and seed (``lkey``: the loss label, with the levels of
the axes the study pools; ``levels``: the other axes' levels), never averaged across levels
unless ``spec.pool`` names the axis. With a seeds plan the claim is looked at after every
round, each look spending part of alpha (``stats.look_alphas``); it keeps the verdict of the
first look that decides it.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd

from analysis.claims_base import (
    METHOD_SIMULTANEOUS,
    NOT_TESTED,
    ClaimResult,
    Groups,
    finish,
    over_losses,
)
from analysis.claims_c3 import c3, c3c, c3d, c3e, c3f, reset_claim
from analysis.stats import look_alphas
from analysis.style import base_loss, fmt_num
from analysis.tables import fmt_pct
from analysis.verifier import claim_c4
from harness.declare.claims_spec import ClaimsSpec
from harness.declare.config import TEACHER_SCORE_FAMILIES

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
    "C3f": "The teacher's features carry the benefit: training only the layers around them "
           "(encoder, middle and decoder frozen at the teacher's values) keeps most of it.",
}
RULES = {
    "C1": "The declared pair (claims.pair, fixed before the data are seen): the score-free loss "
          "vs the teacher-score loss, both under teacher init. Effect = (mean score-free − mean "
          "teacher-score) / |mean teacher-score| over the seeds both have, a relative shortfall "
          "(> 0: the score-free loss is worse). Holds if the interval lies below the threshold "
          "(non-inferior within it); does not hold if it lies above; else inconclusive. Not "
          "tested if either label has no teacher-init cells or the pair is not (score-free, "
          "teacher-score) by its loss_family column.",
    "C1-best": "Reported beside C1 (C1's verdict is the declared pair's): the best score-free "
               "loss vs the best teacher-score loss, teacher init. The effect min over score-"
               "free i of max over teacher-score j of the shortfall of i against j equals the "
               "shortfall of the best against the best; its interval is the same min-max of the "
               "simultaneous intervals of every pair (i, j), so it covers the selection.",
    "C2": "Over the losses with both teacher-init and random-init cells, effect = (random − "
          "teacher) / |teacher| on loss-averaged means per seed, a relative shortfall. Holds "
          "if the interval lies above the threshold; does not hold if below.",
    "C3a": "reset_layers with reset_groups exactly {output} (or {output, embedding} if that is "
           "the only one) and reinit matched. Over the losses with teacher, random and reset "
           "cells, effect = (reset − teacher) / (random − teacher) on loss-averaged means per "
           "seed: the share of the teacher→random gap the reset costs. Holds if the interval "
           "lies below the threshold.",
    "C3b": "As C3a for reset_groups {encoder, middle, decoder} (matched): teacher weights kept "
           "only in the input/output layers. Holds if the interval lies above the threshold.",
    "C3c": "feature_transplant cells with reset_output false, at two or more sigma_feat, over "
           "the losses with teacher, random and every such sigma_feat: effect = the largest "
           "|difference of two sigma_feat's loss-averaged means| / |random − teacher|, the share "
           "of the gap that the choice of σ_feat moves; its interval is the max over pairs of "
           "their simultaneous intervals, so it covers the choice of the pair. Holds if the "
           "interval lies above the threshold.",
    "C3d": "mapping_match (of several, the one with the most mapping_steps: a rule fixed before "
           "the data). Effect = (random − mapping_match) / (random − teacher) on loss-averaged "
           "means per seed: the share of the gap the mapping alone closes. Holds if the "
           "interval lies below the threshold.",
    "C3e": "Band-limited teacher inits (init_scheme teacher with an init_source), each band "
           "separately: cost = (band − teacher) / (random − teacher), reported as C3e[<band>] "
           "with its own interval and verdict. The claim over all bands is the minimum cost, "
           "with the minimum of the bands' simultaneous intervals: holds if it lies above the "
           "threshold (every band costs more); does not hold if below.",
    "C3f": "Teacher init with freeze [encoder, middle, decoder] (those groups keep the "
           "teacher's values and get no updates; input, output and noise embedding train). "
           "Effect = (frozen − teacher) / (random − teacher) on loss-averaged means per seed: "
           "the share of the gap that freezing the features costs. Holds if the interval lies "
           "below the threshold. Every other frozen variant is reported as C3f[<groups>], judged "
           "alone on the same terms. Not one of C3's sub-claims (the paper's C3 is C3a-C3e): a "
           "second probe of the same question, reported beside it.",
    "C3": "Holds if every sub-claim C3a-C3e holds; does not hold if any sub-claim does not hold; "
          "not tested if none is tested; else inconclusive. Untested sub-claims are named.",
}
SEEDS_RULE = (
    "Seeds to decide (inconclusive claims): the smallest m seeds per group at which the "
    "interval, with the observed per-seed spread, the t critical value at m − 1 degrees of "
    "freedom and an unchanged estimate, would exclude the threshold. A planning estimate, not a "
    "power analysis.")
NOT_AT_ZERO = "not judged at kimg 0 (every generator is its untrained init)"


# ------------------------------------------------------------------------------------- C1
def _find_loss(g: Groups, label: str, init: str) -> tuple[str | None, str]:
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


def c1_fixed(g: Groups) -> list[ClaimResult]:
    a, b = g.spec.pair
    v = g.new("C1", f"{a} vs {b} (declared pair), teacher init",
              f"relative shortfall ({a} − {b}) / {b}")
    t = g.teacher()
    if t is None:
        v.details.append("needs teacher-init cells")
        return [v]
    la, why_a = _find_loss(g, a, t)
    lb, why_b = _find_loss(g, b, t)
    if la is None or lb is None:
        v.details.append(f"the declared pair {a} vs {b} is not in this study: "
                         + "; ".join(w for w in (why_a, why_b) if w))
        return [v]
    fa, fb = g.family.get(la), g.family.get(lb)
    if fa in TEACHER_SCORE_FAMILIES or fb not in TEACHER_SCORE_FAMILIES:
        v.details.append(f"the declared pair must be (score-free, teacher-score); loss_family is "
                         f"{fa} for {la} and {fb} for {lb}")
        return [v]
    v.comparison = f"{la} vs {lb} (declared pair), {t} init, paired by seed"
    s = g.sign()
    g.fill(v, [(la, t), (lb, t)], [s, -s], [0.0, 1.0], abs_den=True)
    v.details = [f"score-free: {g.describe(la, t)}", f"teacher-score: {g.describe(lb, t)}"]
    return [v]


def c1_best(g: Groups) -> list[ClaimResult]:
    v = g.new("C1-best", "best score-free vs best teacher-score loss, teacher init",
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
        return [v]
    keys = [(lo, t) for lo in ratio + score]
    k = len(ratio) * len(score)
    s = g.sign()
    est, lo, hi = (pd.DataFrame(index=ratio, columns=score, dtype=float) for _ in range(3))
    for i in ratio:
        for j in score:
            e, a, b, _ = g.ratio(keys, _unit(keys, (i, t), s) - _unit(keys, (j, t), s),
                                 _unit(keys, (j, t), 1.0), alpha=g.alpha / k, abs_den=True)
            est.loc[i, j], lo.loc[i, j], hi.loc[i, j] = e, a, b
    # min over score-free of max over teacher-score: the best against the best
    v.effect, v.ci_low, v.ci_high = (float(m.max(axis=1).min()) for m in (est, lo, hi))
    best_r = str(est.max(axis=1).idxmin())
    best_s = str(est.loc[best_r].idxmax())
    seeds, _ = g.matrix(keys)
    g.used(v, keys, seeds)
    v.method, v.comparisons = METHOD_SIMULTANEOUS, k
    v.comparison = (f"best score-free ({best_r}) vs best teacher-score ({best_s}), {t} init; "
                    + ("the only pair (nothing to select)" if k == 1 else
                       f"interval over all {k} pairs (covers the selection)"))
    v.details = [("score-free: " if lo_ in ratio else "teacher-score: ") + g.describe(lo_, t)
                 for lo_ in ratio + score]
    return [finish(v)]


def _unit(keys, key, scale: float) -> np.ndarray:
    out = np.zeros(len(keys))
    out[keys.index(key)] = scale
    return out


# ------------------------------------------------------------------------------------- C2
def c2(g: Groups) -> list[ClaimResult]:
    v = g.new("C2", "random vs teacher init, averaged over losses",
              "relative shortfall (random − teacher) / teacher")
    t, r = g.teacher(), g.random()
    losses = g.losses_with([t, r]) if t and r else []
    if not losses:
        v.details.append("needs teacher-init and random-init cells of the same loss")
        return [v]
    n, s = len(losses), g.sign()
    keys = [(lo, t) for lo in losses] + [(lo, r) for lo in losses]
    v.comparison = f"{r} vs {t} init, {over_losses(n)}, paired by seed"
    g.fill(v, keys, [-s / n] * n + [s / n] * n, [1 / n] * n + [0.0] * n, abs_den=True)
    dfc = g.study.deficit
    v.details = [f"{lo}: teacher {fmt_num(g.mean(lo, t))}, random {fmt_num(g.mean(lo, r))} "
                 f"({fmt_pct(dfc(g.mean(lo, r), g.mean(lo, t)))})" for lo in losses]
    return [v]


CLAIMS = (("C1", c1_fixed), ("C1-best", c1_best), ("C2", c2),
          ("C3a", lambda g: reset_claim(g, "C3a", {"output"})),
          ("C3b", lambda g: reset_claim(g, "C3b", {"encoder", "middle", "decoder"})),
          ("C3c", c3c), ("C3d", c3d), ("C3e", c3e), ("C3f", c3f))
"""(name, claim function): a function maps one look's Groups to [main result, extra rows]."""
C3_PARTS = ("C3a", "C3b", "C3c", "C3d", "C3e")
"""The sub-claims C3 is judged from; C3f is reported beside them."""


# -------------------------------------------------------------------------------- judging
def keyed(frame: pd.DataFrame, pool=()) -> pd.DataFrame:
    """``frame`` (rows of ``study.final`` / ``study.cells``) with ``lkey`` (the loss label with
    the levels of the pooled axes) and ``lvl`` (the other axes' levels, canonical JSON)."""
    lev = frame["levels"] if "levels" in frame.columns else pd.Series("{}", index=frame.index)
    parsed = {x: json.loads(x) for x in lev.unique()}
    lvl = {x: json.dumps({k: v for k, v in d.items() if k not in pool}, sort_keys=True)
           for x, d in parsed.items()}
    sfx = {x: ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in sorted(d.items()) if k in pool) for x, d in parsed.items()}
    base = frame["loss_base"].astype(str) if "loss_base" in frame.columns else \
        frame["loss"].astype(str)
    suffix = lev.map(sfx)
    return frame.assign(lkey=base.where(suffix == "", base + " (" + suffix + ")"),
                        lvl=lev.map(lvl))


def claim_results(study, spec: ClaimsSpec | None = None, rows: pd.DataFrame | None = None,
                  final: pd.DataFrame | None = None, kimg: float | None = None
                  ) -> list[ClaimResult]:
    """Every claim at every level of the other grid axes (see the module docstring): per level
    C1, C1-best, C2, C3, C3a-C3e (C3e's per-band rows after it), C3f (its per-variant rows
    after it), then C4 when ``rows`` hold verifier scores. At kimg 0 every claim is 'not judged'."""
    spec = spec or ClaimsSpec()
    final = study.final if final is None else final
    frame = keyed(final, spec.pool)
    cells = keyed(study.cells, spec.pool)
    out = []
    levels = sorted(frame["lvl"].unique()) or ["{}"]
    for lvl in levels:
        level = json.loads(lvl)
        part, cpart = frame[frame["lvl"] == lvl], cells[cells["lvl"] == lvl]
        res = {name: _replay(study, part, cpart, spec, level, fn) for name, fn in CLAIMS}
        out += [r for name, rs in res.items() if not name.startswith("C3") for r in rs]
        out.append(c3([res[name][0] for name in C3_PARTS]))
        out += [r for name, rs in res.items() if name.startswith("C3") for r in rs]
    if rows is not None and rows["metric"].str.contains("@", regex=False).any():
        out.append(_replay_c4(study, rows, spec, claim_c4))
    for v in out:
        v.kimg = kimg
        if kimg == 0:
            v.verdict, v.ci_low, v.ci_high, v.seeds_needed, v.seeds_note = \
                NOT_AT_ZERO, float("nan"), float("nan"), None, ""
    return out


def _looks(spec: ClaimsSpec) -> list[tuple[int | None, float]]:
    if spec.seeds is None:
        return [(None, spec.alpha)]
    ns = spec.seeds.looks()
    return list(zip(ns, look_alphas(spec.alpha, ns)))


def _complete(cells: pd.DataFrame, groups, seeds) -> bool:
    """Every (group, seed) of this look has a final cell (done, or diverged: never re-run)."""
    fin = cells[cells["reason"].isin(["", "diverged"])]
    have = set(zip(fin["lkey"], fin["init"], fin["seed"].astype(int)))
    return all((lo, i, s) in have for (lo, i) in groups for s in seeds)


def _replay(study, final, cells, spec, level, fn) -> list[ClaimResult]:
    """The claim look by look until a look decides it, the cap, or a look whose cells are not
    all finished (the claim is then open: ``next_seeds`` are that look's seeds)."""
    looks, prev = _looks(spec), None
    for k, (n, alpha) in enumerate(looks, 1):
        seeds = None if n is None else spec.seeds.seeds(n)
        res = fn(Groups(study, final, spec, alpha, seeds, level))
        main = res[0]
        if not main.tested:
            return res
        for r in res:
            r.rounds = len(looks)
        if seeds is not None and not _complete(cells, main.groups, seeds):
            cur = prev or res
            cur[0].next_seeds = tuple(seeds)
            cur[0].cells = _cells_of(cells, main.groups)
            if prev is None:
                for r in res:
                    r.verdict = f"open (round 1 of {len(looks)} unfinished)"
                    r.seeds_needed, r.seeds_note = None, ""
            else:
                cur[0].verdict = f"open after round {k - 1} of {len(looks)}"
            return cur
        if main.decided:
            for r in res:
                r.round = k
            return res
        prev = res
    _at_cap(spec, prev[0])
    return prev


def _at_cap(spec, v: ClaimResult) -> ClaimResult:
    """A seeds-on-demand claim still undecided after the last round says so in its verdict."""
    if spec.seeds is not None and v.inconclusive:
        v.verdict = f"inconclusive at the cap ({v.n_seeds} seeds)"
    return v


def _cells_of(cells: pd.DataFrame, groups) -> list[str]:
    keys = set(groups)
    sel = [(lo, i) in keys for lo, i in zip(cells["lkey"], cells["init"])]
    return sorted(cells.loc[sel, "cell"].astype(str))


def _replay_c4(study, rows, spec, claim_c4) -> ClaimResult:
    looks, prev = _looks(spec), None
    done = set(study.final["cell"])
    for k, (n, alpha) in enumerate(looks, 1):
        seeds = None if n is None else spec.seeds.seeds(n)
        v = claim_c4(rows, metric=study.metric, cells=done, spec=spec, alpha=alpha, seeds=seeds)
        v.rounds = len(looks)
        if not v.tested:
            return v
        if seeds is not None and v.n_seeds < len(seeds):
            cur = prev or v
            cur.next_seeds, cur.cells = tuple(seeds), list(v.cells)
            cur.verdict = (f"open after round {k - 1} of {len(looks)}" if prev else
                           f"open (round 1 of {len(looks)} unfinished)")
            return cur
        if v.decided:
            v.round = k
            return v
        prev = v
    return _at_cap(spec, prev)


def open_claims(results: list[ClaimResult]) -> list[ClaimResult]:
    """The claims still open (waiting for the next round's seeds)."""
    return [v for v in results if v.next_seeds]


__all__ = ["ClaimResult", "claim_results", "open_claims", "keyed", "NOT_TESTED", "NOT_AT_ZERO",
           "RULES", "STATEMENTS", "SEEDS_RULE"]
