"""Read a results store into the tables every figure shares (one primary metric at a time).

``load_study`` resolves: the primary metric and the ONE protocol it is read under, each cell's
final status, orphaned cells (not in ``pin.json``'s ``current``), extra grid axes folded into the
loss label, per-cell final scores, and the reference values (teacher Heun-35, data floor, initial
one-step generator). Only cells that are ``done`` and current enter ``scores``/``final``; the rest
are ``excluded``. Loss and init parameters are read from their typed result columns
(``harness.declare.config.param_columns``), never parsed from labels.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis.grid_axes import axis_levels, extra_axis_labels
from analysis.protocol import FLOOR, ProtocolChoice, select_protocol
from analysis.style import (
    REFERENCE_NAMES,
    _nn,
    display_init,
    init_sort_key,
    loss_palette,
    loss_sort_key,
)
from analysis.tuning import load_tuned
from harness.declare.config import INIT_SCHEMES, ConfigError, param_columns
from harness.declare.hashing import PinError
from harness.declare.schema import cut
from harness.declare.schema import higher_is_better  # noqa: F401 (analysis modules read it here)
from harness.store.results import cell_status, load_rows, read_bytes

QUALITY_PREFIXES = ("fid_", "fd_", "kid_", "mmd_", "swd_", "modes_", "precision_", "recall_")
DEFAULT_PREFERENCE = ("fid_inception_", "fd_", "mmd_", "kid_", "swd_", "fid_")
VERIFIER_MARK = "@"
"""``fd_digits_1k@resample4``: a verifier score (analysis.verifier), never the plain score."""
PARAM_COLUMNS = list(param_columns())
INIT_COLUMNS = ["init_scheme"] + sorted({p.column or n for sch in INIT_SCHEMES.values()
                                         for n, p in sch.items()})
"""The typed columns that describe an init (scheme and every scheme parameter)."""
CELL_COLUMNS = ["cell", "loss", "init", *PARAM_COLUMNS, "seed"]
SCORE_COLUMNS = ["cell", "loss", "loss_base", "init", "loss_family", "init_scheme", "sigma_feat",
                 "reset_output", "seed", "levels"]
PLAIN_TEACHER = {"init_scheme": "teacher", "init_source": None, "freeze_groups": None}
"""The teacher init itself (``Study.inits_where(**PLAIN_TEACHER)``): the teacher's own weights,
all of them trained; a band-limited teacher's weights or a frozen variant is an init of its own."""
REFERENCE_ORDER = ("teacher_heun35", FLOOR)
"""Reference rows: the teacher's Heun-35 sampler, and the data floor (n real training images
scored against the held-out reference as generated samples are)."""


def is_quality(metric: str) -> bool:
    """A plain quality score (verifier-suffixed names, ``fd_digits_1k@resample4``, are not)."""
    return metric.startswith(QUALITY_PREFIXES) and VERIFIER_MARK not in metric


def choose_metric(counts: pd.Series, metric: str | None = None) -> str | None:
    """The primary metric: ``metric`` if given (must exist and be a plain score), else the first
    name starting fid_inception_, then fd_, then mmd_ (then kid_, swd_); among several with one
    prefix the one with most rows, ties by name. Verifier names (``...@resample4``) never."""
    quality = sorted(m for m in counts.index if is_quality(m))
    if metric is not None:
        if metric not in counts.index or VERIFIER_MARK in metric:
            why = ("is a verifier score (see analysis.verifier), not a plain score"
                   if VERIFIER_MARK in metric else "not in the results")
            raise ConfigError("metric", f"{metric!r} {why}; quality metrics present: "
                                        f"{', '.join(quality) or 'none'}")
        return metric
    for prefix in DEFAULT_PREFERENCE:
        cands = [m for m in quality if m.startswith(prefix)]
        if cands:
            return sorted(cands, key=lambda m: (-int(counts[m]), m))[0]
    return quality[0] if quality else None


# --------------------------------------------------------------------------------- study
@dataclass
class Study:
    metric: str
    higher_better: bool
    cells: pd.DataFrame  # one row per non-reference cell: CELL_COLUMNS + loss_base, status, reason
    scores: pd.DataFrame  # included cells x kimg: primary metric (SCORE_COLUMNS + kimg, value)
    final: pd.DataFrame  # included cells: primary metric at the cell's max kimg
    refs: pd.DataFrame  # name, label, n, mean, std
    loss_order: list = field(default_factory=list)
    init_order: list = field(default_factory=list)
    palette: dict = field(default_factory=dict)
    protocol: ProtocolChoice | None = None
    init_info: dict = field(default_factory=dict)  # init label -> {INIT_COLUMNS: value}
    tuned: dict | None = None  # pin.json's `tuned` entry (harness tune; analysis.tuning)

    @property
    def excluded(self) -> pd.DataFrame:
        return self.cells[self.cells.reason != ""].sort_values(["reason", "cell"])

    def ref(self, name: str) -> float | None:
        r = self.refs[self.refs.name == name]
        return None if r.empty else float(r["mean"].iloc[0])

    def floor_name(self) -> str | None:
        """``data_floor`` if the study has one."""
        return FLOOR if self.ref(FLOOR) is not None else None

    def note(self) -> str | None:
        """Short text for figures: what was excluded and why, and protocol rows left out."""
        parts = []
        ex = self.excluded
        if not ex.empty:
            counts = ex["reason"].value_counts().sort_index()
            reasons = ", ".join(f"{n} {r}" for r, n in counts.items())
            parts.append(f"Excluded cells (not plotted): {reasons}; listed in table.md.")
        words = self.protocol.words(full=False) if self.protocol else None
        if words:
            parts.append(words)
        return "\n".join(parts) or None

    def info(self, init: str) -> dict:
        return self.init_info.get(init, {})

    def display(self, init: str) -> str:

        return display_init(init, self.info(init))

    def frozen_teachers(self) -> dict[str, set]:
        """Teacher inits (of the teacher itself, not a band-limited one) with frozen groups, in
        display order: {init label: the set of frozen groups}."""
        return {i: set(str(_nn(self.info(i).get("freeze_groups"))).split("+"))
                for i in self.inits_where(init_scheme="teacher", init_source=None)
                if _nn(self.info(i).get("freeze_groups")) is not None}

    def inits_where(self, **cols) -> list[str]:
        """Init labels (in display order) whose typed columns equal ``cols`` (None: null)."""
        out = []
        for init in self.init_order:
            info = self.info(init)
            if all((_nn(info.get(k)) is None) if v is None else _nn(info.get(k)) == v
                   for k, v in cols.items()):
                out.append(init)
        return out

    def seeds_phrase(self, df: pd.DataFrame | None = None) -> tuple[int, int, str]:
        """(min, max, words) of seeds per (loss, init) group: 'one seed per cell' or
        '3 seeds' or '2-3 seeds'."""
        f = self.final if df is None else df
        n = f.groupby(["loss", "init"]).size() if len(f) else pd.Series([0])
        lo, hi = int(n.min()), int(n.max())
        if hi <= 1:
            return lo, hi, "one seed per cell"
        return lo, hi, f"{lo} seeds" if lo == hi else f"{lo}-{hi} seeds"

    def better(self, values):
        """The best of an array along its last axis (min, or max when higher is better)."""
        return np.max(values, axis=-1) if self.higher_better else np.min(values, axis=-1)

    def deficit(self, x, ref):
        """Relative shortfall of x against ref: > 0 means x is worse than ref."""
        d = (x - ref) / np.abs(ref)
        return -d if self.higher_better else d


def load_pin(root: str) -> set | None:
    """pin.json's ``current`` cells (None without a pin file or a ``current`` list). A corrupt
    or hand-broken file is a ``PinError`` naming it and the fix (exit 2), not a traceback."""

    raw = read_bytes(root, "pin.json")
    if raw is None:
        return None
    try:
        pin = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        pin = e
    why = (f"not valid JSON: {cut(str(pin), 120)}" if isinstance(pin, Exception) else
           "not a JSON object with 'current' a list of cell ids")
    current = pin.get("current") if isinstance(pin, dict) else None
    if not isinstance(pin, dict) or not (current is None or isinstance(current, list) and all(
            isinstance(c, str) for c in current)):
        raise PinError(f"{root}/pin.json is not a pin file ({why}). Move it aside (rename it "
                       f"to pin.json.bad): the figures then use every stored cell, orphaned ones "
                       f"included, until `harness run` on the study pins it again.")
    return None if current is None else {str(c) for c in current}


def load_study(root: str, metric: str | None = None, rows: pd.DataFrame | None = None,
               timer=None) -> Study | None:
    """Everything the figures need, or None (with a printed note) when there is nothing to plot."""
    from contextlib import nullcontext

    step = timer or (lambda name: nullcontext())
    with step("load rows"):
        df = load_rows(root) if rows is None else rows
        if len(df) and "status" in df.columns:  # harness tune trials: analysis.tuning
            df = df[(df["status"] != "tuning").to_numpy()]
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
        cells["levels"] = axis_levels(cells).to_numpy()
        current = load_pin(root)
        orphan = (~cells["cell"].isin(current)).to_numpy() if current is not None \
            else np.zeros(len(cells), bool)
        st = cells["status"].to_numpy()
        reason = np.where(orphan, "orphaned",
                          np.where(st == "done", "", np.where(st == "running", "unfinished", st)))
        cells["reason"] = reason.astype(str)
    with step("prepare: protocol, scores, final, references"):
        keep = (df["metric"] == metric).to_numpy() & df["value"].notna().to_numpy()
        m = df[["cell", "init", "kimg", "value", "status", "protocol", "written_at"]].loc[keep]
        done = set(cells.loc[cells.reason == "", "cell"])
        choice, kept = select_protocol(m, done)
        m = m.loc[kept.to_numpy()]
        ok = cells.loc[cells.reason == "", SCORE_COLUMNS]
        is_ref = (m["status"] == "reference").to_numpy()
        scores = m.loc[~is_ref, ["cell", "kimg", "value"]]
        scores = scores.merge(ok, on="cell", how="inner").dropna(subset=["kimg"])
        have = set(scores["cell"].unique())
        missing = ok["cell"][~ok["cell"].isin(have)]
        cells.loc[cells["cell"].isin(set(missing)), "reason"] = f"no {metric}"
        scores = scores.sort_values(["cell", "kimg"], kind="stable").reset_index(drop=True)
        final = scores.drop_duplicates("cell", keep="last").reset_index(drop=True)
        init_info = {}
        for r in cells.drop_duplicates("init")[["init"] + INIT_COLUMNS].to_dict("records"):
            init_info[r.pop("init")] = {k: _nn(v) for k, v in r.items()}
        refs = _references(m.loc[is_ref], scores, init_info)
    loss_order = sorted(final["loss"].unique(), key=loss_sort_key)
    init_order = sorted(final["init"].unique(),
                        key=lambda i: init_sort_key(init_info.get(i, {}), i))
    palette = loss_palette(cells["loss"].unique())
    cells = cells.drop(columns=["axes"]).sort_values("cell").reset_index(drop=True)
    return Study(metric=metric, higher_better=higher_is_better(metric), cells=cells,
                 scores=scores, final=final, refs=refs, loss_order=loss_order,
                 init_order=init_order, palette=palette, protocol=choice, init_info=init_info,
                 tuned=load_tuned(root))


def _references(ref: pd.DataFrame, scores: pd.DataFrame, init_info: dict) -> pd.DataFrame:
    out = []
    for name in REFERENCE_ORDER:
        v = ref.loc[(ref["init"] == name).to_numpy(), "value"].to_numpy(dtype=float)
        if len(v):
            out.append((name, len(v), v.mean(), v.std(ddof=1) if len(v) > 1 else np.nan))
    teacher = [i for i, info in init_info.items()
               if all(_nn(info.get(k)) == v for k, v in PLAIN_TEACHER.items())]
    v = scores.loc[scores["init"].isin(teacher).to_numpy() & (scores["kimg"] == 0).to_numpy(),
                   "value"].to_numpy(dtype=float)
    if len(v):
        out.append(("initial", len(v), v.mean(), v.std(ddof=1) if len(v) > 1 else np.nan))

    refs = pd.DataFrame(out, columns=["name", "n", "mean", "std"])
    refs.insert(1, "label", refs["name"].map(REFERENCE_NAMES))
    refs["caveat"] = [floor_caveat(ref, n) for n in refs["name"]]
    return refs


def floor_caveat(ref: pd.DataFrame, name: str) -> str:
    """Where the dataset is too small for the protocol, what the floor's protocol string says
    about it (shown in figure legends and tables), else ''."""
    if "protocol" not in ref.columns:
        return ""
    text = " ".join(ref.loc[(ref["init"] == name).to_numpy(), "protocol"].dropna().astype(str))
    if "with replacement" in text:
        return "drawn with replacement: the training split is smaller than n"
    if "too small for this protocol" in text:
        return "the dataset is too small for this protocol: halves smaller than n"
    return ""


def ordered(df: pd.DataFrame, loss: str = "loss", init: str | None = "init",
            init_order: list | None = None) -> pd.DataFrame:
    """Sort rows by the canonical loss order, then by ``init_order`` (a study's
    ``init_order``; labels not in it follow by name). Stable within equal keys."""
    cols = [loss] + ([init] if init else [])
    ranks = {}
    uniq = sorted(df[loss].astype(str).unique(), key=loss_sort_key)
    ranks[loss] = df[loss].astype(str).map({u: i for i, u in enumerate(uniq)}).to_numpy()
    if init:
        order = list(init_order or [])
        rest = sorted(set(df[init].astype(str)) - set(order),
                      key=lambda i: (i != "teacher", i == "random", i))
        pos = {u: i for i, u in enumerate(order + rest)}
        ranks[init] = df[init].astype(str).map(pos).to_numpy()
    idx = np.lexsort([ranks[c] for c in reversed(cols)])
    return df.iloc[idx].reset_index(drop=True)

