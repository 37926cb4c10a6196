"""Two figures that read the whole study at once: ``forest`` (every claim's effect and interval
against its threshold) and ``kimg0`` (every seed of every init at kimg 0 and at the end)."""
from __future__ import annotations

import math
import textwrap

import matplotlib.pyplot as plt  # noqa: E402  (style selected the Agg backend)
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D  # noqa: E402

from analysis.claim_view import claims_frame, judged_claims  # noqa: E402
from analysis.claims_base import seeds_words, verdict_head  # noqa: E402
from analysis.data import Study  # noqa: E402
from analysis.panels import _seeds_shown, _ylabel  # noqa: E402
from analysis.seeds import offsets  # noqa: E402
from analysis.style import RC, axis_limits, legend_below, log_ticks, save, use_log, write_csv
from harness.declare.claims_spec import ClaimsSpec


# ------------------------------------------------------------------------------------- forest
def forest(study: Study, out_dir: str, rng, timer, rows: pd.DataFrame | None = None,
           claims: ClaimsSpec | None = None) -> list[str]:
    """One row per tested claim: the estimate (dot), its interval (bar, at the claim's level), the claim's
    threshold (a red tick on that row; the side on which the claim holds under its name); the
    verdict is written at the right in its colour. x is the effect in %, symmetric-log beyond ±100%."""
    with timer("forest: judge+render"):
        judged = [c for c in judged_claims(study, claims, rows=rows) if c.name != "C3"]
        data = claims_frame(judged).drop(columns=["statement", "rule", "comparison"])
        data.insert(1, "metric", study.metric)
        csv = write_csv(data, out_dir, "forest")
        shown = [c for c in judged if math.isfinite(c.effect)]
        if not shown:
            print("figures: forest skipped (no claim tested)")
            return [csv]
        with plt.rc_context(RC):
            # fixed inches: claim and rule left, the axes, the verdict right (its own column,
            # in the verdict's colour, so no text sits on an interval)
            left, width, right, row = 1.5, 1.9, 1.45, 0.3
            fw, fh = left + width + right, 0.95 + row * len(shown)
            fig = plt.figure(figsize=(fw, fh))
            ax = fig.add_axes((left / fw, 0.6 / fh, width / fw, row * len(shown) / fh))
            ys = np.arange(len(shown))[::-1]
            words, by_claim = seeds_words(c.n_seeds for c in shown)
            for y, c in zip(ys, shown):
                pct = [100 * c.effect, 100 * c.lo, 100 * c.hi, 100 * c.threshold]
                if math.isfinite(pct[1]) and math.isfinite(pct[2]):
                    ax.plot(pct[1:3], [y, y], color="#333333", lw=1.6, solid_capstyle="butt")
                ax.plot([pct[0]], [y], "o", color="#333333", ms=4.5, zorder=3)
                if math.isfinite(pct[3]):
                    ax.plot([pct[3]], [y], marker="|", color="#d62728", ms=11, mew=1.8,
                            zorder=4)
                ax.text(1.04, y, _verdict_words(c, by_claim), transform=ax.get_yaxis_transform(),
                        va="center", ha="left", fontsize=7, linespacing=1.0,
                        color=VERDICT_INK.get(verdict_head(c.verdict), "#333333"))
            ax.axvline(0, color="#999999", lw=0.8)
            ax.set_xscale("symlog", linthresh=100)
            ax.margins(x=0.08)  # an estimate at the edge stays whole
            lo_x, hi_x = ax.get_xlim()
            if max(abs(lo_x), abs(hi_x)) <= 100:  # all in the linear part: plain ticks
                from matplotlib.ticker import MaxNLocator, ScalarFormatter

                ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
                ax.xaxis.set_major_formatter(ScalarFormatter())
                ax.xaxis.set_minor_locator(MaxNLocator(nbins=5))
            ax.set_yticks(ys)
            ax.set_yticklabels([f"{c.name}\nholds if {'<' if c.holds_if == 'below' else '>'}"
                                f"{100 * c.threshold:g}%" for c in shown], fontsize=7,
                               linespacing=1.0)
            ax.set_ylim(-0.6, len(shown) - 0.4)
            ax.grid(axis="y", visible=False)
            ax.tick_params(axis="x", labelsize=7)
            # each interval's level: 1 - alpha, split over a best-of comparison and over the
            # looks of a seeds-on-demand study (so not always 95%)
            levels = {f"{100 * c.level:.4g}%" for c in shown if math.isfinite(c.level)}
            level = (f"{levels.pop()} interval" if len(levels) == 1 else
                     "interval at each claim's level" if levels else "95% interval")
            ax.set_xlabel(f"effect (%), {level.replace(' at each', ',')}\n(symmetric log "
                          f"beyond ±100%)", fontsize=7)
            fig.suptitle(f"Claims on final {study.metric}: estimate,\n{level} ({words}), "
                         f"threshold (red)", fontsize=7.5, x=(left + width / 2) / fw,
                         y=1 - 0.04 / fh, va="top")
            return [csv] + save(fig, out_dir, "forest", study.note())


VERDICT_INK = {"holds": "#027a59", "does not hold": "#b84a00", "inconclusive": "#555555"}


def _verdict_words(c, by_claim: bool) -> str:
    """The verdict in two lines: its head, then (where seeds differ by claim) the seeds it used
    and (where undecided) about how many would decide it."""
    head, _, rest = c.verdict.partition(" (")
    second = [f"{c.n_seeds} seeds"] if by_claim else []
    if c.seeds_to_decide:
        second.append(f"~{c.seeds_to_decide} decide" if by_claim else
                      f"~{c.seeds_to_decide} seeds decide")
    elif rest and not by_claim:
        second.append(rest.rstrip(")"))
    return head + ("\n" + "; ".join(second) if second else "")


# -------------------------------------------------------------------------------------- kimg0
def kimg0(study: Study, out_dir: str, rng, timer) -> list[str]:
    """Per init (rows) and loss, every seed's score at kimg 0 (hollow grey) joined to its final
    score (filled, loss colour): what training did to each start."""
    s = study.scores
    first = s[s["kimg"] == 0][["cell", "value"]].rename(columns={"value": "kimg0"})
    if first.empty:
        print("figures: kimg0 skipped (no evaluation at kimg 0)")
        return []
    with timer("kimg0: aggregate+render"):
        f = study.final.merge(first, on="cell", how="inner")
        d = f[["loss", "init", "seed", "kimg0", "value", "kimg"]].rename(
            columns={"value": "final", "kimg": "final_kimg"})
        order = {v: i for i, v in enumerate(study.init_order)}
        lorder = {v: i for i, v in enumerate(study.loss_order)}
        d = d.assign(_i=d["init"].map(order), _l=d["loss"].map(lorder)).sort_values(
            ["_i", "_l", "seed"], kind="stable").drop(columns=["_i", "_l"])
        d.insert(0, "metric", study.metric)
        csv = write_csv(d.reset_index(drop=True), out_dir, "kimg0")
        cats = [i for i in study.init_order if i in set(d["init"])]
        losses = [lo for lo in study.loss_order if lo in set(d["loss"])]
        with plt.rc_context(RC):
            # inits down the page (one row each), score across: a column wide for any grid
            fig, ax = plt.subplots(figsize=(3.9, 0.9 + 0.1 * len(cats) * max(2.5, len(losses))))
            width = 0.8 / max(1, len(losses))
            for j, loss in enumerate(losses):
                c = study.palette[loss]
                for i, init in enumerate(cats):
                    g = d[(d["loss"] == loss) & (d["init"] == init)]
                    y = i + (j - (len(losses) - 1) / 2) * width + offsets(len(g), width * 0.6)
                    for yi, a, b in zip(y, g["kimg0"], g["final"]):
                        ax.plot([a, b], [yi, yi], color=c, lw=0.7, alpha=0.6, zorder=1)
                    ax.scatter(g["kimg0"], y, s=11, facecolors="white", edgecolors="#777777",
                               lw=0.9, zorder=2)
                    ax.scatter(g["final"], y, s=13, color=c, zorder=3)
            vals = d["kimg0"].tolist() + d["final"].tolist()
            log = use_log(vals)
            if log:
                ax.set_xscale("log")
                log_ticks(ax.xaxis, *axis_limits(vals, log))
            ax.set_xlim(*axis_limits(vals, log))
            ax.set_yticks(range(len(cats)))
            ax.set_yticklabels([textwrap.fill(study.display(i).replace("\n+", "+")
                                              .replace("\n", " "), 24) for i in cats],
                               fontsize=6.5, linespacing=1.0)
            ax.set_ylim(len(cats) - 0.5, -0.5)
            ax.grid(axis="y", visible=False)
            ax.set_xlabel(_ylabel(study), fontsize=8)
            ax.set_title(f"Each init at kimg 0 and at the end of training\n"
                         f"({_seeds_shown(study).replace('median on top; ', '')})", fontsize=8)
            handles = [Line2D([], [], ls="none", marker="o", mfc="white", mec="#777777")]
            labels = ["kimg 0 (before training)"]
            handles += [Line2D([], [], marker="o", color=study.palette[lo], lw=0.7)
                        for lo in losses]
            labels += [f"final, {lo}" for lo in losses]
            legend_below(fig, handles, labels, ncol=2,
                         title="a line joins one seed's two scores")
            return [csv] + save(fig, out_dir, "kimg0", study.note())
