"""C3 and its sub-claims (SPEC §8): where the benefit of teacher init comes from. C3a/C3b
(matched resets of the output, of the body), C3c (spread over sigma_feat of feature transplant),
C3d (mapping_match), C3e (band-limited teachers), each as a share of the teacher-random gap with a
bootstrap CI over seeds; C3 from the sub-claims. Judged by ``analysis.claims.judge``."""
from __future__ import annotations

import math

import numpy as np

from harness.config import GROUPS

from .claims import NOT_JUDGED, NOT_TESTED, Verdict, _ci, _finish, _Groups, _new
from .data import legacy_reinit
from .style import fmt_num


# ------------------------------------------------------------------------------------- C3
def _gap_stat(g: _Groups, losses, t, r, x, closes: bool) -> tuple[float, np.ndarray]:
    """(point, bootstrap) of (x − t)/(r − t) (cost), or (r − x)/(r − t) (closes)."""
    tm, tb = g.avg(losses, t)
    rm, rb = g.avg(losses, r)
    xm, xb = g.avg(losses, x)
    with np.errstate(divide="ignore", invalid="ignore"):
        if closes:
            return (float((rm - xm) / (rm - tm)) if rm != tm else math.nan), (rb - xb) / (rb - tb)
        return (float((xm - tm) / (rm - tm)) if rm != tm else math.nan), (xb - tb) / (rb - tb)


def _gap_claim(g: _Groups, v: Verdict, x: str, closes: bool = False) -> Verdict:
    t, r = g.teacher(), g.random()
    losses = g.losses_with([t, r, x]) if t and r else []
    if not losses:
        v.details.append(f"needs teacher, random and {x} cells of the same loss")
        return v
    v.comparison = f"{x} within the teacher→random gap, averaged over {len(losses)} losses"
    v.effect, boot = _gap_stat(g, losses, t, r, x, closes)
    v.ci_low, v.ci_high = _ci(boot)
    v.n_seeds = g.n([(lo, i) for lo in losses for i in (t, r, x)])
    v.details = [f"{lo}: teacher {fmt_num(g.mean(lo, t))}, {x} {fmt_num(g.mean(lo, x))}, "
                 f"random {fmt_num(g.mean(lo, r))}" for lo in losses]
    return _finish(v)


def _reset_claim(g: _Groups, name: str, groups: set) -> Verdict:
    want = "+".join(sorted(groups, key=GROUPS.index))
    v = _new(name, f"reset_layers [{want}] (matched) vs teacher and random init",
             "fraction of the random-init gap: (reset − teacher) / (random − teacher)", pct=False)
    cands = g.where(init_scheme="reset_layers")

    def match(gs, reinit):
        return [i for i in cands if set(str(g.study.info(i).get("reset_groups")).split("+")) == gs
                and (legacy_reinit(g.study.info(i)) if reinit is None
                     else g.study.info(i).get("reinit") == reinit)]

    found = match(groups, "matched") or match(groups | {"embedding"}, "matched")
    if not found:
        legacy = match(groups, None) or match(groups | {"embedding"}, None)
        if legacy:
            v.verdict = NOT_JUDGED
            v.details.append(f"{', '.join(legacy)}: stored without `reinit` (the near-zero output "
                             f"re-init that stalls the optimisation, SPEC §4): not judged; rerun "
                             f"with reinit matched")
        else:
            v.details.append(f"needs reset_layers cells with groups [{want}] and reinit matched")
        return v
    return _gap_claim(g, v, found[0])


def _c3c(g: _Groups) -> Verdict:
    st = g.study
    v = _new("C3c", "spread of feature-transplant scores over σ_feat",
             "share of the random-init gap: (worst − best σ_feat) / (random − teacher)", pct=False)
    inits = [i for i in g.where(init_scheme="feature_transplant", reset_output=False)
             if st.info(i).get("sigma_feat") is not None]
    legacy = [i for i in g.where(init_scheme="feature_transplant")
              if legacy_reinit(st.info(i))]
    sigma = {i: float(st.info(i)["sigma_feat"]) for i in inits}
    inits = sorted(inits, key=lambda i: sigma[i])
    t, r = g.teacher(), g.random()
    losses = g.losses_with([t, r] + inits) if len(inits) >= 2 and t and r else []
    if not losses:
        if legacy and len(inits) < 2:
            v.verdict = NOT_JUDGED
            v.details.append(f"{len(legacy)} feature_transplant inits stored without "
                             f"`reset_output` (legacy re-init, SPEC §4): not judged")
        else:
            v.details.append("needs teacher-init, random-init and feature_transplant cells "
                             "(reset_output false) at two or more σ_feat for the same loss")
        return v
    tm, tb = g.avg(losses, t)
    rm, rb = g.avg(losses, r)
    pts = [g.avg(losses, i) for i in inits]
    m = np.array([p[0] for p in pts])
    mb = np.stack([p[1] for p in pts], axis=-1)  # (B, n_sigma)
    pick = np.argmax if st.higher_better else np.argmin
    best, worst = int(pick(m)), int(np.argmin(m) if st.higher_better else np.argmax(m))
    v.effect = float(abs(m[worst] - m[best]) / abs(rm - tm)) if rm != tm else math.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        v.ci_low, v.ci_high = _ci(np.abs(mb[:, worst] - mb[:, best]) / np.abs(rb - tb))
        sel_lo, sel_hi = _ci((mb.max(-1) - mb.min(-1)) / np.abs(rb - tb))
    ok = np.isfinite(mb).all(-1)
    share = float(np.mean(pick(mb[ok], -1) == best)) if ok.any() else math.nan
    v.comparison = (f"σ_feat in {{{', '.join(f'{sigma[i]:g}' for i in inits)}}}, averaged over "
                    f"{len(losses)} losses; best σ_feat = {sigma[inits[best]]:g}"
                    + (f" (best in {100 * share:.0f}% of resamples)"
                       if math.isfinite(share) else "")
                    + f", worst {sigma[inits[worst]]:g}")
    v.n_seeds = g.n([(lo, i) for lo in losses for i in [t, r] + inits])
    v.details = [f"σ_feat={sigma[i]:g}: loss-averaged mean {fmt_num(mi)} "
                 f"(teacher init {fmt_num(tm)}, random init {fmt_num(rm)})"
                 for i, mi in zip(inits, m)]
    if math.isfinite(sel_lo):
        v.details.append(f"with best and worst re-selected in every resample (max − min): 95% CI "
                         f"[{v.fmt(sel_lo)}, {v.fmt(sel_hi)}]")
    if legacy:
        v.details.append(f"left out: {len(legacy)} legacy re-init transplant inits")
    return _finish(v)


def _c3d(g: _Groups) -> Verdict:
    v = _new("C3d", "mapping_match within the teacher→random gap",
             "share of the gap the mapping alone closes: (random − mapping_match) / "
             "(random − teacher)", pct=False)
    mm = g.where(init_scheme="mapping_match")
    if not mm:
        v.details.append("needs mapping_match cells with teacher- and random-init cells of the "
                         "same loss")
        return v
    steps = {i: float(g.study.info(i).get("mapping_steps") or 0) for i in mm}
    x = sorted(mm, key=lambda i: (-steps[i], i))[0]
    v = _gap_claim(g, v, x, closes=True)
    if len(mm) > 1:
        v.details.append(f"of {len(mm)} mapping_match inits, the one with the most steps "
                         f"({steps[x]:g}) is judged")
    return v


def _c3e(g: _Groups) -> list[Verdict]:
    """The claim over all bands (minimum cost) and one verdict per band."""
    v = _new("C3e", "band-limited teacher inits within the teacher→random gap",
             "fraction of the gap the band costs, (band − teacher) / (random − teacher); "
             "minimum over bands", pct=False)
    bands = [i for i in g.where(init_scheme="teacher")
             if g.study.info(i).get("init_source") is not None]
    t, r = g.teacher(), g.random()
    if not bands or not t or not r:
        v.details.append("needs teacher inits with an init_source (band-limited teachers) and "
                         "teacher- and random-init cells of the same loss")
        return [v]
    per, boots, effects, ns = [], [], [], []
    for b in bands:
        src = g.study.info(b)["init_source"]
        pb = _new(f"C3e[{src}]", f"{b} within the teacher→random gap",
                  "fraction of the gap: (band − teacher) / (random − teacher)", pct=False)
        losses = g.losses_with([t, r, b])
        if not losses:
            pb.details.append(f"needs teacher, random and {b} cells of the same loss")
            per.append(pb)
            continue
        pb.effect, boot = _gap_stat(g, losses, t, r, b, closes=False)
        pb.ci_low, pb.ci_high = _ci(boot)
        pb.n_seeds = g.n([(lo, i) for lo in losses for i in (t, r, b)])
        pb.comparison = f"{b} within the teacher→random gap, averaged over {len(losses)} losses"
        pb.details = [f"{lo}: teacher {fmt_num(g.mean(lo, t))}, {b} {fmt_num(g.mean(lo, b))}, "
                      f"random {fmt_num(g.mean(lo, r))}" for lo in losses]
        per.append(_finish(pb))
        boots.append(boot)
        effects.append(pb.effect)
        ns.append(pb.n_seeds)
    tested = [p for p in per if p.tested]
    if not tested:
        v.details.append("no band has teacher, random and band cells of the same loss")
        return [v] + per
    k = int(np.nanargmin(effects)) if np.isfinite(effects).any() else 0
    v.effect = float(np.min(effects))
    v.ci_low, v.ci_high = _ci(np.min(np.stack(boots, axis=-1), axis=-1))
    v.n_seeds = min(ns)
    v.comparison = (f"{len(tested)} band-limited teacher init{'s' if len(tested) != 1 else ''}, "
                    f"minimum cost over bands (now {tested[k].claim[4:-1]}), "
                    f"re-selected in every resample")
    v.details = [f"{p.claim}: {p.fmt(p.effect)}, 95% CI [{p.fmt(p.ci_low)}, {p.fmt(p.ci_high)}]"
                 f" — {p.verdict}" for p in per]
    return [_finish(v)] + per


def _c3(subs: list[Verdict]) -> Verdict:
    tested = [s for s in subs if s.tested]
    untested = [s.claim for s in subs if s.verdict == NOT_TESTED]
    unjudged = [s.claim for s in subs if s.verdict == NOT_JUDGED]
    v = Verdict("C3", "sub-claims " + ", ".join(s.claim for s in subs), "see sub-claims")
    v.details = [f"{s.claim}: {s.verdict}" for s in subs]
    if untested:
        v.details.append(f"not tested: {', '.join(untested)}")
    if unjudged:
        v.details.append(f"not judged (legacy re-init): {', '.join(unjudged)}")
    if not tested:
        if unjudged:
            v.verdict = NOT_JUDGED
        return v
    verdicts = [s.verdict for s in tested]
    v.n_seeds = min(s.n_seeds for s in tested)
    if any(x == "does not hold" for x in verdicts):
        v.verdict = "does not hold"
    elif all(x == "holds" for x in verdicts) and not untested and not unjudged:
        v.verdict = "holds"
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
