"""Write the judged claims (``analysis.claims.claim_results``): claims.md / .tex / .data.csv, and
every claim at every evaluated kimg after 0 (claims_kimg), so a verdict that changes with the
budget is visible. Per claim: the method, the round it was decided at and the seeds it used."""
from __future__ import annotations

import math
import os

import numpy as np
import pandas as pd

from analysis.claims import RULES, SEEDS_RULE, STATEMENTS, ClaimResult, claim_results
from analysis.claims_base import seeds_words, verdict_head
from analysis.data import Study
from analysis.style import RC, legend_below, panel_grid, save, write_csv
from analysis.tables import footer_md, footer_tex, md_escape, provenance_lines, tex_escape
from analysis.verifier import RULE_C4, STATEMENT_C4
from harness.declare.claims_spec import ClaimsSpec


def _seeds_cell(v: ClaimResult) -> str:
    if v.seeds_needed is not None:
        return str(v.seeds_needed)
    return "—" if not v.inconclusive else "n/a"


def _round(v: ClaimResult) -> str:
    return f"{v.round} of {v.rounds}" if v.round is not None else "—"


def _seed_list(seeds) -> str:
    s = [int(x) for x in seeds]
    if len(s) > 2 and s == list(range(s[0], s[-1] + 1)):
        return f"{s[0]}-{s[-1]}"
    return ",".join(str(x) for x in s)


def _data(study: Study, verdicts: list[ClaimResult], kimg: float | None = None) -> list[dict]:
    out = []
    for v in verdicts:
        row = {"claim": v.name, "metric": study.metric}
        if kimg is not None:
            row["kimg"] = kimg
        row.update({"comparison": v.comparison, "effect_name": v.effect_name,
                    "effect": v.effect, "ci_low": v.ci_low, "ci_high": v.ci_high,
                    "confidence": 1 - v.alpha if math.isfinite(v.alpha) else math.nan,
                    "threshold": v.threshold, "holds_if": v.holds_if, "n_seeds": v.n_seeds,
                    "seeds": _seed_list(v.seeds), "verdict": v.verdict,
                    "round": v.round, "rounds": v.rounds,
                    "seeds_to_decide": v.seeds_needed if v.seeds_needed is not None else None,
                    "method": v.method})
        out.append(row)
    return out


def rule_of(claim: str) -> str:

    base = claim.split("[")[0]
    return RULE_C4 if base == "C4" else RULES[base]


def statement_of(claim: str) -> str:

    base = claim.split("[")[0]
    return STATEMENT_C4 if base == "C4" else STATEMENTS[base]


def _frame(study: Study, verdicts, kimg=None) -> pd.DataFrame:
    data = pd.DataFrame(_data(study, verdicts, kimg))
    for col in ("seeds_to_decide", "round"):
        data[col] = data[col].astype("Int64")
    return data


def write_claims(study: Study, out_dir: str, spec: ClaimsSpec | None = None,
                 rows: pd.DataFrame | None = None) -> list[str]:
    spec = spec or ClaimsSpec()
    verdicts = claim_results(study, spec, rows=rows)
    os.makedirs(out_dir, exist_ok=True)
    csv = os.path.join(out_dir, "claims.data.csv")
    _frame(study, verdicts).to_csv(csv, index=False, float_format="%.6g")
    direction = "higher" if study.higher_better else "lower"
    plan = spec.seeds
    rounds = (f"Seeds on demand: {plan.start} seeds per group, then {plan.step} more per round "
              f"to the groups of the claims still open, up to {plan.max}; each round's interval "
              f"spends part of alpha = {spec.alpha:g} (Lan-DeMets Pocock-type spending, "
              f"README), so the chance of a false decision over all rounds stays at most "
              f"alpha." if plan else
              f"One look at the seeds the study has: {100 * (1 - spec.alpha):g}% intervals.")
    head = (f"Metric: `{study.metric}` ({direction} is better), final score = value at each "
            f"cell's last kimg. Each claim's effect is a ratio of seed-paired means with a "
            f"Fieller interval (paired t on the per-seed contrast; exact at any n ≥ 2 under "
            f"normality, analytic: no resampling). Claims are judged within each level of "
            f"the other grid axes" + (f" (pooled: {', '.join(spec.pool)})" if spec.pool else "")
            + f". {rounds} C1 judges the pair declared before the data "
            f"({' vs '.join(spec.pair)}); C1-best is reported beside it. claims_kimg.data.csv "
            f"has every claim at every evaluated kimg after 0.")
    md = ["# Claims judged from this study's results", "", head, ""]
    md += [x + "\n" for x in provenance_lines(study)]
    md += ["| claim | comparison | effect | interval | seeds | verdict | round | seeds to "
           "decide |", "|---|---|---|---|---|---|---|---|"]
    for v in verdicts:
        shown = v.tested and v.claim != "C3"
        ci = f"[{v.fmt(v.ci_low)}, {v.fmt(v.ci_high)}]" if shown else "—"
        eff = v.fmt(v.effect) if shown else "—"
        md.append(f"| {v.name} | {md_escape(v.comparison)} | {eff} | {ci} | {v.n_seeds or '—'} "
                  f"| **{v.verdict}** | {_round(v)} | {_seeds_cell(v)} |")
    md += ["", SEEDS_RULE]
    for v in verdicts:
        md += ["", f"## {v.name}: {v.verdict}", "",
               f"*Claim:* {statement_of(v.claim)}", "",
               f"- comparison: {md_escape(v.comparison)}", f"- effect: {v.effect_name}"]
        if v.tested and v.claim != "C3":
            md.append(f"- estimate: {v.fmt(v.effect)}, {100 * (1 - v.alpha):.4g}% interval "
                      f"[{v.fmt(v.ci_low)}, {v.fmt(v.ci_high)}], threshold {v.fmt(v.threshold)} "
                      f"({'holds' if v.holds_if == 'below' else 'does not hold'} below it)")
            md.append(f"- method: {v.method}")
            md.append(f"- seeds used: {v.n_seeds} ({_seed_list(v.seeds)}); "
                      + (f"decided at round {_round(v)}" if v.round else
                         f"not decided ({v.rounds} round{'s' if v.rounds != 1 else ''} planned)"))
        if v.next_seeds:
            md.append(f"- open: the next round runs seeds {_seed_list(v.next_seeds)} of its "
                      f"groups")
        if v.seeds_note:
            md.append(f"- seeds to decide: {v.seeds_note}")
        md.append(f"- rule: {rule_of(v.claim)}")
        md += [f"- {md_escape(d)}" for d in v.details]
    md += ["", footer_md(study)]
    md_path = os.path.join(out_dir, "claims.md")
    with open(md_path, "w") as f:
        f.write("\n".join(md))
    tex = ["\\begin{table}[t]", "\\centering", "\\small",
           f"\\caption{{Claims judged on {tex_escape(study.metric)} ({direction} is better); "
           f"Fieller intervals of seed-paired ratios; for inconclusive claims, the seeds per "
           f"group that would decide them at the observed spread.}}", "\\label{tab:claims}",
           "\\begin{tabular}{lp{0.34\\linewidth}llcp{0.18\\linewidth}}", "\\toprule",
           "claim & comparison & effect & interval & seeds & verdict \\\\", "\\midrule"]
    for v in verdicts:
        shown = v.tested and v.claim != "C3"
        ci = f"[{v.fmt(v.ci_low)}, {v.fmt(v.ci_high)}]" if shown else "--"
        verdict = v.verdict + (f"; ~{v.seeds_needed} seeds decide" if v.seeds_needed else "")
        tex.append(" & ".join([tex_escape(v.name), tex_escape(v.comparison),
                               tex_escape(v.fmt(v.effect)) if shown else "--", tex_escape(ci),
                               str(v.n_seeds or "--"), tex_escape(verdict)]) + " \\\\")
    tex += ["\\bottomrule", "\\end{tabular}", footer_tex(study).rstrip("\n"),
            "\\end{table}", ""]
    tex_path = os.path.join(out_dir, "claims.tex")
    with open(tex_path, "w") as f:
        f.write("\n".join(tex))
    return [md_path, tex_path, csv]


# ----------------------------------------------------------------------------- claims_kimg
VERDICT_COLORS = {"holds": "#029e73", "does not hold": "#d55e00", "inconclusive": "#888888"}


def claims_by_kimg(study: Study, spec: ClaimsSpec | None = None) -> pd.DataFrame:
    """Every claim at every evaluated kimg after 0 (the cells evaluated there), one row each."""
    frames = []
    for kimg, at in study.scores.groupby("kimg", sort=True):
        if float(kimg) == 0:
            continue  # every generator is its untrained init: no verdict
        frames.append(_frame(study, claim_results(study, spec, final=at, kimg=float(kimg)),
                             kimg=float(kimg)))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def write_claims_kimg(study: Study, out_dir: str, spec: ClaimsSpec | None = None) -> list[str]:
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    df = claims_by_kimg(study, spec)
    if not df.empty:  # no verdict at kimg 0: the generators there are untrained
        df = df[df["kimg"] > 0].reset_index(drop=True)
    if df.empty:
        return []
    csv = write_csv(df.drop(columns=["comparison", "effect_name", "method"]), out_dir,
                    "claims_kimg")
    show = [c for c in df["claim"].unique()
            if c != "C3" and "[" not in c and df.loc[df["claim"] == c, "effect"].notna().any()]
    if not show:
        print("figures: claims_kimg figure skipped (no claim tested at any kimg)")
        return [csv]
    pct = {"C1", "C1-best", "C2"}
    # a seeds-on-demand study judges each claim at each kimg at the round its rule reached there
    n_shown = df.loc[df["claim"].isin(show), "n_seeds"]
    words, _ = seeds_words(n_shown, by="claim and kimg")
    with plt.rc_context(RC):
        ncol = min(3, len(show))  # three across: a two-column page width at most
        fig, axes, _ = panel_grid(len(show), ncol, w=1.65, h=1.25, wgap=0.62, hgap=0.8,
                                  left=0.6, top=0.75)
        for k, (ax, claim) in enumerate(zip(axes, show)):
            d = df[df["claim"] == claim].sort_values("kimg")
            scale = 100.0 if claim.split(" (")[0] in pct else 1.0
            x = d["kimg"].to_numpy(float)
            e = d["effect"].to_numpy(float) * scale
            lo, hi = d["ci_low"].to_numpy(float) * scale, d["ci_high"].to_numpy(float) * scale
            ax.plot(x, e, color="#444444", lw=0.9, zorder=1)
            colors = [VERDICT_COLORS.get(verdict_head(vd), "#bbbbbb") for vd in d["verdict"]]
            ok = np.isfinite(lo) & np.isfinite(hi)
            ax.vlines(x[ok], lo[ok], hi[ok], colors=np.array(colors, dtype=object)[ok],
                      lw=1.6, zorder=2)
            fin = np.isfinite(e)
            col = np.array(colors, dtype=object)
            ax.scatter(x[fin & ok], e[fin & ok], c=col[fin & ok], s=18, zorder=3, lw=0)
            thr = float(d["threshold"].iloc[0]) * scale
            ax.axhline(thr, color="black", ls=(0, (4, 2)), lw=0.9)
            unbounded = fin & ~ok  # an interval with no finite end: dotted to the axis edges
            if unbounded.any():
                ylim = ax.get_ylim()
                ax.vlines(x[unbounded], *ylim, colors=col[unbounded], lw=1.0, ls=":", zorder=2)
                ax.scatter(x[unbounded], e[unbounded], facecolors="white",
                           edgecolors=list(col[unbounded]), s=18, lw=1.0, zorder=3)
                ax.set_ylim(ylim)
            rule = "holds if" + (" below " if d["holds_if"].iloc[0] == "below" else " above ")
            title = f"{claim}: {rule}{thr:g}{'%' if scale == 100 else ''}"
            ax.set_title(title if len(title) <= 30 else title.replace(": ", ":\n", 1),
                         fontsize=7.5)  # a level's label (student.lr=...) on its own line
            ax.set_xlabel("kimg", fontsize=7)
            ax.set_ylabel("effect" + (" (%)" if scale == 100 else " (share of gap)"), fontsize=7)
            ax.tick_params(labelsize=7)
        handles = [Line2D([], [], color=c, marker="o", lw=1.6) for c in VERDICT_COLORS.values()]
        handles.append(Line2D([], [], color="#888888", marker="o", markerfacecolor="white",
                              ls=":", lw=1.0))
        handles.append(Line2D([], [], color="black", ls=(0, (4, 2)), lw=0.9))
        labels = list(VERDICT_COLORS) + ["interval unbounded", "threshold"]
        legend_below(fig, handles, labels, ncol=len(labels), title="verdict at that kimg")
        fig.suptitle(f"Claims at every evaluated kimg > 0 on {study.metric}:\nestimate and "
                     f"interval (Fieller, seed-paired) over {words}" if n_shown.max() > 1 else
                     f"Claims at every evaluated kimg > 0 on {study.metric}\n(one seed per cell: "
                     f"no interval, every verdict inconclusive)", fontsize=8,
                     y=1 - 0.08 / fig.get_size_inches()[1], va="top")
        return [csv] + save(fig, out_dir, "claims_kimg", study.note())
