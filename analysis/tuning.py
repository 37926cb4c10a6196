"""The ``tuning`` output and the protocol line of tables and claims (``harness tune``).

``tuning_figure`` draws, per loss family (rows of panels) and searched setting (columns), the
selection metric of every trial against the setting's value: complete trials (every selection
seed at the full budget) filled, trials the scheduler stopped (or that diverged) hollow at their
last evaluated value, the chosen trial as a red star; x is logarithmic for log-scale
distributions (loguniform, qloguniform, lograndint). ``tuning.data.csv`` holds the table.
Everything comes from ``pin.json``'s ``tuned`` entry and the rows with status ``tuning``
(``harness.store.tuning.trial_table``, the same code that selected). No torch, no Ray.
"""
from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd

from analysis.style import (
    RC,
    axis_limits,
    fmt_num,
    legend_below,
    loss_sort_key,
    panel_grid,
    save,
    use_log,
    write_csv,
)
from harness.store.results import load_rows, read_bytes
from harness.store.tuning import SELECTION_RULE, trial_table


def load_tuned(root: str) -> dict | None:
    """``pin.json``'s ``tuned`` entry (None when the study was not tuned)."""
    raw = read_bytes(root, "pin.json")
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    tuned = doc.get("tuned") if isinstance(doc, dict) else None
    return tuned if isinstance(tuned, dict) and tuned.get("families") else None


def protocol_lines(tuned: dict | None) -> list[str]:
    """One markdown paragraph stating the tuning protocol and the choice (empty if untuned)."""
    if not tuned:
        return []
    p = tuned.get("protocol", {})
    fams = {f: tuned["families"][f] for f in sorted(tuned.get("families", {}), key=loss_sort_key)}
    spaces = {f: ", ".join(f"{k} ~ {v}" for k, v in sorted(e.get("space", {}).items()))
              for f, e in fams.items()}
    searched = (f"every loss family's {next(iter(spaces.values()))}"
                if len(set(spaces.values())) == 1 else
                "each loss family's " + "; ".join(f"{f}: {sp}" for f, sp in spaces.items()))
    seeds = p.get("seeds", [])
    chosen = "; ".join(
        f"{f}: " + ", ".join(f"{k} = {fmt_num(v) if isinstance(v, float) else v}"
                             for k, v in e.get("choice", {}).items())
        + f" ({e.get('metric')} {fmt_num(e.get('score', float('nan')))}, best of "
          f"{e.get('candidates')} complete of {e.get('trials')} trials)"
        for f, e in fams.items())
    return [f"**Tuning (`harness tune`):** {searched}, chosen by Ray Tune with the same budget "
            f"for every family: {p.get('trials')} trials per family, "
            f"{p.get('search', 'random search')}; {p.get('kimg')} kimg per trial and selection "
            f"seed; scheduler {p.get('scheduler')}; selection "
            f"seed{'s' if len(seeds) != 1 else ''} {', '.join(map(str, seeds))} (disjoint from "
            f"the study's seeds); metric {p.get('metric')}. Selection: "
            f"{p.get('selection', SELECTION_RULE)}. Chosen: {chosen}. The cells ran with these "
            f"values (they are part of their configs and ids)."]


def tuning_table(rows: pd.DataFrame, tuned: dict) -> pd.DataFrame:
    """One row per (family, trial): the trial's values, score, state and whether it was chosen."""
    out = []
    seeds = tuned.get("protocol", {}).get("seeds", [])
    for fam, e in tuned.get("families", {}).items():
        t = trial_table(rows, e["hash"], seeds, float(e["final_kimg"]))
        for r in t.itertuples(index=False):
            values = json.loads(r.params)
            out.append({"family": fam, "trial": r.trial, **values, "metric": r.metric,
                        "score": r.score, "last_kimg": r.last_kimg, "last_value": r.last_value,
                        "state": r.state, "chosen": r.trial == e.get("trial")})
    return pd.DataFrame(out)


def _bounds(text: str) -> tuple[float, float] | None:
    """The search range of a distribution's text (``loguniform(1e-05, 0.001)``), if a range."""
    m = re.match(r"[a-z]+\(([^,]+),\s*([^,)]+)", str(text))
    return (float(m.group(1)), float(m.group(2))) if m else None


def tuning_figure(root: str, out_dir: str, rows: pd.DataFrame | None = None) -> list[str]:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    tuned = load_tuned(root)
    if tuned is None:
        return []
    if rows is None:
        rows = load_rows(root)
    table = tuning_table(rows, tuned)
    if table.empty:
        print("figures: tuning: pin.json names a tuned choice but no tuning rows were found")
        return []
    fams = sorted(tuned["families"], key=loss_sort_key)  # the study's loss order
    settings = sorted({k for e in tuned["families"].values() for k in e.get("space", {})})
    csv = write_csv(table, out_dir, "tuning")
    shown_values = pd.concat([table["score"], table["last_value"]]).dropna().tolist()
    log_y = use_log(shown_values)  # one metric, one scale for every panel
    ylim = axis_limits(shown_values, log_y)
    with plt.rc_context(RC):
        # one panel per (searched setting, family), three across (a two-column page width)
        ncol = min(3, len(fams) * len(settings))
        fig, axes, _ = panel_grid(len(fams) * len(settings), ncol, w=1.75, h=1.35,
                                  wgap=0.15, hgap=0.7, left=0.7, top=0.65)
        for i, fam in enumerate(fams):
            e = tuned["families"][fam]
            d = table[table["family"] == fam]
            for j, setting in enumerate(settings):
                k = j * len(fams) + i
                ax = axes[k]
                if setting not in e.get("space", {}):
                    ax.set_axis_off()
                    ax.set_title(f"{fam}: {setting} not searched", fontsize=7)
                    continue
                x = d[setting]
                numeric = pd.api.types.is_numeric_dtype(x)
                if not numeric:
                    cats = sorted(x.astype(str).unique())
                    pos = {c: k for k, c in enumerate(cats)}
                    x = x.astype(str).map(pos)
                    ax.set_xticks(range(len(cats)), cats)
                state = d["state"].to_numpy()
                done, stopped = state == "complete", state == "stopped"
                ax.scatter(x[done], d["score"][done], s=16, color="#0173b2", zorder=3,
                           label="full budget: mean final value over the selection seeds")
                ax.scatter(x[stopped], d["last_value"][stopped], s=16, facecolors="none",
                           edgecolors="#888888", zorder=2,
                           label="stopped early by the scheduler: value at its last kimg")
                div = state == "diverged"  # at its last finite value, else on the top edge
                ydiv = d["last_value"].where(np.isfinite(d["last_value"]), ylim[1] / 1.05)
                ax.scatter(x[div], ydiv[div], s=26, marker="x", color="#d62728", zorder=3,
                           label="diverged (non-finite loss)")
                pick = d["chosen"].to_numpy(bool)
                ax.scatter(x[pick], d["score"][pick], s=80, marker="*", color="#d55e00",
                           zorder=4, label="chosen")
                bounds = _bounds(e["space"][setting])
                if numeric and bounds is None and x.nunique() == 1:  # a one-point choice: one tick
                    v = float(x.iloc[0])
                    ax.set_xticks([v], [fmt_num(v)])
                    ax.set_xlim(v - 0.5 * abs(v) - 1e-12, v + 0.5 * abs(v) + 1e-12)
                elif numeric and setting in e.get("log", []):
                    ax.set_xscale("log")
                    ax.xaxis.set_minor_formatter(NullFormatter())
                    if bounds:
                        ax.set_xlim(bounds[0] / 1.25, bounds[1] * 1.25)
                elif numeric and bounds:
                    pad = 0.05 * (bounds[1] - bounds[0])
                    ax.set_xlim(bounds[0] - pad, bounds[1] + pad)
                ax.set_xlabel(setting, fontsize=7)
                ax.tick_params(labelsize=7)
                if log_y:
                    ax.set_yscale("log")
                ax.set_ylim(*ylim)
                if k % ncol == 0:
                    ax.set_ylabel(e.get("metric", "metric") + (" (log scale)" if log_y else ""),
                                  fontsize=7)
                else:
                    ax.tick_params(labelleft=False)
                chosen = e.get("choice", {}).get(setting)
                shown = fmt_num(chosen) if isinstance(chosen, float) else chosen
                ax.set_title(f"{fam}: chose {shown}", fontsize=7.5)
        seen = {}  # every kind of trial drawn in any panel, once
        for ax in axes:
            for h, lb in zip(*ax.get_legend_handles_labels()):
                if len(h.get_offsets()):
                    seen.setdefault(lb, h)
        handles, labels = list(seen.values()), list(seen)
        if handles:
            legend_below(fig, handles, labels, ncol=1)
        p = tuned.get("protocol", {})
        trials = p.get("trials")
        fig.suptitle(f"Tuning: {trials} trial{'' if trials == 1 else 's'} per family, up to "
                     f"{p.get('kimg')} kimg "
                     f"each,\nselection seeds {p.get('seeds')}, scheduler {p.get('scheduler')}",
                     fontsize=8, y=1 - 0.08 / fig.get_size_inches()[1], va="top")
        note = f"Selection: {tuned.get('protocol', {}).get('selection', SELECTION_RULE)}."
        return [csv] + save(fig, out_dir, "tuning", note)


def build(study, out_dir, rng, timer, root=None, rows=None) -> list[str]:
    """The ``tuning`` output of ``analysis.figures.FIGURES``."""
    if root is None:
        return []
    with timer("tuning"):
        return tuning_figure(root, out_dir, rows)
