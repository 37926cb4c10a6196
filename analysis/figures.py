"""Every figure and table of a study, regenerated from a results store only.

    make_all(root, out_dir=None, only=None, metric=None, seed=0) -> list of written paths

Outputs (``only`` picks one; an unknown name raises ``ConfigError``, a ValueError that lists the
valid names): the names registered in ``FIGURES``, in order: heatmap and curves here, reset, mapping and transplant in
``analysis.init_figures``, forest (every claim against its threshold) and kimg0 in
``analysis.overview_figures``, samples, table, claims, claims_kimg, verifier and tuning in their own
modules; the pieces every figure shares are ``analysis.panels``. A new figure (a plug-in too)
is one function ``(study, out_dir, rng, timer) -> paths`` decorated with ``register_figure``.
Each figure is written as ``<name>.png`` (dpi 150) and ``<name>.pdf`` plus its aggregated data as
``<name>.data.csv`` (floats to 6 significant digits). Figures use one primary quality metric
(``metric``, default: first of fid_inception_*, fd_*, mmd_*) read under ONE protocol
(``analysis.protocol.select_protocol``; rows under other protocols are left out and the figure's note
says how many); only done, current cells enter; excluded cells are noted on every figure and
listed in table.md / claims.md. Titles say what is shown for the seed count at hand (with one
seed per cell: single runs, no interval, no ±). No torch, no Ray.
"""
from __future__ import annotations

import math
import os
import textwrap
import time
import zlib
from contextlib import contextmanager

import matplotlib.pyplot as plt  # noqa: E402  (style selected the Agg backend)
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patheffects import withStroke  # noqa: E402

from analysis.claims_report import write_claims, write_claims_kimg
from analysis.data import Study, load_study, ordered  # noqa: E402
from analysis.init_figures import mapping, reset, transplant  # noqa: E402
from analysis.overview_figures import forest, kimg0  # noqa: E402
from analysis.panels import _draw_refs, _order_key, _ref_handles, _seeds_shown, _ylabel  # noqa: E402
from analysis.samples import samples
from analysis.seeds import seed_summary, seeds_text
from analysis.style import (
    KIMG_LABEL,
    RC,
    axis_limits,
    fmt_num,
    log_ticks,
    panel_grid,
    save,
    use_log,
    write_csv,
)
from analysis.tables import write_table
from analysis.tuning import build as _tuning  # noqa: E402  (harness tune: metric vs hyperparameters)
from analysis.verifier import verifier_figure
from harness.base.safefs import prepare_output
from harness.base.registry import Registry
from harness.declare.claims_spec import ClaimsSpec
from harness.declare.config import ConfigError
from harness.store.results import load_rows



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


# ------------------------------------------------------------------------------------ heatmap
def heatmap(study: Study, out_dir: str, rng, timer) -> list[str]:
    """Final score per init (rows) x loss (columns): the median over seeds as the colour and the
    large number, every seed's value in small type under it (no mean ± std: groups can be
    bimodal). Inits run down the page so the figure stays a paper column wide."""
    import seaborn as sns
    from matplotlib.colors import LogNorm

    with timer("heatmap: aggregate"):
        agg = ordered(seed_summary(study.final, ["loss", "init"]), init_order=study.init_order)
        agg.insert(0, "metric", study.metric)
        csv = write_csv(agg, out_dir, "heatmap")
    with timer("heatmap: render"), plt.rc_context(RC):
        med = agg.pivot(index="init", columns="loss", values="median").reindex(
            index=study.init_order, columns=study.loss_order)
        seeds = agg.pivot(index="init", columns="loss", values="values").reindex_like(med)
        nr, nc = med.shape
        multi = study.seeds_phrase()[1] > 1
        # cells as wide as a two-column page allows (7 in), at most 0.9 in: each seed's value fits
        cw, ch, left, bottom, top = min(0.9, 4.4 / max(nc, 1)), 0.3, 1.6, 0.3, 0.75
        # each seed's value in small type under the median, as many to a line as fit the cell
        per_line = max(2, int(cw * 72 / (6.2 * 0.55 * 6)))  # ~6 characters a value at 6.2 pt
        n_max = int(agg["n"].max()) if len(agg) else 1
        seed_lines = math.ceil(n_max / per_line) if multi else 0
        ch += 0.11 * seed_lines
        ch = max(ch, 1.5 / max(nr, 1))  # the colour bar (as tall as the rows) fits its label
        top += 0.12 * max(_column_label(lo).count("\n") for lo in study.loss_order)
        fw, fh = left + cw * nc + 1.0, bottom + ch * nr + top
        fig = plt.figure(figsize=(fw, fh))
        ax = fig.add_axes((left / fw, bottom / fh, cw * nc / fw, ch * nr / fh))
        cax = fig.add_axes(((left + cw * nc + 0.12) / fw, bottom / fh, 0.12 / fw,
                            ch * nr / fh))
        vals = med.to_numpy(float)
        norm = LogNorm() if use_log(vals[np.isfinite(vals)].tolist()) else None
        cmap = "viridis" if study.higher_better else "viridis_r"
        sns.heatmap(med, annot=False, cmap=cmap, norm=norm, ax=ax, linewidths=0.5,
                    linecolor="white", cbar_ax=cax,
                    cbar_kws={"label": _ylabel(study, wrap=True)})
        if norm is not None:  # plain numbers (2, 5, 10, ...) on the colour bar, not 10^1
            log_ticks(cax.yaxis, float(np.nanmin(vals)), float(np.nanmax(vals)))
        mapper = ax.collections[0]
        for i in range(nr):
            for j in range(nc):
                m = vals[i, j]
                if not math.isfinite(m):
                    continue
                r, g, b, _ = mapper.cmap(mapper.norm(m))
                ink = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
                top_in = 0.16 if multi else ch / 2  # the median's centre, inches below the top
                ax.text(j + 0.5, i + top_in / ch, fmt_num(m), ha="center",
                        va="center", fontsize=8, color=ink, fontweight="bold")
                if multi and isinstance(seeds.iat[i, j], str) and ";" in seeds.iat[i, j]:
                    each = seeds_text(seeds.iat[i, j], ";").split(";")
                    text = "\n".join(" · ".join(each[k:k + per_line])
                                     for k in range(0, len(each), per_line))
                    ax.text(j + 0.5, i + (0.29 + ch) / 2 / ch, text, ha="center", va="center",
                            fontsize=6.2, color=ink, linespacing=1.1)
        ax.set_facecolor("#eeeeee")
        ax.grid(False)
        ax.set_yticklabels([textwrap.fill(study.display(t.get_text()).replace("\n+", "+")
                                          .replace("\n", " "), 26)
                            for t in ax.get_yticklabels()], rotation=0, fontsize=6.5)
        ax.set_xticklabels([_column_label(t.get_text()) for t in ax.get_xticklabels()],
                           rotation=0, fontsize=7)
        ax.xaxis.tick_top()
        ax.xaxis.set_label_position("top")
        ax.set_xlabel("")
        ax.set_ylabel("")
        lo, hi, words = study.seeds_phrase()
        if hi <= 1:
            title = f"Final {study.metric}, one seed per cell"
        else:
            title = f"Final {study.metric}: median (large)\nand each seed (small), {words}"
        fig.suptitle(title, fontsize=8.5, x=(left + cw * nc / 2) / fw,
                     y=1 - 0.02 / fh, va="top")
        return [csv] + save(fig, out_dir, "heatmap", study.note())


def _column_label(label: str) -> str:
    """A loss label fitted to a heatmap column: extra-axis values on their own lines."""
    if len(label) <= 12:
        return label
    return label.replace(" (", "\n(").replace(", ", ",\n").replace("=", "=\n")


# ------------------------------------------------------------------------------------ curves
def curves(study: Study, out_dir: str, rng, timer) -> list[str]:
    """Score vs kimg, one panel per init: a thin line per seed and the median over seeds on top
    (no band: with 2-3 seeds a band hides which runs succeeded)."""
    with timer("curves: aggregate"):
        agg = seed_summary(study.scores, ["loss", "init", "kimg"])
        agg = ordered(agg, init_order=study.init_order).sort_values(
            ["loss", "init", "kimg"], kind="stable", key=_order_key(study)).reset_index(drop=True)
        refs = _ref_handles(study)
        data = pd.concat([agg, pd.DataFrame([{"loss": "reference", "init": n, "median": v,
                                             "mean": v}
                                             for n, v, _, _ in refs])], ignore_index=True)
        data.insert(0, "metric", study.metric)
        csv = write_csv(data, out_dir, "curves")
    with timer("curves: render"), plt.rc_context(RC):
        inits = study.init_order
        ncol = min(3, len(inits))  # three panels across and the legend below: a page wide
        titles = [study.display(i).replace("\n+", "+") for i in inits]
        lines = max(t.count("\n") + 1 for t in titles)
        w = {1: 3.2, 2: 2.6}.get(ncol, 1.75)  # four panels across fit a two-column page width
        fig, axes, (nrow, _) = panel_grid(len(inits), ncol, w=w, h=w * 0.75,
                                          top=0.6 + 0.11 * lines, hgap=0.3 + 0.11 * lines,
                                          left=0.6)
        refv = [v for _, v, _, _ in refs]
        vals = study.scores["value"].dropna().tolist() + refv
        log = use_log(vals)
        ylim = axis_limits(vals, log)
        x = agg["kimg"].to_numpy(float)
        xlim = (x.min() - 0.02 * np.ptp(x), x.max() + 0.02 * np.ptp(x)) if len(x) else (0, 1)
        multi = study.seeds_phrase()[1] > 1
        for k, (ax, init) in enumerate(zip(axes, inits)):
            ax.set_autoscale_on(False)
            if log:
                ax.set_yscale("log")
                log_ticks(ax.yaxis, *ylim)
            ax.set_xlim(*xlim)
            ax.set_ylim(*ylim)
            sub = study.scores[study.scores["init"] == init]
            for loss in study.loss_order:
                c = study.palette[loss]
                g = sub[sub["loss"] == loss]
                if g.empty:
                    continue
                for _, run in g.groupby("seed", sort=True):
                    ax.plot(run["kimg"], run["value"], color=c, lw=0.7 if multi else 1.3,
                            alpha=0.55 if multi else 1.0)
                if multi:
                    m = agg[(agg["init"] == init) & (agg["loss"] == loss)]
                    ax.plot(m["kimg"], m["median"], color=c, lw=1.8, marker="o", ms=2.2,
                            path_effects=[withStroke(linewidth=3, foreground="white")])
            _draw_refs(ax, refs, labels=False)  # values in the legend: no label on a curve
            ax.set_title(titles[k], fontsize=7)
            if k % ncol == 0:
                ax.set_ylabel(study.metric + (" (log)" if log else ""), fontsize=7.5)
            else:
                ax.tick_params(labelleft=False)
            if k + ncol < len(inits):  # another panel below: x tick labels there
                ax.tick_params(labelbottom=False)
            else:
                ax.set_xlabel("kimg", fontsize=7.5)
            ax.tick_params(labelsize=6.5)
        handles = [Line2D([], [], color=study.palette[lo], lw=1.8) for lo in study.loss_order]
        labels = list(study.loss_order)
        if multi:
            handles.append(Line2D([], [], color="#777777", lw=0.7))
            labels.append("one seed")
            handles.append(Line2D([], [], color="#777777", lw=1.8, marker="o", ms=2.2))
            labels.append("median over seeds")
        handles += [h for _, _, h, _ in refs]
        labels += [lb for _, _, _, lb in refs]
        fig.suptitle(f"{_ylabel(study)} vs {KIMG_LABEL}:\n"
                     f"{_seeds_shown(study) if multi else 'one seed per cell'}",
                     fontsize=8, y=1 - 0.15 / fig.get_size_inches()[1], va="top")
        fig.legend(handles, [textwrap.fill(lb, 48) for lb in labels], loc="upper center",
                   bbox_to_anchor=(0.5, 0.0), ncol=2 if len(labels) > 4 else len(labels),
                   frameon=False, fontsize=7)
        return [csv] + save(fig, out_dir, "curves", study.note())


# -------------------------------------------------------------------------------------- main
def _samples(study, out_dir, rng, timer, root=None):

    return samples(study, out_dir, timer, root)


def _table(study, out_dir, rng, timer):

    with timer("table: aggregate+write"):
        return write_table(study, out_dir)


def _claims(study, out_dir, rng, timer, claims=None, rows=None):

    with timer("claims: judge+write"):
        return write_claims(study, out_dir, claims, rows=rows)


def _verifier(study, out_dir, rng, timer, rows=None):

    with timer("verifier"):
        return verifier_figure(rows, out_dir, metric=study.metric, rng=rng,
                               cells=set(study.final.cell))


def _claims_kimg(study, out_dir, rng, timer, claims=None):

    with timer("claims_kimg: judge per kimg+write"):
        return write_claims_kimg(study, out_dir, claims)


FIGURES = Registry("figure")
"""Every output by name, in the order ``make_all`` draws them."""
for _name, _fn in (("heatmap", heatmap), ("curves", curves), ("kimg0", kimg0), ("reset", reset),
                   ("transplant", transplant), ("mapping", mapping), ("samples", _samples),
                   ("table", _table), ("claims", _claims), ("forest", forest),
                   ("claims_kimg", _claims_kimg), ("verifier", _verifier), ("tuning", _tuning)):
    FIGURES.register(_name)(_fn)


def register_figure(name: str):
    """Decorator for a new output: a function ``(study, out_dir, rng, timer) -> list of written
    paths`` (``study``: ``analysis.data.StudyResults``; ``rng``: its own numpy Generator;
    ``timer("step")``: a context manager that times a step); drawn after the built-in ones."""
    return FIGURES.register(name)


def outputs() -> tuple[str, ...]:
    """The names ``make_all(only=...)`` accepts, in drawing order (plug-ins included)."""
    return tuple(FIGURES)


def rng_for(seed: int, name: str) -> np.random.Generator:
    """One independent, deterministic stream per output, so ``only=`` reproduces a full run."""
    return np.random.default_rng([int(seed), zlib.crc32(name.encode())])


def make_all(root: str, out_dir: str | None = None, only: str | None = None,
             metric: str | None = None, seed: int = 0, *, timings: list | None = None,
             rows: pd.DataFrame | None = None,
             claims: ClaimsSpec | None = None) -> list[str]:
    """Write every figure and table for the results under ``root``; return the paths.

    ``only``: one of ``outputs()`` (anything else raises ``harness.declare.config.ConfigError``, a ValueError
    naming the valid outputs, which the CLI reports with exit code 2). ``metric``: the primary
    metric (default: first fid_inception_*, fd_*, mmd_*). ``seed``: bootstrap seed.
    ``timings``: list to receive (step, seconds). ``rows``: an already loaded
    ``load_rows(root)`` frame (skips loading). ``claims``: the study's claims declaration
    (``harness.declare.claims_spec.ClaimsSpec``: thresholds, C1's (score-free, teacher-score) pair,
    alpha, pooled axes, seeds plan; default: the declared defaults); a pair missing from the
    results leaves C1 not tested, saying why.
    """
    if only is not None and only not in FIGURES:
        raise ConfigError("only", f"unknown output {only!r}; valid outputs: "
                                  f"{', '.join(outputs())}")
    default_out = out_dir is None and "://" not in root
    if out_dir is None:
        if "://" in root:
            out_dir = "figures"
            print(f"figures: results root {root} is remote; writing into ./{out_dir}")
        else:
            out_dir = os.path.join(root, "figures")
    # the default folder is checked against the results root: no folder on the way may be a
    # link that leaves it; a folder the caller names is checked from its parent down
    prepare_output(root if default_out else os.path.dirname(os.path.abspath(out_dir)), out_dir)
    timer = Timer(timings)
    if rows is None:
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
    for name in ([only] if only else outputs()):
        kw = ({"root": root} if name == "samples" else
              {"claims": claims, "rows": rows} if name in ("claims", "forest") else
              {"claims": claims} if name == "claims_kimg" else
              {"rows": rows} if name == "verifier" else
              {"root": root, "rows": rows} if name == "tuning" else {})
        # forest and claims_kimg draw from the claims stream: the numbers of claims.md
        stream = "claims" if name in ("claims_kimg", "forest") else name
        paths += FIGURES.get(name)(study, out_dir, rng_for(seed, stream), timer, **kw)
    return paths
