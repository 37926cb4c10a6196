"""Write the judged claims (``analysis.claims``): claims.md / .tex / .data.csv, and every claim at
every evaluated kimg (claims_kimg), so a verdict that changes with the budget is visible."""
from __future__ import annotations

import os

import numpy as np
import pandas as pd

from .claims import (C1_PAIR, RULES, SEEDS_RULE, STATEMENTS, UNDECIDABLE, Verdict, judge)
from .data import B, Study
from .style import RC, panel_grid, save, write_csv
from .tables import footer_md, footer_tex, md_escape, provenance_lines, tex_escape

def _seeds_cell(v: Verdict) -> str:
    if v.seeds_needed is not None:
        return str(v.seeds_needed)
    return "—" if not v.inconclusive else ("cannot be decided" if UNDECIDABLE in v.seeds_note
                                          else "n/a")


def _data(study: Study, verdicts: list[Verdict], kimg: float | None = None) -> list[dict]:
    out = []
    for v in verdicts:
        row = {"claim": v.claim, "metric": study.metric}
        if kimg is not None:
            row["kimg"] = kimg
        row.update({"comparison": v.comparison, "effect_name": v.effect_name,
                    "effect": v.effect, "ci_low": v.ci_low, "ci_high": v.ci_high,
                    "threshold": v.threshold, "holds_if": v.holds_if, "n_seeds": v.n_seeds,
                    "verdict": v.verdict,
                    "seeds_to_decide": v.seeds_needed if v.seeds_needed is not None else None})
        out.append(row)
    return out


def _rules(claim: str) -> str:
    return RULES[claim.split("[")[0]]


def write_claims(study: Study, out_dir: str, rng: np.random.Generator,
                 pair: tuple[str, str] | None = None, rows: pd.DataFrame | None = None) -> list[str]:
    verdicts = judge(study, rng, pair=pair)
    if rows is not None and rows["metric"].str.contains("@", regex=False).any():
        from .verifier import RULE_C4, STATEMENT_C4, claim_c4  # (verifier imports this module)

        STATEMENTS.setdefault("C4", STATEMENT_C4)
        RULES.setdefault("C4", RULE_C4)
        # after the others, so their draws stay as they were
        verdicts.append(claim_c4(rows, metric=study.metric, rng=rng, cells=set(study.final.cell)))
    os.makedirs(out_dir, exist_ok=True)
    data = pd.DataFrame(_data(study, verdicts))
    data["seeds_to_decide"] = data["seeds_to_decide"].astype("Int64")
    csv = os.path.join(out_dir, "claims.data.csv")
    data.to_csv(csv, index=False, float_format="%.6g")
    direction = "higher" if study.higher_better else "lower"
    head = (f"Metric: `{study.metric}` ({direction} is better), final score = value at each "
            f"cell's last kimg. Bootstrap: {B} resamples of seeds within each (loss, init) group, "
            f"each group from its own stream (seeded by `seed` and the group's name), 95% "
            f"percentile intervals. C1 judges the pair declared before the data "
            f"({' vs '.join(pair or C1_PAIR)}); C1-best, with its selection repeated in every "
            f"resample, is reported beside it. claims_kimg.data.csv has every claim at every "
            f"evaluated kimg.")
    md = ["# Claims judged from this study's results", "", head, ""]
    md += [x + "\n" for x in provenance_lines(study)]
    md += ["| claim | comparison | effect | 95% CI | seeds | verdict | seeds to decide |",
           "|---|---|---|---|---|---|---|"]
    for v in verdicts:
        shown = v.tested and v.claim != "C3"
        ci = f"[{v.fmt(v.ci_low)}, {v.fmt(v.ci_high)}]" if shown else "—"
        eff = v.fmt(v.effect) if shown else "—"
        md.append(f"| {v.claim} | {md_escape(v.comparison)} | {eff} | {ci} | {v.n_seeds or '—'} "
                  f"| **{v.verdict}** | {_seeds_cell(v)} |")
    md += ["", SEEDS_RULE]
    for v in verdicts:
        md += ["", f"## {v.claim}: {v.verdict}", "",
               f"*Claim:* {STATEMENTS[v.claim.split('[')[0]]}", "",
               f"- comparison: {md_escape(v.comparison)}", f"- effect: {v.effect_name}"]
        if v.tested and v.claim != "C3":
            md.append(f"- estimate: {v.fmt(v.effect)}, 95% CI [{v.fmt(v.ci_low)}, "
                      f"{v.fmt(v.ci_high)}], seeds per group ≥ {v.n_seeds}")
        if v.seeds_note:
            md.append(f"- seeds to decide: {v.seeds_note}")
        md.append(f"- rule: {_rules(v.claim)}")
        md += [f"- {md_escape(d)}" for d in v.details]
    md += ["", footer_md(study)]
    md_path = os.path.join(out_dir, "claims.md")
    with open(md_path, "w") as f:
        f.write("\n".join(md))
    tex = ["\\begin{table}[t]", "\\centering", "\\small",
           f"\\caption{{Claims judged on {tex_escape(study.metric)} ({direction} is better); "
           f"95\\% bootstrap CI over seeds ({B} resamples); for inconclusive claims, the seeds "
           f"per group that would decide them at the observed spread.}}", "\\label{tab:claims}",
           "\\begin{tabular}{lp{0.34\\linewidth}llcp{0.18\\linewidth}}", "\\toprule",
           "claim & comparison & effect & 95\\% CI & seeds & verdict \\\\", "\\midrule"]
    for v in verdicts:
        shown = v.tested and v.claim != "C3"
        ci = f"[{v.fmt(v.ci_low)}, {v.fmt(v.ci_high)}]" if shown else "--"
        verdict = v.verdict + (f"; ~{v.seeds_needed} seeds decide" if v.seeds_needed else "")
        tex.append(" & ".join([tex_escape(v.claim), tex_escape(v.comparison),
                               tex_escape(v.fmt(v.effect)) if shown else "--", tex_escape(ci),
                               str(v.n_seeds or "--"), tex_escape(verdict)]) + " \\\\")
    tex += ["\\bottomrule", "\\end{tabular}", footer_tex(study).rstrip("\n"), "\\end{table}", ""]
    tex_path = os.path.join(out_dir, "claims.tex")
    with open(tex_path, "w") as f:
        f.write("\n".join(tex))
    return [md_path, tex_path, csv]


# ----------------------------------------------------------------------------- claims_kimg
VERDICT_COLORS = {"holds": "#029e73", "does not hold": "#d55e00", "inconclusive": "#888888"}


def claims_by_kimg(study: Study, rng: np.random.Generator,
                   pair: tuple[str, str] | None = None) -> pd.DataFrame:
    """Every claim at every evaluated kimg (the cells evaluated there), one row each; the same
    per-group bootstrap streams as ``write_claims`` given the same ``rng`` state."""
    base = int(rng.integers(2 ** 62))
    rows, cache = [], {}
    scores = study.scores
    for kimg, at in scores.groupby("kimg", sort=True):
        rows += _data(study, judge(study, rng, final=at, pair=pair, base=base, cache=cache),
                      kimg=float(kimg))
    df = pd.DataFrame(rows)
    if not df.empty:
        df["seeds_to_decide"] = df["seeds_to_decide"].astype("Int64")
    return df


def write_claims_kimg(study: Study, out_dir: str, rng: np.random.Generator,
                      pair: tuple[str, str] | None = None) -> list[str]:
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    df = claims_by_kimg(study, rng, pair)
    if not df.empty:  # no verdict at kimg 0: the generators there are untrained
        df = df[df["kimg"] > 0].reset_index(drop=True)
    if df.empty:
        return []
    csv = write_csv(df.drop(columns=["comparison", "effect_name"]), out_dir, "claims_kimg")
    show = [c for c in df["claim"].unique()
            if c != "C3" and "[" not in c and df.loc[df["claim"] == c, "effect"].notna().any()]
    if not show:
        print("figures: claims_kimg figure skipped (no claim tested at any kimg)")
        return [csv]
    pct = {"C1", "C1-best", "C2"}
    with plt.rc_context(RC):
        ncol = min(4, len(show))
        fig, axes, _ = panel_grid(len(show), ncol, w=2.3, h=1.6, wgap=0.55, left=0.7)
        for k, (ax, claim) in enumerate(zip(axes, show)):
            d = df[df["claim"] == claim].sort_values("kimg")
            scale = 100.0 if claim in pct else 1.0
            x = d["kimg"].to_numpy(float)
            e = d["effect"].to_numpy(float) * scale
            lo, hi = d["ci_low"].to_numpy(float) * scale, d["ci_high"].to_numpy(float) * scale
            ax.plot(x, e, color="#444444", lw=0.9, zorder=1)
            colors = [VERDICT_COLORS.get(vd.split(" (")[0], "#bbbbbb") for vd in d["verdict"]]
            ok = np.isfinite(lo) & np.isfinite(hi)
            ax.vlines(x[ok], lo[ok], hi[ok], colors=np.array(colors, dtype=object)[ok],
                      lw=1.6, zorder=2)
            fin = np.isfinite(e)
            ax.scatter(x[fin], e[fin], c=np.array(colors, dtype=object)[fin], s=18, zorder=3,
                       lw=0)
            thr = float(d["threshold"].iloc[0]) * scale
            ax.axhline(thr, color="black", ls=(0, (4, 2)), lw=0.9)
            rule = "holds if CI" + (" below " if d["holds_if"].iloc[0] == "below" else " above ")
            ax.set_title(f"{claim}: {rule}{thr:g}{'%' if scale == 100 else ''}", fontsize=7.5)
            ax.set_xlabel("kimg", fontsize=7)
            ax.set_ylabel("effect" + (" (%)" if scale == 100 else " (share of gap)"), fontsize=7)
        handles = [Line2D([], [], color=c, marker="o", lw=1.6) for c in VERDICT_COLORS.values()]
        handles.append(Line2D([], [], color="black", ls=(0, (4, 2)), lw=0.9))
        labels = list(VERDICT_COLORS) + ["threshold"]
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False,
                   title="verdict at that kimg")
        _, hi_n, words = study.seeds_phrase()
        fig.suptitle(f"Claims at every evaluated kimg > 0 on {study.metric}: estimate and 95% "
                     f"bootstrap CI over {words}" if hi_n > 1 else
                     f"Claims at every evaluated kimg > 0 on {study.metric} (one seed per cell: no "
                     f"interval, every verdict inconclusive)", fontsize=8.5,
                     y=1 - 0.12 / fig.get_size_inches()[1], va="top")
        return [csv] + save(fig, out_dir, "claims_kimg", study.note())
