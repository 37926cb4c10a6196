"""Every figure and table of SPEC §8, regenerated from a results store only.

    make_all(root, out_dir=None, only=None, metric=None, seed=0) -> list of written paths

Outputs (``only`` picks one): heatmap, curves, reset, transplant, samples, table, claims. Each
figure is written as ``<name>.png`` (dpi 150) and ``<name>.pdf`` plus its aggregated data as
``<name>.data.csv`` (floats to 6 significant digits). Figures use one primary quality metric
(``metric``, default: first of fid_inception_*, fd_*, mmd_*); only done, current cells enter;
excluded cells are noted on every figure and listed in table.md / claims.md. No torch, no Ray.
"""
from __future__ import annotations

import math
import os
import time
import zlib
from contextlib import contextmanager

import numpy as np
import pandas as pd

from .style import (KIMG_LABEL, RC, REFERENCE_STYLE, SIGMA_LABEL, display_init, fmt_pm,
                    metric_label, panel_grid, save, use_log, write_csv)

import matplotlib.pyplot as plt  # noqa: E402  (style selected the Agg backend)
from matplotlib.lines import Line2D  # noqa: E402

from .data import Study, load_study, mean_ci, ordered  # noqa: E402

OUTPUTS = ("heatmap", "curves", "reset", "transplant", "samples", "table", "claims")


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


def _ylabel(study: Study) -> str:
    return metric_label(study.metric, study.higher_better)


def _legend_right(where, handles, labels, title=None):
    """Legend outside the data, right of the axes (``where``: an Axes) or figure."""
    x = 1.02 if hasattr(where, "transAxes") else 1.0
    where.legend(handles, labels, loc="center left", bbox_to_anchor=(x, 0.5), frameon=False,
                 title=title, ncol=1 if len(labels) <= 18 else 2)


def _ref_handles(study: Study, names=("teacher_heun35", "data_halves")):
    out = []
    for name in names:
        val = study.ref(name)
        if val is not None:
            s = REFERENCE_STYLE[name]
            out.append((name, val, Line2D([], [], color=s["color"], linestyle=s["linestyle"],
                                          lw=1.2), f"{s['label']}: {fmt_pm(val, math.nan)}"))
    return out


# ------------------------------------------------------------------------------------ heatmap
def heatmap(study: Study, out_dir: str, rng, timer) -> list[str]:
    import seaborn as sns

    from matplotlib.colors import LogNorm

    with timer("heatmap: aggregate"):
        agg = study.final.groupby(["loss", "init"], sort=False)["value"].agg(
            n="count", mean="mean", std="std").reset_index()
        agg = ordered(agg)
        agg.insert(0, "metric", study.metric)
        csv = write_csv(agg, out_dir, "heatmap")
    with timer("heatmap: render"), plt.rc_context(RC):
        mean = agg.pivot(index="loss", columns="init", values="mean").reindex(
            index=study.loss_order, columns=study.init_order)
        std = agg.pivot(index="loss", columns="init", values="std").reindex_like(mean)
        annot = np.vectorize(lambda m, s: "" if not math.isfinite(m) else fmt_pm(m, s),
                             otypes=[object])(mean.to_numpy(float), std.to_numpy(float))
        nr, nc = mean.shape
        cw, ch, left, bottom, top = 1.15, 0.4, 1.1, 0.8, 0.4
        fw, fh = left + cw * nc + 1.4, bottom + ch * nr + top
        fig = plt.figure(figsize=(fw, fh))
        ax = fig.add_axes((left / fw, bottom / fh, cw * nc / fw, ch * nr / fh))
        cax = fig.add_axes(((left + cw * nc + 0.2) / fw, bottom / fh, 0.15 / fw, ch * nr / fh))
        vals = mean.to_numpy(float)
        norm = LogNorm() if use_log(vals[np.isfinite(vals)].tolist()) else None
        cmap = "viridis" if study.higher_better else "viridis_r"
        sns.heatmap(mean, annot=annot, fmt="", cmap=cmap, norm=norm, ax=ax, linewidths=0.5,
                    linecolor="white", annot_kws={"fontsize": 7 if nc > 6 else 8},
                    cbar_ax=cax, cbar_kws={"label": _ylabel(study)})
        ax.set_facecolor("#eeeeee")
        ax.grid(False)
        ax.set_xticklabels([display_init(t.get_text()) for t in ax.get_xticklabels()],
                           rotation=0, fontsize=6.5)
        ax.set_yticklabels(ax.get_yticklabels(), rotation=0)
        ax.set_xlabel("generator initialization")
        ax.set_ylabel("loss")
        ax.set_title(f"Final {study.metric}: mean±std over seeds")
        return [csv] + save(fig, out_dir, "heatmap", study.note())


# ------------------------------------------------------------------------------------ curves
def curves(study: Study, out_dir: str, rng, timer) -> list[str]:
    with timer("curves: aggregate"):
        agg = mean_ci(study.scores, ["loss", "init", "kimg"], rng)
        agg = ordered(agg).sort_values(["loss", "init", "kimg"], kind="stable",
                                       key=_order_key(study)).reset_index(drop=True)
        refs = _ref_handles(study)
        data = pd.concat([agg, pd.DataFrame([{"loss": "reference", "init": n, "mean": v}
                                             for n, v, _, _ in refs])], ignore_index=True)
        data.insert(0, "metric", study.metric)
        csv = write_csv(data, out_dir, "curves")
    with timer("curves: render"), plt.rc_context(RC):
        inits = study.init_order
        ncol = min(4, len(inits))
        fig, axes, (nrow, _) = panel_grid(len(inits), ncol)
        refv = [v for _, v, _, _ in refs]
        band = pd.concat([agg["mean"], agg["ci_low"], agg["ci_high"]]).dropna().tolist() + refv
        log = use_log(band)
        ylim = _limits(band, log)
        x = agg["kimg"].to_numpy(float)
        xlim = (x.min() - 0.02 * np.ptp(x), x.max() + 0.02 * np.ptp(x)) if len(x) else (0, 1)
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
                ax.plot(gx, g["mean"], color=c, lw=1.4, marker="o" if len(gx) <= 12 else None,
                        ms=2.5)
                if g["ci_low"].notna().any():
                    ax.fill_between(gx, g["ci_low"], g["ci_high"], color=c, alpha=0.18, lw=0)
            for name, val, _, _ in refs:
                st = REFERENCE_STYLE[name]
                ax.axhline(val, color=st["color"], ls=st["linestyle"], lw=1)
            ax.set_title(init, fontsize=8)
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
        fig.suptitle(f"{_ylabel(study)} during training: mean and 95% bootstrap CI over seeds",
                     fontsize=9, y=1 - 0.15 / fig.get_size_inches()[1], va="top")
        _legend_right(fig, handles, labels, title="loss")
        return [csv] + save(fig, out_dir, "curves", study.note())


def _limits(values, log: bool) -> tuple[float, float]:
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if not len(v):
        return (0.0, 1.0)
    lo, hi = v.min(), v.max()
    if log:
        return lo / (hi / lo) ** 0.05, hi * (hi / lo) ** 0.05
    pad = 0.05 * (hi - lo) if hi > lo else max(abs(hi), 1.0) * 0.05
    return lo - pad, hi + pad


def _order_key(study: Study):
    lo = {v: i for i, v in enumerate(study.loss_order)}
    it = {v: i for i, v in enumerate(study.init_order)}
    return lambda s: s.map(lo) if s.name == "loss" else s.map(it) if s.name == "init" else s


# ------------------------------------------------------------------------------ points w/ CI
def _points(ax, study: Study, agg: pd.DataFrame, cats: list, x_of=None):
    """Dodged mean points with 95% CI error bars, one colour per loss."""
    losses = [lo for lo in study.loss_order if lo in set(agg["loss"])]
    width = 0.7 / max(1, len(losses))
    for j, loss in enumerate(losses):
        g = agg[agg["loss"] == loss].set_index("init").reindex(cats)
        x = np.arange(len(cats)) + (j - (len(losses) - 1) / 2) * width
        m = g["mean"].to_numpy(float)
        lo = np.nan_to_num(m - g["ci_low"].to_numpy(float))
        hi = np.nan_to_num(g["ci_high"].to_numpy(float) - m)
        ax.errorbar(x, m, yerr=[lo, hi], fmt="o", color=study.palette[loss], ms=4, capsize=2,
                    lw=1.2, label=loss)
    return losses


def reset(study: Study, out_dir: str, rng, timer) -> list[str]:
    f = study.final
    resets = [i for i in study.init_order if i.startswith("reset_layers")]
    if not resets:
        print("figures: reset skipped (no reset_layers cells)")
        return []
    cats = [i for i in ["teacher"] + resets + ["random"] if i in set(f["init"])]
    with timer("reset: aggregate"):
        agg = ordered(mean_ci(f[f["init"].isin(cats)], ["loss", "init"], rng))
        agg.insert(2, "role", np.where(agg["init"].isin(["teacher", "random"]), "reference",
                                       "reset"))
        agg.insert(0, "metric", study.metric)
        csv = write_csv(agg, out_dir, "reset")
    with timer("reset: render"), plt.rc_context(RC):
        fig, ax = plt.subplots(figsize=(1.2 + 1.25 * len(cats), 3.2))
        for i, c in enumerate(cats):
            if c in ("teacher", "random"):
                ax.axvspan(i - 0.45, i + 0.45, color="#000000", alpha=0.05, lw=0)
        losses = _points(ax, study, agg, cats)
        ax.set_xticks(range(len(cats)))
        ax.set_xticklabels([display_init(c) + ("\n(reference)" if c in ("teacher", "random")
                                               else "") for c in cats], fontsize=7)
        ax.set_xlim(-0.6, len(cats) - 0.4)
        ax.grid(axis="x", visible=False)
        ax.set_xlabel("generator initialization (teacher weights with the named groups re-initialized)")
        ax.set_ylabel(_ylabel(study))
        if use_log(agg["mean"].tolist()):
            ax.set_yscale("log")
        ax.set_title(f"Final {study.metric} after resetting layer groups (mean, 95% CI)")
        handles = [Line2D([], [], color=study.palette[lo], marker="o", lw=1.2) for lo in losses]
        _legend_right(ax, handles, losses, title="loss")
        return [csv] + save(fig, out_dir, "reset", study.note())


def transplant(study: Study, out_dir: str, rng, timer) -> list[str]:
    f = study.final
    ft = f[f["init_scheme"] == "feature_transplant"].dropna(subset=["sigma_feat"])
    if ft.empty:
        print("figures: transplant skipped (no feature_transplant cells)")
        return []
    with timer("transplant: aggregate"):
        a = mean_ci(ft, ["loss", "sigma_feat"], rng).assign(role="feature_transplant")
        a["init"] = ft.drop_duplicates("sigma_feat").set_index("sigma_feat")["init"].reindex(
            a["sigma_feat"]).to_numpy()
        r = mean_ci(f[f["init"].isin(["teacher", "random"]) & f["loss"].isin(ft["loss"])],
                    ["loss", "init"], rng)
        r["role"] = r["init"] + " init (reference)"
        agg = ordered(pd.concat([a, r], ignore_index=True))
        agg = agg.sort_values(["loss", "role", "sigma_feat"], kind="stable",
                              key=_order_key(study)).reset_index(drop=True)
        agg = agg[["loss", "role", "init", "sigma_feat", "n", "mean", "std", "ci_low", "ci_high"]]
        agg.insert(0, "metric", study.metric)
        csv = write_csv(agg, out_dir, "transplant")
    with timer("transplant: render"), plt.rc_context(RC):
        fig, ax = plt.subplots(figsize=(5.2, 3.4))
        losses = [lo for lo in study.loss_order if lo in set(a["loss"])]
        for loss in losses:
            c = study.palette[loss]
            g = a[a["loss"] == loss].sort_values("sigma_feat")
            x, m = g["sigma_feat"].to_numpy(float), g["mean"].to_numpy(float)
            ax.plot(x, m, color=c, marker="o", ms=4, lw=1.4)
            ax.fill_between(x, g["ci_low"], g["ci_high"], color=c, alpha=0.18, lw=0)
            for init, ls in (("teacher", "--"), ("random", ":")):
                v = r[(r["loss"] == loss) & (r["init"] == init)]["mean"]
                if len(v):
                    ax.axhline(float(v.iloc[0]), color=c, ls=ls, lw=1.1, alpha=0.9)
        ax.set_xscale("log")
        sig = sorted(a["sigma_feat"].unique())
        ax.set_xticks(sig)
        ax.set_xticklabels([f"{s:g}" for s in sig])
        ax.minorticks_off()
        ax.set_xlabel(SIGMA_LABEL)
        ax.set_ylabel(_ylabel(study))
        if use_log(agg["mean"].tolist()):
            ax.set_yscale("log")
        ax.set_title(f"Final {study.metric} vs transplanted feature noise level (mean, 95% CI)")
        handles = [Line2D([], [], color=study.palette[lo], marker="o", lw=1.4) for lo in losses]
        labels = list(losses)
        handles += [Line2D([], [], color="#444444", ls=ls, lw=1.1) for ls in ("-", "--", ":")]
        labels += ["feature transplant", "teacher init (reference)", "random init (reference)"]
        _legend_right(ax, handles, labels, title="loss / line style")
        return [csv] + save(fig, out_dir, "transplant", study.note())


# -------------------------------------------------------------------------------------- main
def _samples(study, out_dir, rng, timer, root=None):
    from .samples import samples

    return samples(study, out_dir, timer, root)


def _table(study, out_dir, rng, timer):
    from .tables import write_table

    with timer("table: aggregate+write"):
        return write_table(study, out_dir)


def _claims(study, out_dir, rng, timer):
    from .claims import write_claims

    with timer("claims: bootstrap+write"):
        return write_claims(study, out_dir, rng)


BUILDERS = {"heatmap": heatmap, "curves": curves, "reset": reset, "transplant": transplant,
            "samples": _samples, "table": _table, "claims": _claims}


def rng_for(seed: int, name: str) -> np.random.Generator:
    """One independent, deterministic stream per output, so ``only=`` reproduces a full run."""
    return np.random.default_rng([int(seed), zlib.crc32(name.encode())])


def make_all(root: str, out_dir: str | None = None, only: str | None = None,
             metric: str | None = None, seed: int = 0, *, timings: list | None = None,
             rows: pd.DataFrame | None = None) -> list[str]:
    """Write the figures/tables of SPEC §8 for the results under ``root``; return the paths.

    ``only``: one of OUTPUTS. ``metric``: the primary metric (default: first fid_inception_*,
    fd_*, mmd_*). ``seed``: bootstrap seed. ``timings``: list to receive (step, seconds).
    ``rows``: an already loaded ``load_rows(root)`` frame (skips loading).
    """
    if only is not None and only not in OUTPUTS:
        raise ValueError(f"unknown output {only!r}; valid: {', '.join(OUTPUTS)}")
    if out_dir is None:
        if "://" in root:
            out_dir = "figures"
            print(f"figures: results root {root} is remote; writing into ./{out_dir}")
        else:
            out_dir = os.path.join(root, "figures")
    timer = Timer(timings)
    study = load_study(root, metric, rows=rows, timer=timer)
    if study is None:
        return []
    if study.final.empty:
        print(f"figures: no done cells with {study.metric}; nothing to plot")
        return []
    paths = []
    for name in ([only] if only else OUTPUTS):
        kw = {"root": root} if name == "samples" else {}
        paths += BUILDERS[name](study, out_dir, rng_for(seed, name), timer, **kw)
    return paths
