"""Every figure and table of SPEC §8, regenerated from a results store only.

    make_all(root, out_dir=None, only=None, metric=None, seed=0) -> list of written paths

Outputs (``only`` picks one; an unknown name raises ``ConfigError``, a ValueError that lists the
valid names): the keys of ``BUILDERS``: heatmap and curves here, reset, mapping and transplant in
``analysis.init_figures``, samples, table, claims, claims_kimg, verifier and tuning in their own
modules; the pieces every figure shares are ``analysis.panels``.
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
import time
import zlib
from contextlib import contextmanager

import numpy as np
import pandas as pd

from harness.config import ConfigError
from harness.safefs import prepare_output

from .style import KIMG_LABEL, RC, axis_limits, fmt_pm, panel_grid, save, use_log, write_csv

import matplotlib.pyplot as plt  # noqa: E402  (style selected the Agg backend)
from matplotlib.lines import Line2D  # noqa: E402

from .data import Study, load_study, mean_ci, ordered  # noqa: E402
from .init_figures import mapping, reset, transplant  # noqa: E402
from .panels import (_draw_refs, _legend_right, _order_key, _ref_handles,  # noqa: E402
                     _shown, _ylabel)
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
        w = {1: 4.2, 2: 3.2}.get(ncol, 2.4)  # one or two panels: larger, not a stamp beside the legend
        fig, axes, (nrow, _) = panel_grid(len(inits), ncol, w=w, h=w * 0.7,
                                          top=0.45 + 0.11 * lines, hgap=0.3 + 0.11 * lines)
        refv = [v for _, v, _, _ in refs]
        band = pd.concat([agg["mean"], agg["ci_low"], agg["ci_high"]]).dropna().tolist() + refv
        log = use_log(band)
        # room under the lowest reference line for its value label
        ylim = axis_limits(band, log, bottom=0.14 if len(refs) > 1 else 0.05)
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
