"""C3 and its sub-claims: where the benefit of teacher init comes from. C3a/C3b (matched resets
of the output, of the body), C3c (spread over sigma_feat of feature transplant), C3d
(mapping_match), C3e (band-limited teachers), each as a share of the teacher-random gap on
loss-averaged, seed-paired means (``claims_base.Groups``); C3 from the sub-claims. Beside them
C3f, a second probe of "features, not mapping": teacher init with the encoder, middle and
decoder frozen (only the input, output and noise embedding train). Judged by
``analysis.claims.claim_results``."""
from __future__ import annotations

import itertools

import numpy as np

from analysis.claims_base import (
    METHOD_SIMULTANEOUS,
    NOT_TESTED,
    ClaimResult,
    Groups,
    abs_ratio,
    extreme,
    finish,
    over_losses,
)
from analysis.style import fmt_num
from harness.declare.config import GROUPS


def _gap_coefs(losses, inits, x_terms: dict, closes: bool = False):
    """keys over (loss, init) for ``inits`` = [teacher, random, *others], and the numerator and
    denominator coefficients of (x − t)/(r − t) (or (r − x)/(r − t) with ``closes``), every
    term a loss average; ``x_terms``: {init: weight} for x."""
    keys = [(lo, i) for i in inits for lo in losses]
    n = len(losses)
    t, r = inits[0], inits[1]

    def avg(weights: dict) -> np.ndarray:
        return np.array([weights.get(i, 0.0) / n for (_, i) in keys])

    x = avg(x_terms)
    num = (avg({r: 1.0}) - x) if closes else (x - avg({t: 1.0}))
    return keys, num, avg({r: 1.0}) - avg({t: 1.0})


def _gap_claim(g: Groups, v: ClaimResult, x: str, closes: bool = False) -> list[ClaimResult]:
    t, r = g.teacher(), g.random()
    losses = g.losses_with([t, r, x]) if t and r else []
    if not losses:
        v.details.append(f"needs teacher, random and {x} cells of the same loss")
        return [v]
    v.comparison = f"{x} within the teacher→random gap, {over_losses(len(losses))}, paired by seed"
    keys, num, den = _gap_coefs(losses, [t, r, x], {x: 1.0}, closes)
    g.fill(v, keys, num, den)
    v.details = [f"{lo}: teacher {fmt_num(g.mean(lo, t))}, {x} {fmt_num(g.mean(lo, x))}, "
                 f"random {fmt_num(g.mean(lo, r))}" for lo in losses]
    return [v]


def reset_claim(g: Groups, name: str, groups: set) -> list[ClaimResult]:
    want = "+".join(sorted(groups, key=GROUPS.index))
    v = g.new(name, f"reset_layers [{want}] (matched) vs teacher and random init",
              "fraction of the random-init gap: (reset − teacher) / (random − teacher)", pct=False)
    cands = g.where(init_scheme="reset_layers")

    def match(gs):
        return [i for i in cands if set(str(g.study.info(i).get("reset_groups")).split("+")) == gs
                and g.study.info(i).get("reinit") == "matched"]

    found = match(groups) or match(groups | {"embedding"})
    if not found:
        v.details.append(f"needs reset_layers cells with groups [{want}] and reinit matched")
        return [v]
    return _gap_claim(g, v, found[0])


def c3c(g: Groups) -> list[ClaimResult]:
    st = g.study
    v = g.new("C3c", "spread of feature-transplant scores over σ_feat",
              "share of the random-init gap: max |σ_feat_i − σ_feat_j| / |random − teacher|",
              pct=False)
    inits = [i for i in g.where(init_scheme="feature_transplant", reset_output=False)
             if st.info(i).get("sigma_feat") is not None]
    sigma = {i: float(st.info(i)["sigma_feat"]) for i in inits}
    inits = sorted(inits, key=lambda i: sigma[i])
    t, r = g.teacher(), g.random()
    losses = g.losses_with([t, r] + inits) if len(inits) >= 2 and t and r else []
    if not losses:
        v.details.append("needs teacher-init, random-init and feature_transplant cells "
                         "(reset_output false) at two or more σ_feat for the same loss")
        return [v]
    pairs = list(itertools.combinations(inits, 2))
    effects, los, his = [], [], []
    keys, _, den = _gap_coefs(losses, [t, r] + inits, {})
    n = len(losses)
    for a, b in pairs:  # (a − b) / (r − t), loss averages
        num = np.array([(i == a) / n - (i == b) / n for (_, i) in keys])
        e, lo, hi, seeds = g.ratio(keys, num, den, alpha=g.alpha / len(pairs), abs_den=True)
        e, lo, hi = abs_ratio(e, lo, hi)
        effects.append(e), los.append(lo), his.append(hi)
    v.effect, v.ci_low, v.ci_high = extreme(effects, los, his, worst=True)
    g.used(v, keys, seeds)
    v.method, v.comparisons = METHOD_SIMULTANEOUS, len(pairs)
    k = int(np.argmax(effects))
    v.comparison = (f"σ_feat in {{{', '.join(f'{sigma[i]:g}' for i in inits)}}}, "
                    f"{over_losses(len(losses))}; largest spread now between σ_feat "
                    f"{sigma[pairs[k][0]]:g} and {sigma[pairs[k][1]]:g}; interval over all "
                    f"{len(pairs)} pairs (covers the selection)")
    v.details = [f"σ_feat={sigma[i]:g}: loss-averaged mean "
                 f"{fmt_num(float(np.mean([g.mean(lo, i) for lo in losses])))}" for i in inits]
    return [finish(v)]


def c3d(g: Groups) -> list[ClaimResult]:
    v = g.new("C3d", "mapping_match within the teacher→random gap",
              "share of the gap the mapping alone closes: (random − mapping_match) / "
              "(random − teacher)", pct=False)
    mm = g.where(init_scheme="mapping_match")
    if not mm:
        v.details.append("needs mapping_match cells with teacher- and random-init cells of the "
                         "same loss")
        return [v]
    steps = {i: float(g.study.info(i).get("mapping_steps") or 0) for i in mm}
    x = sorted(mm, key=lambda i: (-steps[i], i))[0]
    res = _gap_claim(g, v, x, closes=True)
    if len(mm) > 1:
        res[0].details.append(f"of {len(mm)} mapping_match inits, the one with the most steps "
                              f"({steps[x]:g}) is judged")
    return res


def c3e(g: Groups) -> list[ClaimResult]:
    """The claim over all bands (minimum cost) and one row per band."""
    v = g.new("C3e", "band-limited teacher inits within the teacher→random gap",
              "fraction of the gap the band costs, (band − teacher) / (random − teacher); "
              "minimum over bands", pct=False)
    bands = [i for i in g.where(init_scheme="teacher")
             if g.study.info(i).get("init_source") is not None]
    t, r = g.teacher(), g.random()
    if not bands or not t or not r:
        v.details.append("needs teacher inits with an init_source (band-limited teachers) and "
                         "teacher- and random-init cells of the same loss")
        return [v]
    per, sim, keys_all = [], [], []
    for b in bands:
        src = g.study.info(b)["init_source"]
        pb = g.new(f"C3e[{src}]", f"{b} within the teacher→random gap",
                   "fraction of the gap: (band − teacher) / (random − teacher)", pct=False)
        losses = g.losses_with([t, r, b])
        if not losses:
            pb.details.append(f"needs teacher, random and {b} cells of the same loss")
            per.append(pb)
            continue
        keys, num, den = _gap_coefs(losses, [t, r, b], {b: 1.0})
        pb.comparison = (f"{b} within the teacher→random gap, {over_losses(len(losses))}, "
                         f"paired by seed")
        g.fill(pb, keys, num, den)
        pb.details = [f"{lo}: teacher {fmt_num(g.mean(lo, t))}, {b} {fmt_num(g.mean(lo, b))}, "
                      f"random {fmt_num(g.mean(lo, r))}" for lo in losses]
        per.append(pb)
        sim.append((keys, num, den))
        keys_all += [k for k in keys if k not in keys_all]
    tested = [p for p in per if p.tested]
    if not tested:
        v.details.append("no band has teacher, random and band cells of the same loss")
        return [v] + per
    simult = [g.ratio(keys, num, den, alpha=g.alpha / len(sim)) for keys, num, den in sim]
    v.effect, v.ci_low, v.ci_high = extreme([s[0] for s in simult], [s[1] for s in simult],
                                            [s[2] for s in simult], worst=False)
    v.method, v.comparisons = METHOD_SIMULTANEOUS, len(sim)
    g.used(v, keys_all, g.matrix(keys_all)[0])
    k = int(np.nanargmin([p.effect for p in tested]))
    v.comparison = (f"{len(tested)} band-limited teacher init{'s' if len(tested) != 1 else ''}, "
                    f"minimum cost over bands (now {tested[k].claim[4:-1]}), interval from the "
                    f"bands' simultaneous intervals")
    v.details = [f"{p.claim}: {p.fmt(p.effect)}, interval [{p.fmt(p.ci_low)}, "
                 f"{p.fmt(p.ci_high)}] — {p.verdict}" for p in per]
    return [finish(v)] + per


def c3f(g: Groups) -> list[ClaimResult]:
    """C3f: teacher init with [encoder, middle, decoder] frozen, as a share of the gap it costs;
    one ``C3f[<groups>]`` row for every other frozen variant, each judged alone."""
    body = {"encoder", "middle", "decoder"}
    mine = set(g.inits)
    frozen = {i: gs for i, gs in g.study.frozen_teachers().items() if i in mine}
    effect = "fraction of the random-init gap: (frozen − teacher) / (random − teacher)"
    v = g.new("C3f", "teacher init, encoder+middle+decoder frozen, vs teacher and random init",
              effect, pct=False)
    head = [i for i, gs in frozen.items() if gs == body]
    out = _gap_claim(g, v, head[0]) if head else [v]
    if not head:
        v.details.append("needs teacher-init cells with freeze [encoder, middle, decoder]")
    for i, gs in frozen.items():
        if gs == body:
            continue
        name = "+".join(sorted(gs, key=GROUPS.index))
        out += _gap_claim(g, g.new(f"C3f[{name}]", f"teacher init, {name} frozen, vs teacher "
                                   "and random init", effect, pct=False), i)
    return out


def c3(subs: list[ClaimResult]) -> ClaimResult:
    tested = [s for s in subs if s.tested]
    untested = [s.claim for s in subs if s.verdict == NOT_TESTED]
    v = ClaimResult("C3", "sub-claims " + ", ".join(s.claim for s in subs), "see sub-claims",
                    level=dict(subs[0].level) if subs else {}, method="from the sub-claims")
    v.details = [f"{s.claim}: {s.verdict}" for s in subs]
    if untested:
        v.details.append(f"not tested: {', '.join(untested)}")
    if not tested:
        return v
    verdicts = [s.verdict for s in tested]
    v.n_seeds = min(s.n_seeds for s in tested)
    v.rounds = max(s.rounds for s in tested)
    if any(x == "does not hold" for x in verdicts):
        v.verdict = "does not hold"
        v.round = min(s.round for s in tested if s.verdict == "does not hold")
    elif all(x == "holds" for x in verdicts) and not untested:
        v.verdict = "holds"
        v.round = max(s.round for s in tested)
    else:
        v.verdict = f"inconclusive ({v.n_seeds} seed{'s' if v.n_seeds != 1 else ''})"
        need = [s.seeds_needed for s in tested if s.inconclusive]
        if need and all(n is not None for n in need):
            v.seeds_needed = max(need)
            v.seeds_note = (f"about {v.seeds_needed} seeds per group would decide its "
                            f"inconclusive sub-claims at the observed spread")
        elif need:
            v.seeds_note = "see the inconclusive sub-claims"
    return v
