"""Every figure and table of SPEC §8, regenerated from a results store only.

    make_all(root, out_dir=None, only=None, metric=None, seed=0) -> list of written paths

Outputs (``only`` picks one; an unknown name raises ``ConfigError``, a ValueError that lists the
valid names): heatmap, curves, reset, transplant, mapping, samples, table, claims, claims_kimg.
Each figure is written as ``<name>.png`` (dpi 150) and ``<name>.pdf`` plus its aggregated data as
``<name>.data.csv`` (floats to 6 significant digits). Figures use one primary quality metric
(``metric``, default: first of fid_inception_*, fd_*, mmd_*) read under ONE protocol
(``analysis.data.select_protocol``; rows under other protocols are left out and the figure's note
says how many); only done, current cells enter; excluded cells are noted on every figure and
listed in table.md / claims.md. Titles say what is shown for the seed count at hand (with one
seed per cell: single runs, no interval, no ±). No torch, no Ray.
"""
from __future__ import annotations

import math
import os
import time
import zlib
from contextlib import contextmanager

import numpy as np
import pandas as pd

from harness.config import ConfigError

from .style import (KIMG_LABEL, RC, REFERENCE_STYLE, SIGMA_LABEL, fmt_num, fmt_pm, metric_label,
                    panel_grid, save, use_log, write_csv)

import matplotlib.pyplot as plt  # noqa: E402  (style selected the Agg backend)
from matplotlib.lines import Line2D  # noqa: E402

from .data import Study, legacy_reinit, load_study, mean_ci, ordered  # noqa: E402
from .tuning import build as _tuning  # noqa: E402  (harness tune: metric vs hyperparameters)

# OUTPUTS: the keys of BUILDERS (below), in order: a new figure is one function + one entry


class Timer:
    """Collects (step, seconds) pairs; ``timings`` may be a caller's list to append to."""

    def __init__(self, timings: list | None = None):
        self.timings = timings if timings is not None else []

    @contextmanager
    def __call__(self, step: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.timings.append((step, time.perf_counter() - t))


def _ylabel(study: Study, wrap: bool = False) -> str:
    return metric_label(study.metric, study.higher_better, wrap)


def _legend_right(where, handles, labels, title=None):
    """Legend outside the data, right of the axes (``where``: an Axes) or figure."""
    x = 1.02 if hasattr(where, "transAxes") else 1.0
    where.legend(handles, labels, loc="center left", bbox_to_anchor=(x, 0.5), frameon=False,
                 title=title, ncol=1 if len(labels) <= 18 else 2)


def _shown(study: Study, df: pd.DataFrame | None = None, what: str = "mean") -> str:
    """What a point and its interval are, given the seeds per group: 'mean and 95% bootstrap CI
    over 3 seeds', 'single runs (one seed per cell: no interval)', or, with some groups of one
    seed, that those have no interval."""
    lo, hi, words = study.seeds_phrase(df)
    if hi <= 1:
        return "single runs (one seed per cell: no interval)"
    out = f"{what} and 95% bootstrap CI over {words}"
    return out + ("; groups with one seed: no interval" if lo <= 1 else "")


def _ref_handles(study: Study, names=("teacher_heun35", "data_floor", "data_halves")):
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


REF_SHORT = {"teacher_heun35": "teacher Heun-35", "data_floor": "data floor",
             "data_halves": "data floor (legacy)"}


def _draw_refs(ax, refs, labels: bool = True):
    """Horizontal reference lines, the data floor drawn over the teacher line in another dash
    pattern; with ``labels`` each value is written at the right end, the upper line's label above
    it and the lower's below, so both stay readable when the values coincide."""
    order = sorted(refs, key=lambda r: r[1])
    for name, val, _, _ in refs:
        st = REFERENCE_STYLE[name]
        ax.axhline(val, color=st["color"], ls=st["linestyle"], lw=st.get("lw", 1.0),
                   zorder=3 if name in ("data_floor", "data_halves") else 2)
    if not labels:
        return
    for k, (name, val, _, _) in enumerate(order):
        above = k == len(order) - 1 and len(order) > 1 or len(order) == 1
        ax.annotate(f"{REF_SHORT.get(name, name)} {fmt_num(val)}", xy=(1.0, val),
                    xycoords=("axes fraction", "data"), xytext=(-2, 2 if above else -2),
                    textcoords="offset points", ha="right", va="bottom" if above else "top",
                    fontsize=6, color=REFERENCE_STYLE[name]["color"], zorder=4)


# ------------------------------------------------------------------------------------ heatmap
def heatmap(study: Study, out_dir: str, rng, timer) -> list[str]:
    import seaborn as sns

    from matplotlib.colors import LogNorm

    with timer("heatmap: aggregate"):
        agg = study.final.groupby(["loss", "init"], sort=False)["value"].agg(
            n="count", mean="mean", std="std").reset_index()
        agg = ordered(agg, init_order=study.init_order)
        agg.insert(0, "metric", study.metric)
        csv = write_csv(agg, out_dir, "heatmap")
    with timer("heatmap: render"), plt.rc_context(RC):
        mean = agg.pivot(index="loss", columns="init", values="mean").reindex(
            index=study.loss_order, columns=study.init_order)
        std = agg.pivot(index="loss", columns="init", values="std").reindex_like(mean)
        annot = np.vectorize(lambda m, s: "" if not math.isfinite(m) else fmt_pm(m, s),
                             otypes=[object])(mean.to_numpy(float), std.to_numpy(float))
        nr, nc = mean.shape
        # rows at least 0.4 in, and the colour bar (as tall as the rows) at least 1.5 in, so its
        # two-line label always fits beside it
        cw, ch, left, bottom, top = 1.15, max(0.4, 1.5 / max(nr, 1)), 1.1, 0.9, 0.45
        fw, fh = left + cw * nc + 1.2, bottom + ch * nr + top
        fig = plt.figure(figsize=(fw, fh))
        ax = fig.add_axes((left / fw, bottom / fh, cw * nc / fw, ch * nr / fh))
        cax = fig.add_axes(((left + cw * nc + 0.15) / fw, bottom / fh, 0.13 / fw, ch * nr / fh))
        vals = mean.to_numpy(float)
        norm = LogNorm() if use_log(vals[np.isfinite(vals)].tolist()) else None
        cmap = "viridis" if study.higher_better else "viridis_r"
        sns.heatmap(mean, annot=annot, fmt="", cmap=cmap, norm=norm, ax=ax, linewidths=0.5,
                    linecolor="white", annot_kws={"fontsize": 7 if nc > 6 else 8},
                    cbar_ax=cax, cbar_kws={"label": _ylabel(study, wrap=True)})
        ax.set_facecolor("#eeeeee")
        ax.grid(False)
        ax.set_xticklabels([study.display(t.get_text()) for t in ax.get_xticklabels()],
                           rotation=0, fontsize=6.5)
        ax.set_yticklabels(ax.get_yticklabels(), rotation=0)
        ax.set_xlabel("generator initialization")
        ax.set_ylabel("loss")
        lo, hi, words = study.seeds_phrase()
        if hi <= 1:
            title = f"Final {study.metric}: one seed per cell (single runs, no ±)"
        else:
            title = f"Final {study.metric}: mean±std over {words}"
            if lo <= 1:
                title += " (one-seed cells: mean only)"
        ax.set_title(title)
        return [csv] + save(fig, out_dir, "heatmap", study.note())


# ------------------------------------------------------------------------------------ curves
def curves(study: Study, out_dir: str, rng, timer) -> list[str]:
    with timer("curves: aggregate"):
        agg = mean_ci(study.scores, ["loss", "init", "kimg"], rng)
        agg = ordered(agg, init_order=study.init_order).sort_values(
            ["loss", "init", "kimg"], kind="stable", key=_order_key(study)).reset_index(drop=True)
        refs = _ref_handles(study)
        data = pd.concat([agg, pd.DataFrame([{"loss": "reference", "init": n, "mean": v}
                                             for n, v, _, _ in refs])], ignore_index=True)
        data.insert(0, "metric", study.metric)
        csv = write_csv(data, out_dir, "curves")
    with timer("curves: render"), plt.rc_context(RC):
        inits = study.init_order
        ncol = min(4, len(inits))
        titles = [study.display(i) for i in inits]
        lines = max(t.count("\n") + 1 for t in titles)
        fig, axes, (nrow, _) = panel_grid(len(inits), ncol, top=0.45 + 0.11 * lines,
                                          hgap=0.3 + 0.11 * lines)
        refv = [v for _, v, _, _ in refs]
        band = pd.concat([agg["mean"], agg["ci_low"], agg["ci_high"]]).dropna().tolist() + refv
        log = use_log(band)
        # room under the lowest reference line for its value label
        ylim = _limits(band, log, bottom=0.14 if len(refs) > 1 else 0.05)
        x = agg["kimg"].to_numpy(float)
        xlim = (x.min() - 0.02 * np.ptp(x), x.max() + 0.02 * np.ptp(x)) if len(x) else (0, 1)
        kimgs = np.unique(x)
        for k, (ax, init) in enumerate(zip(axes, inits)):
            ax.set_autoscale_on(False)
            if log:
                ax.set_yscale("log")
            ax.set_xlim(*xlim)
            ax.set_ylim(*ylim)
            sub = agg[agg["init"] == init]
            for loss, g in sub.groupby("loss", sort=False):
                c = study.palette[loss]
                gx = g["kimg"].to_numpy(float)
                ax.plot(gx, g["mean"], color=c, lw=1.3, marker="o", ms=2.2 if len(kimgs) > 12
                        else 2.8)  # a marker at every evaluated kimg
                if g["ci_low"].notna().any():
                    ax.fill_between(gx, g["ci_low"], g["ci_high"], color=c, alpha=0.18, lw=0)
            _draw_refs(ax, refs, labels=k % ncol == ncol - 1 or k == len(inits) - 1)
            ax.set_title(titles[k], fontsize=7.5)
            if k % ncol == 0:
                ax.set_ylabel(study.metric + (" (log scale)" if log else ""))
            else:
                ax.tick_params(labelleft=False)
            if k + ncol < len(inits):  # another panel below: x tick labels there
                ax.tick_params(labelbottom=False)
            else:
                ax.set_xlabel(KIMG_LABEL)
        handles = [Line2D([], [], color=study.palette[lo], lw=2) for lo in study.loss_order]
        labels = list(study.loss_order)
        handles += [h for _, _, h, _ in refs]
        labels += [lb for _, _, _, lb in refs]
        fig.suptitle(f"{_ylabel(study)} during training, every evaluated kimg: "
                     f"{_shown(study)}", fontsize=9, y=1 - 0.15 / fig.get_size_inches()[1],
                     va="top")
        _legend_right(fig, handles, labels, title="loss")
        return [csv] + save(fig, out_dir, "curves", study.note())


def _limits(values, log: bool, bottom: float = 0.05) -> tuple[float, float]:
    """Axis limits around ``values``: 5% of the range above, ``bottom`` of it below."""
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if log:
        v = v[v > 0]
    if not len(v):
        return (0.0, 1.0)
    lo, hi = v.min(), v.max()
    if log:
        return lo / (hi / lo) ** bottom, hi * (hi / lo) ** 0.05
    span = (hi - lo) if hi > lo else max(abs(hi), 1.0)
    return lo - bottom * span, hi + 0.05 * span


def _order_key(study: Study):
    lo = {v: i for i, v in enumerate(study.loss_order)}
    it = {v: i for i, v in enumerate(study.init_order)}
    return lambda s: s.map(lo) if s.name == "loss" else s.map(it) if s.name == "init" else s


# ------------------------------------------------------------------------------ points w/ CI
def _marker(study: Study, init: str) -> tuple[str, bool]:
    """(marker, filled): matched re-init filled circles, fresh hollow circles, legacy re-init
    crosses; everything else filled circles."""
    info = study.info(init)
    if legacy_reinit(info):
        return "X", True
    if info.get("reinit") == "fresh" and (info.get("init_scheme") == "reset_layers"
                                          or info.get("reset_output")):
        return "o", False
    return "o", True


def _points(ax, study: Study, agg: pd.DataFrame, cats: list):
    """Dodged mean points with 95% CI error bars, one colour per loss; the marker tells the
    re-init (see ``_marker``)."""
    losses = [lo for lo in study.loss_order if lo in set(agg["loss"])]
    width = 0.7 / max(1, len(losses))
    for j, loss in enumerate(losses):
        g = agg[agg["loss"] == loss].set_index("init").reindex(cats)
        x = np.arange(len(cats)) + (j - (len(losses) - 1) / 2) * width
        m = g["mean"].to_numpy(float)
        lo = np.nan_to_num(m - g["ci_low"].to_numpy(float))
        hi = np.nan_to_num(g["ci_high"].to_numpy(float) - m)
        c = study.palette[loss]
        ax.errorbar(x, m, yerr=[lo, hi], fmt="none", ecolor=c, capsize=2, lw=1.1)
        for xi, mi, cat in zip(x, m, cats):
            if not math.isfinite(mi):
                continue
            mk, filled = _marker(study, cat)
            ax.plot([xi], [mi], marker=mk, ms=4.5, color=c, mfc=c if filled else "white",
                    mew=1.2, ls="none")
    return losses


def _ref_span(ax, cats, refs=("teacher", "random")):
    for i, c in enumerate(cats):
        if c in refs:
            ax.axvspan(i - 0.45, i + 0.45, color="#000000", alpha=0.05, lw=0)


def _marker_legend(study: Study, cats) -> tuple[list, list]:
    kinds = {}
    for c in cats:
        info = study.info(c)
        if legacy_reinit(info):
            kinds["legacy"] = (Line2D([], [], color="#444444", marker="X", ls="none"),
                               "legacy re-init (stored before reinit existed)")
        elif info.get("reinit") == "fresh" and (info.get("init_scheme") == "reset_layers"
                                                or info.get("reset_output")):
            kinds["fresh"] = (Line2D([], [], color="#444444", marker="o", mfc="white",
                                     ls="none"), "reinit: fresh (architecture's own init)")
        elif info.get("reinit") == "matched":
            kinds["matched"] = (Line2D([], [], color="#444444", marker="o", ls="none"),
                                "reinit: matched (RMS of the teacher's tensor)")
    order = [k for k in ("matched", "fresh", "legacy") if k in kinds]
    return [kinds[k][0] for k in order], [kinds[k][1] for k in order]


def _category_figure(study: Study, out_dir: str, rng, timer, name: str, cats: list, roles: dict,
                     xlabel: str, title: str, kimg0: bool = False,
                     ref_lines: bool = False) -> list[str]:
    """Final score per init category (dodged by loss, mean and CI over seeds), with optional
    grey crosses at kimg 0 and the teacher Heun / data floor lines."""
    f = study.final
    with timer(f"{name}: aggregate"):
        agg = mean_ci(f[f["init"].isin(cats)], ["loss", "init"], rng)
        agg.insert(2, "stage", "final")
        if kimg0:
            s0 = study.scores[(study.scores["kimg"] == 0) & study.scores["init"].isin(cats)]
            a0 = mean_ci(s0.assign(loss="all losses"), ["loss", "init"], rng)
            a0.insert(2, "stage", "kimg 0")
            agg = pd.concat([agg, a0], ignore_index=True)
        agg = ordered(agg, init_order=cats)
        role = {i: roles.get(i) or str(study.info(i).get("init_scheme") or "") for i in cats}
        agg.insert(2, "role", agg["init"].map(role).fillna("").str.replace("\n", " "))
        refs = _ref_handles(study) if ref_lines else []
        if refs:
            agg = pd.concat([agg, pd.DataFrame([{"loss": "reference", "init": n, "mean": v}
                                                for n, v, _, _ in refs])], ignore_index=True)
        agg.insert(0, "metric", study.metric)
        csv = write_csv(agg, out_dir, name)
    with timer(f"{name}: render"), plt.rc_context(RC):
        fin = agg[agg["stage"] == "final"]
        fig, ax = plt.subplots(figsize=(1.4 + 1.25 * len(cats), 3.3))
        _ref_span(ax, cats)
        losses = _points(ax, study, fin, cats)
        handles = [Line2D([], [], color=study.palette[lo], marker="o", lw=1.1) for lo in losses]
        labels = list(losses)
        vals = fin["mean"].tolist() + fin["ci_low"].dropna().tolist()
        if kimg0:
            z = agg[agg["stage"] == "kimg 0"].set_index("init").reindex(cats)
            ax.plot(np.arange(len(cats)), z["mean"].to_numpy(float), ls="none", marker="x",
                    ms=6, color="#555555", mew=1.2, zorder=4)
            handles.append(Line2D([], [], ls="none", marker="x", color="#555555", mew=1.2))
            labels.append("at kimg 0 (the init itself, mean over cells)")
            vals += z["mean"].dropna().tolist()
        if ref_lines:
            _draw_refs(ax, refs)
            handles += [h for _, _, h, _ in refs]
            labels += [lb for _, _, _, lb in refs]
            vals += [v for _, v, _, _ in refs]
        mh, ml = _marker_legend(study, cats)
        handles += mh
        labels += ml
        ax.set_xticks(range(len(cats)))
        ax.set_xticklabels([study.display(c) + (f"\n({roles[c]})" if roles.get(c) else "")
                            for c in cats], fontsize=6.5)
        ax.set_xlim(-0.6, len(cats) - 0.4)
        ax.grid(axis="x", visible=False)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(_ylabel(study))
        log = use_log(vals)
        if log:
            ax.set_yscale("log")
        ax.set_ylim(*_limits(vals + fin["ci_high"].dropna().tolist(), log,
                             bottom=0.14 if ref_lines else 0.05))
        ax.set_title(f"{title}\n({_shown(study, f[f['init'].isin(cats)])})", fontsize=8.5)
        _legend_right(ax, handles, labels, title="loss / marker")
        return [csv] + save(fig, out_dir, name, study.note())


def reset(study: Study, out_dir: str, rng, timer) -> list[str]:
    resets = study.inits_where(init_scheme="reset_layers")
    if not resets:
        print("figures: reset skipped (no reset_layers cells)")
        return []
    have = set(study.final["init"])
    teacher = study.inits_where(init_scheme="teacher", init_source=None)
    random_ = study.inits_where(init_scheme="random")
    cats = [i for i in teacher + resets + random_ if i in have]
    roles = {i: "reference" for i in teacher + random_}
    return _category_figure(
        study, out_dir, rng, timer, "reset", cats, roles,
        "generator initialization: teacher weights with the named groups re-initialized\n"
        "(matched: fresh init rescaled to the teacher tensor's RMS; fresh: the architecture's "
        "own init)",
        f"Final {study.metric} after resetting layer groups")


def mapping(study: Study, out_dir: str, rng, timer) -> list[str]:
    """'Mapping vs features': teacher, random, reset[output] matched and fresh (features without
    the mapping), mapping_match (the mapping without the features), band-limited teachers
    (features of one noise band), per loss, with the teacher Heun and data-floor lines."""
    mm = study.inits_where(init_scheme="mapping_match")
    bands = [i for i in study.inits_where(init_scheme="teacher")
             if study.info(i).get("init_source") is not None]
    if not mm and not bands:
        print("figures: mapping skipped (no mapping_match or band-limited teacher cells)")
        return []
    teacher = study.inits_where(init_scheme="teacher", init_source=None)
    random_ = study.inits_where(init_scheme="random")
    out = [i for i in study.inits_where(init_scheme="reset_layers", reset_groups="output")
           if not legacy_reinit(study.info(i))]
    have = set(study.final["init"])
    cats = [i for i in teacher + out + bands + mm + random_ if i in have]
    roles = {**{i: "reference" for i in teacher + random_},
             **{i: "features,\nno mapping" for i in out},
             **{i: "one band's\nfeatures" for i in bands},
             **{i: "mapping,\nno features" for i in mm}}
    return _category_figure(
        study, out_dir, rng, timer, "mapping", cats, roles, "generator initialization",
        f"Mapping vs features: final {study.metric}", kimg0=True, ref_lines=True)


def transplant(study: Study, out_dir: str, rng, timer) -> list[str]:
    f = study.final
    ft = f[f["init_scheme"] == "feature_transplant"].dropna(subset=["sigma_feat"])
    if ft.empty:
        print("figures: transplant skipped (no feature_transplant cells)")
        return []
    with timer("transplant: aggregate"):
        variant = {i: _transplant_variant(study.info(i)) for i in ft["init"].unique()}
        ft = ft.assign(variant=ft["init"].map(variant))
        a = mean_ci(ft, ["loss", "variant", "sigma_feat"], rng)
        a["role"] = "feature_transplant"
        first = ft.drop_duplicates(["variant", "sigma_feat"]).set_index(["variant", "sigma_feat"])
        a["init"] = first["init"].reindex(pd.MultiIndex.from_frame(
            a[["variant", "sigma_feat"]])).to_numpy()
        teacher = study.inits_where(init_scheme="teacher", init_source=None)
        random_ = study.inits_where(init_scheme="random")
        r = mean_ci(f[f["init"].isin(teacher + random_) & f["loss"].isin(ft["loss"])],
                    ["loss", "init"], rng)
        r["role"] = r["init"] + " init (reference)"
        agg = ordered(pd.concat([a, r], ignore_index=True), init_order=study.init_order)
        vorder = {v: i for i, v in enumerate(TRANSPLANT_VARIANTS)}
        agg = agg.assign(_v=agg["variant"].map(vorder)).sort_values(
            ["loss", "role", "_v", "sigma_feat"], kind="stable",
            key=_order_key(study)).drop(columns="_v").reset_index(drop=True)
        agg = agg[["loss", "role", "variant", "init", "sigma_feat", "n", "mean", "std", "ci_low",
                   "ci_high"]]
        agg.insert(0, "metric", study.metric)
        csv = write_csv(agg, out_dir, "transplant")
    with timer("transplant: render"), plt.rc_context(RC):
        fig, ax = plt.subplots(figsize=(5.4, 3.5))
        losses = [lo for lo in study.loss_order if lo in set(a["loss"])]
        variants = [v for v in TRANSPLANT_VARIANTS if v in set(a["variant"])]
        for loss in losses:
            c = study.palette[loss]
            for v in variants:
                g = a[(a["loss"] == loss) & (a["variant"] == v)].sort_values("sigma_feat")
                if g.empty:
                    continue
                ls, mk, filled = TRANSPLANT_STYLE[v]
                x, m = g["sigma_feat"].to_numpy(float), g["mean"].to_numpy(float)
                ax.plot(x, m, color=c, marker=mk, ms=4, lw=1.3, ls=ls,
                        mfc=c if filled else "white", mew=1.1)
                if g["ci_low"].notna().any():
                    ax.fill_between(x, g["ci_low"], g["ci_high"], color=c, alpha=0.15, lw=0)
            for init, ls in (("teacher", (0, (5, 3))), ("random", (0, (1, 2)))):
                v = r[(r["loss"] == loss) & r["init"].isin(teacher if init == "teacher"
                                                            else random_)]["mean"]
                if len(v):
                    ax.axhline(float(v.iloc[0]), color=c, ls=ls, lw=1.0, alpha=0.8)
        ax.set_xscale("log")
        sig = sorted(a["sigma_feat"].unique())
        ax.set_xticks(sig)
        ax.set_xticklabels([f"{s:g}" for s in sig])
        ax.minorticks_off()
        ax.set_xlabel(SIGMA_LABEL)
        ax.set_ylabel(_ylabel(study))
        if use_log(agg["mean"].tolist()):
            ax.set_yscale("log")
        ax.set_title(f"Final {study.metric} vs transplanted feature noise level\n"
                     f"({_shown(study, ft)})", fontsize=8.5)
        handles = [Line2D([], [], color=study.palette[lo], marker="o", lw=1.3) for lo in losses]
        labels = list(losses)
        for v in variants:
            ls, mk, filled = TRANSPLANT_STYLE[v]
            handles.append(Line2D([], [], color="#444444", ls=ls, marker=mk, lw=1.2,
                                  mfc="#444444" if filled else "white"))
            labels.append(TRANSPLANT_WORDS[v])
        handles += [Line2D([], [], color="#444444", ls=ls, lw=1.0)
                    for ls in ((0, (5, 3)), (0, (1, 2)))]
        labels += ["teacher init (reference)", "random init (reference)"]
        _legend_right(ax, handles, labels, title="loss / line style")
        return [csv] + save(fig, out_dir, "transplant", study.note())


TRANSPLANT_VARIANTS = ("features", "reset_output matched", "reset_output fresh", "legacy")
TRANSPLANT_STYLE = {"features": ("-", "o", True), "reset_output matched": ("-.", "s", False),
                    "reset_output fresh": ((0, (3, 1, 1, 1, 1, 1)), "^", False),
                    "legacy": ("-", "X", True)}
TRANSPLANT_WORDS = {"features": "transplant: all teacher weights kept",
                    "reset_output matched": "transplant + output reset (matched)",
                    "reset_output fresh": "transplant + output reset (fresh)",
                    "legacy": "transplant, legacy re-init"}


def _transplant_variant(info: dict) -> str:
    if legacy_reinit(info):
        return "legacy"
    if not info.get("reset_output"):
        return "features"
    return "reset_output fresh" if info.get("reinit") == "fresh" else "reset_output matched"


# -------------------------------------------------------------------------------------- main
def _samples(study, out_dir, rng, timer, root=None):
    from .samples import samples

    return samples(study, out_dir, timer, root)


def _table(study, out_dir, rng, timer):
    from .tables import write_table

    with timer("table: aggregate+write"):
        return write_table(study, out_dir)


def _claims(study, out_dir, rng, timer, c1_pair=None, rows=None):
    from .claims_report import write_claims

    with timer("claims: bootstrap+write"):
        return write_claims(study, out_dir, rng, pair=c1_pair, rows=rows)


def _verifier(study, out_dir, rng, timer, rows=None):
    from .verifier import verifier_figure

    with timer("verifier"):
        return verifier_figure(rows, out_dir, metric=study.metric, rng=rng,
                               cells=set(study.final.cell))


def _claims_kimg(study, out_dir, rng, timer, c1_pair=None):
    from .claims_report import write_claims_kimg

    with timer("claims_kimg: bootstrap per kimg+write"):
        return write_claims_kimg(study, out_dir, rng, pair=c1_pair)


BUILDERS = {"heatmap": heatmap, "curves": curves, "reset": reset, "transplant": transplant,
            "mapping": mapping, "samples": _samples, "table": _table, "claims": _claims,
            "claims_kimg": _claims_kimg, "verifier": _verifier, "tuning": _tuning}
OUTPUTS = tuple(BUILDERS)


def rng_for(seed: int, name: str) -> np.random.Generator:
    """One independent, deterministic stream per output, so ``only=`` reproduces a full run."""
    return np.random.default_rng([int(seed), zlib.crc32(name.encode())])


def make_all(root: str, out_dir: str | None = None, only: str | None = None,
             metric: str | None = None, seed: int = 0, *, timings: list | None = None,
             rows: pd.DataFrame | None = None,
             c1_pair: tuple[str, str] | None = None) -> list[str]:
    """Write the figures/tables of SPEC §8 for the results under ``root``; return the paths.

    ``only``: one of OUTPUTS (anything else raises ``harness.config.ConfigError``, a ValueError
    naming the valid outputs, which the CLI reports with exit code 2). ``metric``: the primary
    metric (default: first fid_inception_*, fd_*, mmd_*). ``seed``: bootstrap seed.
    ``timings``: list to receive (step, seconds). ``rows``: an already loaded
    ``load_rows(root)`` frame (skips loading). ``c1_pair``: C1's declared (score-free,
    teacher-score) pair of loss labels when the study declares one (default
    ``analysis.claims.C1_PAIR``); a pair missing from the results leaves C1 not tested, saying why.
    """
    if c1_pair is not None and (len(c1_pair) != 2 or not all(isinstance(x, str) for x in c1_pair)):
        raise ConfigError("c1_pair", f"expected two loss labels (score-free, teacher-score), "
                                     f"got {c1_pair!r}")
    if only is not None and only not in OUTPUTS:
        raise ConfigError("only", f"unknown output {only!r}; valid outputs: "
                                  f"{', '.join(OUTPUTS)}")
    if out_dir is None:
        if "://" in root:
            out_dir = "figures"
            print(f"figures: results root {root} is remote; writing into ./{out_dir}")
        else:
            out_dir = os.path.join(root, "figures")
    timer = Timer(timings)
    if rows is None:
        from harness.results import load_rows

        rows = load_rows(root)
    if only == "tuning":  # right after `harness tune`: no done cell needed
        return _tuning(None, out_dir, rng_for(seed, only), timer, root=root, rows=rows)
    study = load_study(root, metric, rows=rows, timer=timer)
    if study is None:
        return []
    if study.final.empty:
        print(f"figures: no done cells with {study.metric}; nothing to plot")
        return []
    paths = []
    for name in ([only] if only else OUTPUTS):
        kw = ({"root": root} if name == "samples" else
              {"c1_pair": c1_pair, "rows": rows} if name == "claims" else
              {"c1_pair": c1_pair} if name == "claims_kimg" else
              {"rows": rows} if name == "verifier" else
              {"root": root, "rows": rows} if name == "tuning" else {})
        # claims_kimg draws from the claims stream: its last kimg reproduces claims.md
        stream = "claims" if name == "claims_kimg" else name
        paths += BUILDERS[name](study, out_dir, rng_for(seed, stream), timer, **kw)
    return paths
