"""The ratio verifier (draw n candidates per kept sample, keep one by the ratio net's
estimate): score vs candidates per kept sample, and claim C4.

Reads result rows only (a DataFrame as ``harness.store.results.load_rows`` returns; no torch). The
verifier rows are written at a cell's final evaluation under ``<metric>@<mode><n>`` (for example
``fd_digits_1k@resample4``); n = 1 carries the plain one-step score of the same samples.

    verifier_figure(df, out_dir, metric=None, seed=0) -> [verifier.data.csv, .md, .png, .pdf]
    claim_c4(df, metric=None, mode=None, cells=None, spec=None, alpha=None, seeds=None)
        -> analysis.claims_base.ClaimResult

Only ``done`` cells with teacher init enter (``cells``, when given, restricts further: pass the
included cells of ``analysis.data.load_study`` to apply its exclusions, orphans among them).
"""
from __future__ import annotations

import math
import os
import re
import zlib

import matplotlib.pyplot as plt  # noqa: E402  (style selected the Agg backend)
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

from analysis.bootstrap import mean_ci
from analysis.claims_base import METHOD_SIMULTANEOUS, NOT_TESTED, ClaimResult, extreme, finish
from analysis.data import FLOOR, choose_metric, extra_axis_labels, higher_is_better, ordered
from analysis.stats import fieller
from analysis.style import (
    RC,
    REFERENCE_STYLE,
    axis_limits,
    fmt_num,
    fmt_pm,
    legend_below,
    loss_palette,
    loss_sort_key,
    panel_grid,
    save,
    use_log,
    write_csv,
)
from analysis.tables import fmt_pct
from harness.declare.claims_spec import ClaimsSpec

VERIFIER_RE = re.compile(r"(?P<base>.+)@(?P<mode>resample|best)(?P<n>\d+)\Z")
MODE_ORDER = ("resample", "best")
MODE_WORDS = {"resample": "importance resampling, weights exp(−l)",
              "best": "best of n (lowest l)"}
N_LABEL = "candidates per kept sample n (log2 scale)"
STATEMENT_C4 = ("The density-ratio network used as a verifier (n = 4 one-step candidates per kept "
                "sample, resampled by the ratio) improves the score over the plain one-step "
                "samples (n = 1) for every loss family.")
RULE_C4 = ("Teacher-init cells only. For each loss, the fixed pair is the score at n = 4 vs n = 1 "
           "of the same cells (n = 1 are the plain samples, which are also candidates at n = 4), "
           "effect = (mean n=4 − mean n=1) / mean n=1 as a relative shortfall (< 0: the verifier "
           "improves), a Fieller interval of the seed-paired ratio; the claim's effect is the "
           "worst (largest) over losses, with the max of the losses' simultaneous (Bonferroni) "
           "intervals. Holds if the interval lies below the threshold (every family improves); "
           "does not hold if it lies above; else inconclusive. Loss labels include the levels of "
           "any other grid axis, so the worst is over every family at every level.")


def parse(metric: str):
    """``'fd_digits_1k@resample4'`` -> ``('fd_digits_1k', 'resample', 4)``; None otherwise."""
    m = VERIFIER_RE.match(str(metric))
    return None if m is None else (m["base"], m["mode"], int(m["n"]))


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(name.encode())])


def verifier_table(df: pd.DataFrame, metric: str | None = None, cells=None,
                   init: str = "teacher") -> tuple[pd.DataFrame, str | None]:
    """One row per (cell, mode, n): cell, loss, init, seed, mode, n, value, at the cell's last
    kimg with verifier rows; ``init`` cells of status done only. Returns (table, base metric)."""
    cols = ["cell", "loss", "init", "seed", "mode", "n", "kimg", "value"]
    empty = pd.DataFrame(columns=cols)
    if df is None or df.empty:
        return empty, metric
    parsed = {m: parse(m) for m in df["metric"].unique()}
    parsed = {m: p for m, p in parsed.items() if p is not None}
    if not parsed:
        return empty, metric
    if metric is None:
        bases = pd.Series([p[0] for p in parsed.values()])
        metric = choose_metric(bases.value_counts())
        if metric is None:
            return empty, None
    keep = {m: p for m, p in parsed.items() if p[0] == metric}
    if not keep:
        return empty, metric
    d = df[df["metric"].isin(list(keep)) & (df["status"] == "done") & (df["init"] == init)
           & df["value"].notna()].copy()
    if cells is not None:
        d = d[d["cell"].isin(set(cells))]
    if d.empty:
        return empty, metric
    if "axes" in d.columns and d["axes"].notna().any():
        d["loss"] = extra_axis_labels(d).to_numpy()
    d["mode"] = [keep[m][1] for m in d["metric"]]
    d["n"] = [keep[m][2] for m in d["metric"]]
    last = d.groupby("cell")["kimg"].transform("max")
    d = d[d["kimg"] == last]
    d = d[cols].sort_values(["loss", "mode", "n", "seed", "cell"], kind="stable")
    return d.reset_index(drop=True), metric


def verifier_costs(df: pd.DataFrame, t: pd.DataFrame) -> pd.DataFrame:
    """Per (loss, mode, n) of the table ``t``'s cells: mean wall seconds and NFE per kept sample
    (``verifier_s_per_sample@<mode><n>``, ``nfe_per_sample@<mode><n>``), and per loss the mean
    seconds of the post-hoc ratio-net fit (``verifier_fit_s``; NaN where the cells' own ratio
    net was the verifier)."""
    d = df[df["cell"].isin(set(t["cell"])) & df["value"].notna()]
    loss_of = t.drop_duplicates("cell").set_index("cell")["loss"]
    out = []
    for (loss, mode, n), g in t.groupby(["loss", "mode", "n"], sort=False):
        row = {"loss": loss, "mode": mode, "n": n}
        for col, name in (("s_per_kept", "verifier_s_per_sample"), ("nfe_per_kept", "nfe_per_sample")):
            v = d[d["cell"].isin(set(g["cell"])) & (d["metric"] == f"{name}@{mode}{n}")]["value"]
            row[col] = float(v.mean()) if len(v) else math.nan
        out.append(row)
    costs = pd.DataFrame(out, columns=["loss", "mode", "n", "s_per_kept", "nfe_per_kept"])
    fit = d[d["metric"] == "verifier_fit_s"]
    fit = fit.assign(loss=fit["cell"].map(loss_of)).groupby("loss")["value"].mean()
    costs["fit_s"] = costs["loss"].map(fit).astype(float)
    return costs


def verifier_markdown(agg: pd.DataFrame, metric: str) -> str:
    """The figure's numbers as a table: score mean±std (seeds) and ms per kept sample per n."""
    ns = sorted(agg["n"].dropna().unique())
    head = ["loss", "mode", *[f"n={int(n)}" for n in ns], "post-hoc ratio-net fit (s)"]
    lines = [f"# Ratio verifier: final {metric} (mean±std over seeds) and wall time per kept "
             f"sample\n", "Each entry: score (seeds); below it, milliseconds and network "
             "evaluations (generator + ratio net) per kept sample on the machine that ran the "
             "cell. The fit column is the post-hoc ratio net's training cost per cell (di, sid); "
             "ratio cells use their own net (—).\n",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (loss, mode), g in agg.groupby(["loss", "mode"], sort=False):
        g = g.set_index("n")
        cells = []
        for n in ns:
            if n not in g.index:
                cells.append("—")
                continue
            r = g.loc[n]
            cells.append(f"{fmt_pm(r['mean'], r['std'])} ({int(r['seeds'])})<br>"
                         f"{fmt_num(1e3 * r['s_per_kept'])} ms, {fmt_num(r['nfe_per_kept'], 2)} NFE")
        fit = g["fit_s"].dropna()
        lines.append("| " + " | ".join([str(loss), str(mode), *cells,
                                          fmt_num(float(fit.iloc[0])) if len(fit) else "—"]) + " |")
    return "\n".join(lines) + "\n"


def _refs(df: pd.DataFrame, metric: str) -> list[tuple[str, float]]:
    out = []
    if "status" not in df.columns:
        return out
    ref = df[(df["status"] == "reference") & (df["metric"] == metric)]
    for name in ("teacher_heun35", FLOOR):
        v = ref.loc[ref["init"] == name, "value"].to_numpy(dtype=float)
        if len(v):
            out.append((name, float(v.mean())))
    return out


def verifier_figure(df: pd.DataFrame, out_dir: str, metric: str | None = None, seed: int = 0,
                    rng: np.random.Generator | None = None, cells=None) -> list[str]:
    """Score vs n (log2 axis), one line per loss, teacher-init cells, mean and 95% bootstrap CI
    over seeds; one panel per verifier mode. Writes verifier.data.csv, .png, .pdf."""
    t, metric = verifier_table(df, metric, cells)
    if t.empty:
        print("figures: verifier skipped (no <metric>@<mode><n> rows of done teacher-init cells)")
        return []
    rng = rng if rng is not None else _rng(seed, "verifier")
    higher = higher_is_better(metric)
    agg = mean_ci(t.rename(columns={"n": "cand"}), ["loss", "mode", "cand"], rng)
    agg = agg.rename(columns={"n": "seeds"}).rename(columns={"cand": "n"})
    agg["_m"] = agg["mode"].map({m: i for i, m in enumerate(MODE_ORDER)})
    agg = agg.sort_values(["_m", "n"], kind="stable").drop(columns="_m")
    agg = ordered(agg, init=None)  # stable sort: loss order first, then mode, then n
    agg = agg[["loss", "mode", "n", "seeds", "mean", "std", "ci_low", "ci_high"]]
    agg = agg.merge(verifier_costs(df, t), on=["loss", "mode", "n"], how="left")
    refs = _refs(df, metric)
    data = pd.concat([agg, pd.DataFrame([{"loss": "reference", "mode": name, "mean": v}
                                         for name, v in refs])], ignore_index=True)
    data.insert(0, "metric", metric)
    csv = write_csv(data, out_dir, "verifier")
    md = os.path.join(out_dir, "verifier.md")
    with open(md, "w") as fh:
        fh.write(verifier_markdown(agg, metric))
    modes = [m for m in MODE_ORDER if m in set(agg["mode"])]
    losses = sorted(agg["loss"].unique(), key=loss_sort_key)
    palette = loss_palette(losses)
    with plt.rc_context(RC):
        # one small panel per (mode, loss): a thin line per seed, the median on top (one band
        # per loss in one panel hid every line under the others)
        panels = [(m, lo) for m in modes for lo in losses]
        ncol = min(len(panels), 3)  # three across: a two-column page width at most
        fig, axes, _ = panel_grid(len(panels), ncol, w=1.75, h=1.3, wgap=0.12, hgap=0.45,
                                  left=0.65, top=0.75)
        vals = t["value"].tolist() + [v for _, v in refs]
        log = use_log(vals)
        ylim = axis_limits(vals, log)
        ns = sorted(agg["n"].unique())
        for k, (ax, (mode, loss)) in enumerate(zip(axes, panels)):
            c = palette[loss]
            g = t[(t["loss"] == loss) & (t["mode"] == mode)]
            for _, run in g.groupby("seed", sort=True):
                run = run.sort_values("n")
                ax.plot(run["n"].to_numpy(float), run["value"], color=c, lw=0.7, alpha=0.5)
            med = g.groupby("n")["value"].median()
            ax.plot(med.index.to_numpy(float), med.to_numpy(float), color=c, lw=1.8,
                    marker="o", ms=2.5)
            for name, val in refs:
                st = REFERENCE_STYLE[name]
                ax.axhline(val, color=st["color"], ls=st["linestyle"], lw=1)
            ax.set_xscale("log", base=2)
            ax.set_xticks(ns)
            ax.set_xticklabels([str(int(n)) for n in ns], fontsize=6.5)
            ax.minorticks_off()
            if log:
                ax.set_yscale("log")
                ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))  # 2, 5, 10, 20, 50
                ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_ylim(*ylim)  # one scale for every panel
            ax.tick_params(labelsize=6.5)
            ax.set_title(loss + (f" ({mode})" if len(modes) > 1 else ""), fontsize=7.5, color=c)
            if k % ncol:
                ax.tick_params(labelleft=False)
            else:
                ax.set_ylabel(metric + (" (log)" if log else ""), fontsize=7)
            if k + ncol >= len(panels):
                ax.set_xlabel("candidates n", fontsize=7)
            else:
                ax.tick_params(labelbottom=False)
        handles = [Line2D([], [], color="#555555", lw=0.7, alpha=0.6),
                   Line2D([], [], color="#555555", lw=1.8, marker="o", ms=2.5)]
        labels = ["one seed", "median over seeds"]
        for name, val in refs:
            st = REFERENCE_STYLE[name]
            handles.append(Line2D([], [], color=st["color"], ls=st["linestyle"], lw=1.2))
            labels.append(f"{st['label']}: {fmt_num(val)}")
        n_seeds = int(agg["seeds"].max())
        words = " / ".join(f"{m}: {MODE_WORDS[m]}" for m in modes)
        fig.suptitle(f"Ratio verifier ({words}):\nfinal {metric} ({'higher' if higher else 'lower'}"
                     f" is better) vs {N_LABEL},\nteacher init, every seed "
                     f"(up to {n_seeds}) and the median", fontsize=7.5,
                     y=1 - 0.05 / fig.get_size_inches()[1], va="top")
        legend_below(fig, handles, labels)
        note = ("n = 1: the plain one-step samples (the same draw as the plain score); n > 1 costs "
                "n generator + n ratio-net evaluations per kept sample.")
        return [csv, md] + save(fig, out_dir, "verifier", note)


def claim_c4(df: pd.DataFrame, metric: str | None = None, mode: str | None = None,
             cells=None, spec=None, alpha: float | None = None, seeds=None):
    """C4: the ratio verifier improves the score at n = 4 over n = 1 for every loss family.

    Returns an ``analysis.claims_base.ClaimResult``: effect = the worst family's relative
    shortfall of n=4 against n=1 (< 0: improvement), each family's a Fieller interval of the
    seed-paired ratio (``analysis.stats``), the worst from their simultaneous (Bonferroni)
    intervals; threshold and direction from ``spec`` (``harness.declare.claims_spec``), error rate
    ``alpha`` (default ``spec.alpha``), seeds restricted to ``seeds`` (None: all). The statement
    and rule are STATEMENT_C4 / RULE_C4.
    """

    spec = spec or ClaimsSpec()
    alpha = spec.alpha if alpha is None else float(alpha)
    threshold, holds_if = spec.threshold("C4")
    t, metric = verifier_table(df, metric, cells)
    v = ClaimResult("C4", "n=4 vs n=1 of the ratio verifier, every loss, teacher init",
                    "relative shortfall (n=4 − n=1) / n=1, worst loss", threshold=threshold,
                    holds_if=holds_if, alpha=alpha, method=METHOD_SIMULTANEOUS)
    if t.empty:
        v.details.append("needs <metric>@resample1 and @resample4 rows (eval.verifier with n "
                         "including 1 and 4) of done teacher-init cells")
        return v
    present = set(t["mode"])
    mode = mode or next(m for m in MODE_ORDER if m in present)
    t = t[t["mode"] == mode]
    if seeds is not None:
        t = t[t["seed"].isin(list(seeds))]
    sign = -1.0 if higher_is_better(metric) else 1.0
    losses = sorted(t["loss"].unique(), key=loss_sort_key)
    pairs, untested = {}, []
    for loss in losses:
        g = t[(t["loss"] == loss) & t["n"].isin([1, 4])]
        w = g.groupby(["seed", "n"])["value"].mean().unstack("n")
        if 1 not in w.columns or 4 not in w.columns or w.dropna(subset=[1, 4]).empty:
            untested.append(loss)
            continue
        pairs[loss] = w.dropna(subset=[1, 4]).sort_index()
    if untested:
        v.details.append(f"not tested (no paired n=1 and n=4 rows): {', '.join(untested)}")
    if not pairs:
        v.verdict = NOT_TESTED
        return v
    effects, los, his = [], [], []
    for loss, w in pairs.items():
        a1, a4 = w[1].to_numpy(float), w[4].to_numpy(float)
        u, d = sign * (a4 - a1), (a1 if a1.mean() > 0 else -a1)
        e, lo, hi = (float(x) for x in fieller(u, d, alpha / len(pairs)))
        effects.append(e), los.append(lo), his.append(hi)
        m = len(a1)
        _, lo1, hi1 = (float(x) for x in fieller(u, d, alpha))
        v.details.append(f"{loss}: n=1 {fmt_pm(a1.mean(), a1.std(ddof=1) if m > 1 else math.nan)}"
                         f", n=4 {fmt_pm(a4.mean(), a4.std(ddof=1) if m > 1 else math.nan)} "
                         f"({fmt_pct(e)}, interval [{fmt_pct(lo1)}, {fmt_pct(hi1)}], {m} seeds)")
    tested = list(pairs)
    worst = int(np.argmax(effects))
    v.effect, v.ci_low, v.ci_high = extreme(effects, los, his, worst=True)
    common = sorted(set.intersection(*(set(w.index) for w in pairs.values())))
    v.n_seeds, v.seeds = min(len(w) for w in pairs.values()), tuple(int(s) for s in common)
    v.groups, v.comparisons = [(loss, "teacher") for loss in tested], len(tested)
    v.cells = sorted(t.loc[t["loss"].isin(tested), "cell"].astype(str).unique())
    v.comparison = (f"n=4 vs n=1 ({mode}), paired by seed, teacher init, every one of "
                    f"{len(tested)} losses; worst: {tested[worst]}")
    finish(v)
    if untested and v.verdict == "holds":
        v.verdict = f"inconclusive ({v.n_seeds} seed{'s' if v.n_seeds != 1 else ''})"
    return v
