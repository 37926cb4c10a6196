"""Read a results store into the tables every figure shares (one primary metric at a time).

``load_study`` resolves: the primary metric, each cell's final status, orphaned cells (not in
``pin.json``'s ``current``), extra grid axes folded into the loss label, per-cell final scores,
and the reference values (teacher Heun-35, data floor, initial one-step generator).
Only cells that are ``done`` and current enter ``scores``/``final``; the rest are ``excluded``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from harness.results import cell_status, load_rows, read_bytes

from .style import base_loss, init_sort_key, loss_palette, loss_sort_key

QUALITY_PREFIXES = ("fid_", "fd_", "kid_", "mmd_", "swd_", "modes_", "precision_", "recall_")
HIGHER_BETTER_PREFIXES = ("modes_", "precision_", "recall_")
DEFAULT_PREFERENCE = ("fid_inception_", "fd_", "mmd_", "kid_", "swd_", "fid_")
CELL_COLUMNS = ["cell", "loss", "init", "init_scheme", "reset_groups", "sigma_feat", "seed"]


def is_quality(metric: str) -> bool:
    return metric.startswith(QUALITY_PREFIXES)


def higher_is_better(metric: str) -> bool:
    return metric.startswith(HIGHER_BETTER_PREFIXES)


def choose_metric(counts: pd.Series, metric: str | None = None) -> str | None:
    """The primary metric: ``metric`` if given (must exist), else the first name starting
    fid_inception_, then fd_, then mmd_ (then kid_, swd_); among several with one prefix the one
    with most rows, ties by name."""
    quality = sorted(m for m in counts.index if is_quality(m))
    if metric is not None:
        if metric not in counts.index:
            raise ValueError(f"metric {metric!r} not in the results; quality metrics present: "
                             f"{', '.join(quality) or 'none'}")
        return metric
    for prefix in DEFAULT_PREFERENCE:
        cands = [m for m in quality if m.startswith(prefix)]
        if cands:
            return sorted(cands, key=lambda m: (-int(counts[m]), m))[0]
    return quality[0] if quality else None


def _fmt_axis_value(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True, separators=(",", ":"))
    return str(v)


def extra_axis_labels(cells: pd.DataFrame) -> pd.Series:
    """Per cell: the loss label, suffixed with grid axes other than loss/init/seed that vary
    across the study, e.g. ``sid (student.lr=0.0001)``."""
    parsed = {}
    for a in cells["axes"].dropna().unique():
        try:
            d = json.loads(a)
        except (TypeError, ValueError):
            d = {}
        parsed[a] = {k: v for k, v in (d.items() if isinstance(d, dict) else ())
                     if k != "seed" and k.split(".")[0] not in ("loss", "init")}
    keys = sorted({k for d in parsed.values() for k in d})
    varying = [k for k in keys
               if len({_fmt_axis_value(d.get(k)) for d in parsed.values()}) > 1]
    if not varying:
        return cells["loss"].astype(str)
    suffix = {a: ", ".join(f"{k}={_fmt_axis_value(d[k])}" for k in varying if k in d)
              for a, d in parsed.items()}
    sfx = cells["axes"].map(suffix).fillna("")
    loss = cells["loss"].astype(str)
    return loss.where(sfx == "", loss + " (" + sfx + ")")


@dataclass
class Study:
    metric: str
    higher_better: bool
    cells: pd.DataFrame  # one row per non-reference cell: CELL_COLUMNS + loss_base, status, reason
    scores: pd.DataFrame  # included cells x kimg: primary metric
    final: pd.DataFrame  # included cells: primary metric at the cell's max kimg
    refs: pd.DataFrame  # name, label, n, mean, std
    loss_order: list = field(default_factory=list)
    init_order: list = field(default_factory=list)
    palette: dict = field(default_factory=dict)

    @property
    def excluded(self) -> pd.DataFrame:
        return self.cells[self.cells.reason != ""].sort_values(["reason", "cell"])

    def ref(self, name: str) -> float | None:
        r = self.refs[self.refs.name == name]
        return None if r.empty else float(r["mean"].iloc[0])

    def note(self) -> str | None:
        """Short text for figures: what was excluded and why."""
        ex = self.excluded
        if ex.empty:
            return None
        counts = ex["reason"].value_counts().sort_index()
        parts = ", ".join(f"{n} {r}" for r, n in counts.items())
        return f"Excluded cells (not plotted): {parts}; listed in table.md."

    def better(self, values):
        """The best of an array along its last axis (min, or max when higher is better)."""
        return np.max(values, axis=-1) if self.higher_better else np.min(values, axis=-1)

    def deficit(self, x, ref):
        """Relative shortfall of x against ref: > 0 means x is worse than ref."""
        d = (x - ref) / np.abs(ref)
        return -d if self.higher_better else d


def load_pin(root: str) -> set | None:
    raw = read_bytes(root, "pin.json")
    if raw is None:
        return None
    pin = json.loads(raw)
    current = pin.get("current") if isinstance(pin, dict) else None
    return None if current is None else {str(c) for c in current}


def load_study(root: str, metric: str | None = None, rows: pd.DataFrame | None = None,
               timer=None) -> Study | None:
    """Everything the figures need, or None (with a printed note) when there is nothing to plot."""
    from contextlib import nullcontext

    step = timer or (lambda name: nullcontext())
    with step("load rows"):
        df = load_rows(root) if rows is None else rows
    if df.empty:
        print(f"figures: no result rows under {root}; nothing to plot")
        return None
    with step("prepare: metric, status, orphans"):
        counts = df["metric"].value_counts()
        metric = choose_metric(counts, metric)
        if metric is None:
            print(f"figures: no quality metric among {sorted(counts.index)}; nothing to plot")
            return None
        first = df.drop_duplicates("cell")
        cells = first.loc[(first["status"] != "reference").to_numpy(), CELL_COLUMNS + ["axes"]]
        # cell_status over the rows that are not 'running' (a cell with none is running): the
        # same answer as cell_status(df), without walking a million rows in Python
        st_rows = df.loc[(df["status"] != "running").to_numpy(), ["cell", "status"]]
        status = cell_status(st_rows.drop_duplicates())
        cells = cells.assign(status=[status.get(c, "running") for c in cells["cell"]])
        msgs = df.loc[df["message"].notna().to_numpy(), ["cell", "message"]]
        msgs = dict(msgs.drop_duplicates("cell", keep="last").itertuples(index=False))
        cells["message"] = [str(msgs.get(c, "")) for c in cells["cell"]]
        cells["loss_base"] = cells["loss"].astype(str)
        cells["loss"] = extra_axis_labels(cells).to_numpy()
        current = load_pin(root)
        orphan = (~cells["cell"].isin(current)).to_numpy() if current is not None \
            else np.zeros(len(cells), bool)
        st = cells["status"].to_numpy()
        reason = np.where(orphan, "orphaned",
                          np.where(st == "done", "", np.where(st == "running", "unfinished", st)))
        cells["reason"] = reason.astype(str)
    with step("prepare: scores, final, references"):
        keep = (df["metric"] == metric).to_numpy() & df["value"].notna().to_numpy()
        m = df[["cell", "init", "kimg", "value", "status"]].loc[keep]
        ok = cells.loc[cells.reason == "", ["cell", "loss", "loss_base", "init", "init_scheme",
                                              "reset_groups", "sigma_feat", "seed"]]
        is_ref = (m["status"] == "reference").to_numpy()
        scores = m.loc[~is_ref, ["cell", "kimg", "value"]]
        scores = scores.merge(ok, on="cell", how="inner").dropna(subset=["kimg"])
        have = set(scores["cell"].unique())
        missing = ok["cell"][~ok["cell"].isin(have)]
        cells.loc[cells["cell"].isin(set(missing)), "reason"] = f"no {metric}"
        scores = scores.sort_values(["cell", "kimg"], kind="stable").reset_index(drop=True)
        final = scores.drop_duplicates("cell", keep="last").reset_index(drop=True)
        refs = _references(m.loc[is_ref], scores)
    loss_order = sorted(final["loss"].unique(), key=loss_sort_key)
    init_order = sorted(final["init"].unique(), key=init_sort_key)
    palette = loss_palette(cells["loss"].unique())
    cells = cells.drop(columns=["axes"]).sort_values("cell").reset_index(drop=True)
    return Study(metric=metric, higher_better=higher_is_better(metric), cells=cells,
                 scores=scores, final=final, refs=refs, loss_order=loss_order,
                 init_order=init_order, palette=palette)


def _references(ref: pd.DataFrame, scores: pd.DataFrame) -> pd.DataFrame:
    out = []
    for name in ("teacher_heun35", "data_halves"):
        v = ref.loc[(ref["init"] == name).to_numpy(), "value"].to_numpy(dtype=float)
        if len(v):
            out.append((name, len(v), v.mean(), v.std(ddof=1) if len(v) > 1 else np.nan))
    v = scores.loc[(scores["init"] == "teacher").to_numpy() & (scores["kimg"] == 0).to_numpy(),
                   "value"].to_numpy(dtype=float)
    if len(v):
        out.append(("initial", len(v), v.mean(), v.std(ddof=1) if len(v) > 1 else np.nan))
    from .style import REFERENCE_NAMES

    refs = pd.DataFrame(out, columns=["name", "n", "mean", "std"])
    refs.insert(1, "label", refs["name"].map(REFERENCE_NAMES))
    return refs


# ---------------------------------------------------------------- bootstrap statistics
B = 2000
LEVEL = 0.95


def mean_ci(df: pd.DataFrame, keys: list, rng: np.random.Generator, value: str = "value",
            b: int = B) -> pd.DataFrame:
    """Per group of ``keys``: n, mean, std (ddof 1) and a 95% percentile bootstrap CI of the mean
    over the group's rows (its seeds). Groups of equal size share one draw of resampling weights
    (each group's interval is still a correct marginal interval). n < 2 gives a NaN interval."""
    d = df.dropna(subset=[value])
    if d.empty:
        return pd.DataFrame(columns=list(keys) + ["n", "mean", "std", "ci_low", "ci_high"])
    g = d.groupby(keys, sort=True, dropna=False)[value]
    stats = g.agg(n="count", mean="mean", std="std").reset_index()
    codes = g.ngroup().to_numpy()
    order = np.argsort(codes, kind="stable")
    vals = d[value].to_numpy(dtype=float)[order]
    counts = np.bincount(codes, minlength=len(stats))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    lo = np.full(len(stats), np.nan)
    hi = np.full(len(stats), np.nan)
    q = [(1 - LEVEL) / 2, 1 - (1 - LEVEL) / 2]
    for n in sorted(set(counts.tolist())):
        if n < 2:
            continue
        idx = np.nonzero(counts == n)[0]
        w = rng.multinomial(n, np.full(n, 1.0 / n), size=b).astype(float) / n  # (b, n)
        chunk = max(1, 4_000_000 // b)
        for s in range(0, len(idx), chunk):
            sel = idx[s:s + chunk]
            means = vals[starts[sel][:, None] + np.arange(n)] @ w.T  # (g, b)
            lo[sel], hi[sel] = percentiles(means, q)
    stats["ci_low"], stats["ci_high"] = lo, hi
    return stats


def percentiles(a: np.ndarray, qs) -> np.ndarray:
    """np.quantile(a, qs, axis=-1) (linear interpolation) via one np.partition: ~3x faster."""
    a = np.asarray(a, dtype=float)
    n = a.shape[-1]
    pos = np.asarray(qs, dtype=float) * (n - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    p = np.partition(a, sorted(set(lo.tolist() + hi.tolist())), axis=-1)
    fr = pos - lo
    out = p[..., lo] * (1 - fr) + p[..., hi] * fr
    return np.moveaxis(out, -1, 0)


def boot_means(values: np.ndarray, rng: np.random.Generator, b: int = B) -> np.ndarray:
    """(b,) bootstrap means of one group's seed values (independent draws per call)."""
    values = np.asarray(values, dtype=float)
    n = len(values)
    return values[rng.integers(0, n, size=(b, n))].mean(axis=1)


def ordered(df: pd.DataFrame, loss: str = "loss", init: str | None = "init") -> pd.DataFrame:
    """Sort rows by the canonical loss order, then init order (see style)."""
    cols = [loss] + ([init] if init else [])
    sort_key = {loss: loss_sort_key, init: init_sort_key}
    ranks = {}
    for c in cols:
        uniq = sorted(df[c].astype(str).unique(), key=sort_key[c])
        ranks[c] = df[c].astype(str).map({u: i for i, u in enumerate(uniq)}).to_numpy()
    order = np.lexsort([ranks[c] for c in reversed(cols)])
    return df.iloc[order].reset_index(drop=True)


def base_of(label: str) -> str:
    return base_loss(label)
