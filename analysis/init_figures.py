"""The init-ablation figures: ``reset`` (per reset group, matched vs fresh),
``mapping`` (mapping vs features: teacher, reset output, band teachers, mapping_match, random)
and ``transplant`` (score vs sigma_feat), each with teacher and random init as references.
Every seed is drawn (a dot each) with the median on top: groups of 2-3 seeds can be bimodal."""
from __future__ import annotations

import textwrap

import matplotlib.pyplot as plt  # noqa: E402  (style selected the Agg backend)
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D  # noqa: E402

from analysis.data import PLAIN_TEACHER, Study, ordered  # noqa: E402
from analysis.panels import _draw_refs, _order_key, _ref_handles, _seeds_shown, _ylabel  # noqa: E402
from analysis.seeds import offsets, seed_summary, strip  # noqa: E402
from analysis.style import (
    RC,
    SIGMA_LABEL,
    axis_limits,
    legend_below,
    log_ticks,
    save,
    use_log,
    write_csv,
)


# ------------------------------------------------------------------------------ points w/ CI
def _fresh(info: dict) -> bool:
    """A reset, or a transplant that resets its output, re-initialized fresh: drawn hollow."""
    return info.get("reinit") == "fresh" and (info.get("init_scheme") == "reset_layers"
                                              or bool(info.get("reset_output")))


def _points(ax, study: Study, final: pd.DataFrame, cats: list):
    """Per init category, one strip per loss (dodged): a dot per seed in the loss colour and the
    median as a dark bar; a hollow dot tells a fresh re-init (see ``_fresh``)."""
    losses = [lo for lo in study.loss_order if lo in set(final["loss"])]
    width = 0.7 / max(1, len(losses))
    for j, loss in enumerate(losses):
        g = final[final["loss"] == loss].sort_values("seed", kind="stable")
        for i, cat in enumerate(cats):
            strip(ax, i + (j - (len(losses) - 1) / 2) * width,
                  g.loc[g["init"] == cat, "value"].to_numpy(float), study.palette[loss],
                  width=width * 0.55, filled=not _fresh(study.info(cat)))
    return losses


def _ref_span(ax, cats, refs=("teacher", "random")):
    for i, c in enumerate(cats):
        if c in refs:
            ax.axvspan(i - 0.45, i + 0.45, color="#000000", alpha=0.05, lw=0)


def _marker_legend(study: Study, cats) -> tuple[list, list]:
    kinds = {}
    for c in cats:
        info = study.info(c)
        if _fresh(info):
            kinds["fresh"] = (Line2D([], [], color="#444444", marker="o", mfc="white",
                                     ls="none"), "reinit: fresh (architecture's own init)")
        elif info.get("reinit") == "matched":
            kinds["matched"] = (Line2D([], [], color="#444444", marker="o", ls="none"),
                                "reinit: matched (RMS of the teacher's tensor)")
    order = [k for k in ("matched", "fresh") if k in kinds]
    return [kinds[k][0] for k in order], [kinds[k][1] for k in order]


def _category_figure(study: Study, out_dir: str, rng, timer, name: str, cats: list, roles: dict,
                     xlabel: str, title: str, kimg0: bool = False,
                     ref_lines: bool = False) -> list[str]:
    """Final score per init category (dodged by loss: every seed a dot, the median a bar), with
    optional grey crosses at kimg 0 (median over cells) and the teacher Heun / data floor lines."""
    f = study.final
    with timer(f"{name}: aggregate"):
        agg = seed_summary(f[f["init"].isin(cats)], ["loss", "init"])
        agg.insert(2, "stage", "final")
        if kimg0:
            s0 = study.scores[(study.scores["kimg"] == 0) & study.scores["init"].isin(cats)]
            a0 = seed_summary(s0.assign(loss="all losses"), ["loss", "init"])
            a0.insert(2, "stage", "kimg 0")
            agg = pd.concat([agg, a0], ignore_index=True)
        agg = ordered(agg, init_order=cats)
        role = {i: roles.get(i) or str(study.info(i).get("init_scheme") or "") for i in cats}
        agg.insert(2, "role", agg["init"].map(role).fillna("").str.replace("\n", " "))
        refs = _ref_handles(study) if ref_lines else []
        if refs:
            agg = pd.concat([agg, pd.DataFrame([{"loss": "reference", "init": n, "median": v,
                                             "mean": v}
                                                for n, v, _, _ in refs])], ignore_index=True)
        agg.insert(0, "metric", study.metric)
        csv = write_csv(agg, out_dir, name)
    with timer(f"{name}: render"), plt.rc_context(RC):
        # 0.8 in per init (its tick label fits), at most a two-column page width; legend below
        cw = min(0.8, 6.1 / len(cats))
        fw, fh = 0.8 + cw * len(cats) + 0.1, 2.6
        fig = plt.figure(figsize=(fw, fh))
        ax = fig.add_axes((0.8 / fw, 0.1, cw * len(cats) / fw, 1.9 / fh))
        _ref_span(ax, cats)
        sel = f[f["init"].isin(cats)]
        losses = _points(ax, study, sel, cats)
        handles = [Line2D([], [], color=study.palette[lo], marker="o", ls="none")
                   for lo in losses]
        labels = [f"{lo} (a dot per seed)" for lo in losses]
        handles.append(Line2D([], [], color="#222222", lw=1.6))
        labels.append("median over seeds")
        vals = sel["value"].tolist()
        if kimg0:
            z = agg[agg["stage"] == "kimg 0"].set_index("init").reindex(cats)
            ax.plot(np.arange(len(cats)), z["median"].to_numpy(float), ls="none", marker="x",
                    ms=6, color="#555555", mew=1.2, zorder=4)
            handles.append(Line2D([], [], ls="none", marker="x", color="#555555", mew=1.2))
            labels.append("at kimg 0 (the untrained init; median)")
            vals += z["median"].dropna().tolist()
        if ref_lines:  # their values are in the legend: no label on the data
            _draw_refs(ax, refs, labels=False)
            handles += [h for _, _, h, _ in refs]
            labels += [lb for _, _, _, lb in refs]
            vals += [v for _, v, _, _ in refs]
        mh, ml = _marker_legend(study, cats)
        handles += mh
        labels += ml
        ax.set_xticks(range(len(cats)))
        ax.set_xticklabels([_tick(study.display(c) + (f"\n({roles[c]})" if roles.get(c) else ""))
                            for c in cats], fontsize=6.5, linespacing=1.0)
        ax.set_xlim(-0.6, len(cats) - 0.4)
        ax.grid(axis="x", visible=False)
        ax.set_xlabel(xlabel, fontsize=7)
        ax.set_ylabel(_ylabel(study, wrap=True), fontsize=7.5)
        log = use_log(vals)
        if log:
            ax.set_yscale("log")
            log_ticks(ax.yaxis, *axis_limits(vals, log))
        ax.set_ylim(*axis_limits(vals, log))
        ax.set_title(f"{title}\n({_seeds_shown(study, sel)})", fontsize=8)
        legend_below(fig, handles, labels)
        return [csv] + save(fig, out_dir, name, study.note())


def _tick(label: str, width: int = 13) -> str:
    """A category's tick label with every line wrapped to ``width`` characters (0.8 in at
    6.5 pt), so neighbouring labels never run into each other."""
    return "\n".join(textwrap.fill(line, width, break_long_words=False, break_on_hyphens=False)
                     for line in label.split("\n"))


def reset(study: Study, out_dir: str, rng, timer) -> list[str]:
    resets = study.inits_where(init_scheme="reset_layers")
    if not resets:
        print("figures: reset skipped (no reset_layers cells)")
        return []
    have = set(study.final["init"])
    teacher = study.inits_where(**PLAIN_TEACHER)
    random_ = study.inits_where(init_scheme="random")
    cats = [i for i in teacher + resets + random_ if i in have]
    roles = {i: "reference" for i in teacher + random_}
    return _category_figure(
        study, out_dir, rng, timer, "reset", cats, roles,
        "generator initialization: teacher weights,\nthe named groups re-initialized",
        f"Final {study.metric} after resetting layer groups")


def mapping(study: Study, out_dir: str, rng, timer) -> list[str]:
    """'Mapping vs features': teacher, random, reset[output] matched and fresh (features without
    the mapping), mapping_match (the mapping without the features), band-limited teachers
    (features of one noise band), teacher init with frozen groups (the features kept and never
    updated), per loss, with the teacher Heun and data-floor lines."""
    mm = study.inits_where(init_scheme="mapping_match")
    bands = [i for i in study.inits_where(init_scheme="teacher")
             if study.info(i).get("init_source") is not None]
    frozen = list(study.frozen_teachers())
    if not mm and not bands and not frozen:
        print("figures: mapping skipped (no mapping_match, band-limited or frozen teacher cells)")
        return []
    teacher = study.inits_where(**PLAIN_TEACHER)
    random_ = study.inits_where(init_scheme="random")
    out = study.inits_where(init_scheme="reset_layers", reset_groups="output")
    have = set(study.final["init"])
    cats = [i for i in teacher + out + bands + frozen + mm + random_ if i in have]
    roles = {i: "reference" for i in teacher + random_}
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
        a = seed_summary(ft, ["loss", "variant", "sigma_feat"])
        a["role"] = "feature_transplant"
        first = ft.drop_duplicates(["variant", "sigma_feat"]).set_index(["variant", "sigma_feat"])
        a["init"] = first["init"].reindex(pd.MultiIndex.from_frame(
            a[["variant", "sigma_feat"]])).to_numpy()
        teacher = study.inits_where(**PLAIN_TEACHER)
        random_ = study.inits_where(init_scheme="random")
        r = seed_summary(f[f["init"].isin(teacher + random_) & f["loss"].isin(ft["loss"])],
                         ["loss", "init"])
        r["role"] = r["init"] + " init (reference)"
        agg = ordered(pd.concat([a, r], ignore_index=True), init_order=study.init_order)
        vorder = {v: i for i, v in enumerate(TRANSPLANT_VARIANTS)}
        agg = agg.assign(_v=agg["variant"].map(vorder)).sort_values(
            ["loss", "role", "_v", "sigma_feat"], kind="stable",
            key=_order_key(study)).drop(columns="_v").reset_index(drop=True)
        agg = agg[["loss", "role", "variant", "init", "sigma_feat", "n", "median", "mean", "std",
                   "min", "max", "wide", "seeds", "values"]]
        agg.insert(0, "metric", study.metric)
        csv = write_csv(agg, out_dir, "transplant")
    with timer("transplant: render"), plt.rc_context(RC):
        fig, ax = plt.subplots(figsize=(3.5, 2.6))
        losses = [lo for lo in study.loss_order if lo in set(a["loss"])]
        variants = [v for v in TRANSPLANT_VARIANTS if v in set(a["variant"])]
        step = 0.16 / max(1, len(losses))  # dodge per loss, in decades of sigma_feat
        for j, loss in enumerate(losses):
            c = study.palette[loss]
            k = 10 ** ((j - (len(losses) - 1) / 2) * step)
            for v in variants:
                g = a[(a["loss"] == loss) & (a["variant"] == v)].sort_values("sigma_feat")
                if g.empty:
                    continue
                ls, mk, filled = TRANSPLANT_STYLE[v]
                x = g["sigma_feat"].to_numpy(float) * k
                ax.plot(x, g["median"].to_numpy(float), color=c, lw=1.3, ls=ls, zorder=2)
                for xi, vals in zip(x, g["values"]):
                    y = np.array([float(t) for t in str(vals).split(";")])
                    ax.scatter(xi * 10 ** (offsets(len(y), 0.05)), y, s=13, marker=mk,
                               facecolors=c if filled else "white", edgecolors=c, lw=1.0,
                               zorder=3, alpha=0.9)
            for init, ls in (("teacher", (0, (5, 3))), ("random", (0, (1, 2)))):
                v = r[(r["loss"] == loss) & r["init"].isin(teacher if init == "teacher"
                                                            else random_)]["median"]
                if len(v):
                    ax.axhline(float(v.iloc[0]), color=c, ls=ls, lw=1.0, alpha=0.8)
        ax.set_xscale("log")
        sig = sorted(a["sigma_feat"].unique())
        ax.set_xticks(sig)
        ax.set_xticklabels([f"{s:g}" for s in sig])
        ax.minorticks_off()
        ax.set_xlabel(SIGMA_LABEL, fontsize=7)
        ax.set_ylabel(_ylabel(study, wrap=True), fontsize=7.5)
        if use_log(ft["value"].tolist() + r["median"].tolist()):
            ax.set_yscale("log")
        ax.set_title(f"Final {study.metric} vs transplanted feature noise\n"
                     f"({_seeds_shown(study, ft)})", fontsize=8)
        handles = [Line2D([], [], color=study.palette[lo], marker="o", lw=1.3) for lo in losses]
        labels = list(losses)
        handles.append(Line2D([], [], color="#444444", marker="o", ls="none"))
        labels.append("one seed (the line: medians)")
        for v in variants:
            ls, mk, filled = TRANSPLANT_STYLE[v]
            handles.append(Line2D([], [], color="#444444", ls=ls, marker=mk, lw=1.2,
                                  mfc="#444444" if filled else "white"))
            labels.append(TRANSPLANT_WORDS[v])
        handles += [Line2D([], [], color="#444444", ls=ls, lw=1.0)
                    for ls in ((0, (5, 3)), (0, (1, 2)))]
        labels += ["teacher init, median (reference)", "random init, median (reference)"]
        legend_below(fig, handles, labels)
        return [csv] + save(fig, out_dir, "transplant", study.note())


TRANSPLANT_VARIANTS = ("features", "reset_output matched", "reset_output fresh")
TRANSPLANT_STYLE = {"features": ("-", "o", True), "reset_output matched": ("-.", "s", False),
                    "reset_output fresh": ((0, (3, 1, 1, 1, 1, 1)), "^", False)}
TRANSPLANT_WORDS = {"features": "transplant: all teacher weights kept",
                    "reset_output matched": "transplant + output reset (matched)",
                    "reset_output fresh": "transplant + output reset (fresh)"}


def _transplant_variant(info: dict) -> str:
    if not info.get("reset_output"):
        return "features"
    return "reset_output fresh" if info.get("reinit") == "fresh" else "reset_output matched"
