"""The results table (markdown + LaTeX) and the excluded-cells footer shared with claims."""
from __future__ import annotations

import math
import os

import pandas as pd

from analysis.data import Study, ordered
from analysis.seeds import WIDE_RATIO, seed_summary, seeds_text
from analysis.style import fmt_num, fmt_pm
from analysis.tuning import protocol_lines

MAX_LISTED = 40  # excluded cells listed one by one; the rest are counted


def tex_escape(s: str) -> str:
    out = str(s)
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("$", r"\$"),
                 ("#", r"\#"), ("_", r"\_"), ("{", r"\{"), ("}", r"\}"), ("~", r"\~{}"),
                 ("^", r"\^{}")):
        out = out.replace(a, b)
    for a, b in (("σ", r"$\sigma$"), ("±", r"$\pm$"), ("→", r"$\rightarrow$"), ("−", "$-$"),
                 ("≥", r"$\geq$"), ("—", "---")):
        out = out.replace(a, b)
    return out


def md_escape(s: str) -> str:
    return str(s).replace("|", r"\|")


def _excluded_rows(study: Study) -> tuple[list[tuple], int]:
    ex = study.excluded
    rows = [(r.cell, r.loss, r.init, int(r.seed) if pd.notna(r.seed) else "", r.reason,
             r.message) for r in ex.itertuples(index=False)]
    return rows[:MAX_LISTED], max(0, len(rows) - MAX_LISTED)


def provenance_lines(study: Study) -> list[str]:
    """The protocol and the tuning behind the study, in words (shared by table.md and
    claims.md)."""
    out = []
    if study.protocol is not None and study.protocol.protocol is not None:
        left = study.protocol.left_words(full=True)
        proto = study.protocol.protocol or "(none recorded)"
        out.append(f"**Protocol of {study.metric}:** {proto} "
                   f"(chosen as {study.protocol.source}; one protocol per metric). "
                   + (f"{left[0].upper()}{left[1:]}." if left
                      else "No rows under other protocols."))
    return out + protocol_lines(getattr(study, "tuned", None))


def footer_md(study: Study) -> str:
    rows, more = _excluded_rows(study)
    n_in = study.final["cell"].nunique()
    head = (f"**Cells:** {n_in} done cells enter the figures and tables; "
            f"{len(study.excluded)} excluded (failed, diverged, unfinished, orphaned "
            f"= not in pin.json's `current`, or without {study.metric}).")
    head = "\n\n".join(provenance_lines(study) + [head])
    if not rows:
        return head + "\n"
    lines = [head, "", "| excluded cell | loss | init | seed | reason | message |",
             "|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(md_escape(x) for x in r) + " |" for r in rows]
    if more:
        lines.append(f"\n... and {more} more excluded cells.")
    return "\n".join(lines) + "\n"


def footer_tex(study: Study) -> str:
    rows, more = _excluded_rows(study)
    n_in = study.final["cell"].nunique()
    out = [f"% {n_in} done cells included; {len(study.excluded)} excluded."]
    if study.protocol is not None and study.protocol.protocol is not None:
        out.append(f"% protocol of {study.metric}: "
                   f"{study.protocol.protocol or '(none recorded)'}".replace("\n", " "))
        words = study.protocol.words(full=True)
        if words:
            out.append(f"\\par\\footnotesize {tex_escape(words)}")
    if rows:
        items = "; ".join(f"\\texttt{{{tex_escape(r[0])}}} ({tex_escape(r[1])}, "
                          f"{tex_escape(r[2])}, seed {r[3]}): {tex_escape(r[4])}" for r in rows)
        if more:
            items += f"; and {more} more"
        out.append(f"\\par\\footnotesize Excluded cells: {items}.")
    return "\n".join(out) + "\n"


def aggregate(study: Study) -> pd.DataFrame:
    """Per (loss, init): n, median, mean, std, min, max, wide, seeds, values (``seed_summary``)."""
    agg = seed_summary(study.final, ["loss", "init"])
    agg.insert(0, "metric", study.metric)
    return ordered(agg, init_order=study.init_order)


def _group_text(r, pm: str) -> str:
    """'3.45±0.93 (3)', or for a wide group (seeds more than WIDE_RATIO apart) its median and
    every seed: 'median 95.9 [3.27 / 95.9 / 183]'."""
    if r.wide:
        return f"median {fmt_num(r.median)} [{seeds_text(r.values)}]"
    return f"{fmt_pm(r.mean, r.std, pm=pm)} ({r.n})"


def _cells(study: Study, agg: pd.DataFrame, pm: str, bold) -> tuple[list, list]:
    """Rows = inits, columns = losses (a long grid stays a column wide); the best loss per
    init in bold, compared on the median for wide groups and the mean otherwise."""
    center = agg["median"].where(agg["wide"].astype(bool), agg["mean"])
    agg = agg.assign(center=center.to_numpy())
    best = {}
    for init, g in agg.groupby("init"):
        best[init] = g["center"].max() if study.higher_better else g["center"].min()
    look = {(r.loss, r.init): r for r in agg.itertuples(index=False)}
    body = []
    for init in study.init_order:
        line = [init]
        for loss in study.loss_order:
            r = look.get((loss, init))
            if r is None:
                line.append("—")
                continue
            txt = _group_text(r, pm)
            line.append(bold(txt) if len(study.loss_order) > 1 and r.center == best[init]
                        else txt)
        body.append(line)
    refs = []
    for r in study.refs.itertuples(index=False):
        refs.append([r.label, f"{fmt_pm(r.mean, r.std, pm=pm)} ({r.n})"])
    return body, refs


def write_table(study: Study, out_dir: str) -> list[str]:
    agg = aggregate(study)
    os.makedirs(out_dir, exist_ok=True)
    csv = os.path.join(out_dir, "table.data.csv")
    agg.to_csv(csv, index=False, float_format="%.6g")
    direction = "higher" if study.higher_better else "lower"
    lo, hi, words = study.seeds_phrase()
    shown = ("single runs, one seed per cell (n = 1: no std)" if hi <= 1 else
             f"mean ± std over seeds ({words}; number of seeds in brackets), except groups "
             f"whose seeds differ by more than {WIDE_RATIO:g}x (possibly bimodal): their median "
             f"and every seed's value")
    caption = f"Final {study.metric} ({direction} is better): {shown}; best loss per init in bold."
    # markdown
    body, refs = _cells(study, agg, "±", lambda t: f"**{t}**")
    cols = ["init \\ loss"] + study.loss_order
    md = [f"# Results table: {study.metric}", "", caption, "",
          "| " + " | ".join(md_escape(c) for c in cols) + " |",
          "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(md_escape(c) for c in line) + " |" for line in body]
    if refs:
        md += ["", f"| reference | {md_escape(study.metric)} mean ± std (n) |", "|---|---|"]
        md += [f"| {md_escape(label)} | {val} |" for label, val in refs]
    md += ["", "References: teacher Heun-35 = the teacher's own 35-evaluation sampler; data floor "
           "= real training images scored against the held-out reference exactly as generated "
           "samples are; "
           "initial one-step generator = kimg 0 of teacher-init cells. Random init is the "
           "`random` row.", "", footer_md(study)]
    md_path = os.path.join(out_dir, "table.md")
    with open(md_path, "w") as f:
        f.write("\n".join(md))
    # LaTeX (booktabs)
    body, refs = _cells(study, agg, "±", lambda t: f"\\textbf{{{t}}}")
    n = len(study.loss_order)
    tex = ["\\begin{table}[t]", "\\centering", "\\small",
           f"\\caption{{{tex_escape(caption)}}}", "\\label{tab:results}",
           f"\\begin{{tabular}}{{l{'c' * n}}}", "\\toprule",
           " & ".join(["init"] + [tex_escape(c) for c in study.loss_order]) + " \\\\",
           "\\midrule"]
    tex += [" & ".join(_tex_cell(c) for c in line) + " \\\\" for line in body]
    if refs:
        tex.append("\\midrule")
        tex += [f"\\textit{{{tex_escape(label)}}} & \\multicolumn{{{n}}}{{l}}{{{_tex_cell(val)}}}"
                " \\\\" for label, val in refs]
    tex += ["\\bottomrule", "\\end{tabular}", footer_tex(study).rstrip("\n"), "\\end{table}", ""]
    tex_path = os.path.join(out_dir, "table.tex")
    with open(tex_path, "w") as f:
        f.write("\n".join(tex))
    return [md_path, tex_path, csv]


def _tex_cell(c: str) -> str:
    if c.startswith("\\textbf{"):
        return "\\textbf{" + tex_escape(c[len("\\textbf{"):-1]) + "}"
    return tex_escape(c)


def fmt_pct(x: float) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:+.1f}%"
