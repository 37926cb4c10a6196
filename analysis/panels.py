"""Pieces every figure shares: axis labels, what a title says for the seed count at hand, and
the reference lines (teacher Heun-35, data floor) with their labels."""
from __future__ import annotations

import pandas as pd
from matplotlib.lines import Line2D  # noqa: E402  (style selected the Agg backend)

from analysis.data import REFERENCE_ORDER, Study  # noqa: E402
from analysis.protocol import FLOOR
from analysis.style import REFERENCE_STYLE, fmt_num, metric_label


def _ylabel(study: Study, wrap: bool = False) -> str:
    return metric_label(study.metric, study.higher_better, wrap)


def _seeds_shown(study: Study, df: pd.DataFrame | None = None) -> str:
    """'every seed a dot, the median a bar; 3 seeds' for per-seed figures."""
    lo, hi, words = study.seeds_phrase(df)
    if hi <= 1:
        return "single runs: one seed per cell"
    return f"every seed shown, median on top; {words}"


def _ref_handles(study: Study, names=REFERENCE_ORDER):
    out = []
    for name in names:
        val = study.ref(name)
        if val is not None:
            s = REFERENCE_STYLE[name]
            caveat = study.refs.loc[study.refs.name == name, "caveat"]
            caveat = f" ({caveat.iloc[0]})" if len(caveat) and caveat.iloc[0] else ""
            out.append((name, val, Line2D([], [], color=s["color"], linestyle=s["linestyle"],
                                          lw=s.get("lw", 1.2)),
                        f"{s['label']}: {fmt_num(val)}{caveat}"))
    return out


REF_SHORT = {"teacher_heun35": "teacher Heun-35", FLOOR: "data floor"}


def _draw_refs(ax, refs, labels: bool = True):
    """Horizontal reference lines, the data floor drawn over the teacher line in another dash
    pattern; with ``labels`` each value is written at the right end, the upper line's label above
    it and the lower's below, so both stay readable when the values coincide."""
    order = sorted(refs, key=lambda r: r[1])
    for name, val, _, _ in refs:
        st = REFERENCE_STYLE[name]
        ax.axhline(val, color=st["color"], ls=st["linestyle"], lw=st.get("lw", 1.0),
                   zorder=3 if name == FLOOR else 2)
    if not labels:
        return
    for k, (name, val, _, _) in enumerate(order):
        above = k == len(order) - 1 and len(order) > 1 or len(order) == 1
        ax.annotate(f"{REF_SHORT.get(name, name)} {fmt_num(val)}", xy=(1.0, val),
                    xycoords=("axes fraction", "data"), xytext=(-2, 2 if above else -2),
                    textcoords="offset points", ha="right", va="bottom" if above else "top",
                    fontsize=6, color=REFERENCE_STYLE[name]["color"], zorder=4)


def _order_key(study: Study):
    lo = {v: i for i, v in enumerate(study.loss_order)}
    it = {v: i for i, v in enumerate(study.init_order)}
    return lambda s: s.map(lo) if s.name == "loss" else s.map(it) if s.name == "init" else s
