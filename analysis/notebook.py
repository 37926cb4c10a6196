"""A study's stored results in a notebook: typed pandas frames and the judged claims.

    import analysis
    s = analysis.open_study("results/c3-digits")      # a folder, NFS path or s3://bucket/prefix
    s.final.groupby(["loss", "init"])["value"].median()
    [c for c in s.claims if c.verdict == "holds"]

The frames follow the figures' selection rules (``analysis.data.load_study``): one primary
metric read under one protocol, only done cells of the current pin in ``scores``/``final``;
``cells`` lists every cell with its status and why it was left out. No torch, no Ray.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pandas as pd

from analysis.claim_view import Claim, claims_frame, judged_claims
from analysis.data import Study, load_study
from harness.declare.claims_spec import ClaimsSpec
from harness.declare.config import ConfigError
from harness.declare.study import load_study as load_study_file
from harness.store.results import load_rows, read_bytes

STRING_COLUMNS = ("cell", "loss", "loss_base", "init", "loss_family", "init_scheme", "status",
                  "reason", "message", "metric", "protocol", "study", "name", "label")
CELL_TABLE = ["cell", "loss", "init", "seed", "status", "reason", "final_kimg", "final",
              "wall_s", "message"]


def typed(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with name columns as pandas ``string``, ``seed`` as ``Int64`` and numbers as
    float64, so a frame has the same dtypes whatever its rows."""
    out = df.copy()
    for c in out.columns:
        if c in STRING_COLUMNS:
            out[c] = out[c].astype("string")
        elif c == "seed":
            out[c] = out[c].astype("Int64")
        elif c in ("kimg", "value", "final", "final_kimg", "wall_s", "mean", "std"):
            out[c] = out[c].astype("float64")
    return out


def cell_table(study: Study, rows: pd.DataFrame) -> pd.DataFrame:
    """One row per cell of the store (references left out): loss, init, seed, status, why it is
    left out of the figures (``reason``, '' when included), the primary metric at the cell's
    last evaluated kimg (``final``; NaN when the cell has none) and its compute seconds."""
    c = study.cells.copy()
    fin = study.final.set_index("cell")
    m = rows.loc[(rows["metric"] == study.metric).to_numpy() & rows["value"].notna().to_numpy()
                 & (rows["status"] != "reference").to_numpy()]
    if study.protocol is not None and study.protocol.protocol is not None:
        m = m.loc[(m["protocol"].fillna("") == study.protocol.protocol).to_numpy()]
    last = m.sort_values(["cell", "kimg"], kind="stable").drop_duplicates("cell", keep="last")
    last = last.set_index("cell")
    c["final_kimg"] = [fin["kimg"].get(x, last["kimg"].get(x, np.nan)) for x in c["cell"]]
    c["final"] = [fin["value"].get(x, last["value"].get(x, np.nan)) for x in c["cell"]]
    wall = rows.loc[(rows["status"] != "reference").to_numpy()].groupby("cell")["wall_s"].max()
    c["wall_s"] = c["cell"].map(wall)
    order = {v: i for i, v in enumerate(study.init_order)}
    c = c.assign(_i=c["init"].map(order).fillna(len(order)))
    c = c.sort_values(["_i", "loss", "seed", "cell"], kind="stable").drop(columns="_i")
    return typed(c[CELL_TABLE].reset_index(drop=True))


@dataclass
class StudyResults:
    """Everything a study stored, as the figures read it. Frames (all typed, see ``typed``):

    - ``rows``: every stored row (the results schema, one row per cell x kimg x metric).
    - ``cells``: one row per cell (``CELL_TABLE``).
    - ``scores``: the primary metric of included cells at every evaluated kimg.
    - ``final``: the primary metric of included cells at their last kimg.
    - ``refs``: reference rows (teacher Heun-35, data floor, initial generator): name, n, mean.
    ``claims``: judged on first use (bootstrap), the same numbers as ``claims.md``.
    """
    root: str
    metric: str
    higher_better: bool
    protocol: str | None
    rows: pd.DataFrame
    cells: pd.DataFrame
    scores: pd.DataFrame
    final: pd.DataFrame
    refs: pd.DataFrame
    pin: dict = field(default_factory=dict)
    claims_spec: ClaimsSpec | None = None  # the study file's claims: section (None: defaults)
    study: Study | None = field(default=None, repr=False)

    @property
    def data_floor(self) -> float | None:
        """The data floor's score (real images scored as samples are), or None."""
        name = self.study.floor_name() if self.study else None
        return None if name is None else self.study.ref(name)

    @property
    def excluded(self) -> pd.DataFrame:
        """Cells left out of ``scores``/``final`` and why (orphaned, diverged, unfinished...)."""
        return self.cells[self.cells["reason"] != ""].reset_index(drop=True)

    @cached_property
    def claims(self) -> list[Claim]:
        return judged_claims(self.study, self.claims_spec, rows=self.rows)

    @property
    def claims_table(self) -> pd.DataFrame:
        return claims_frame(self.claims)

    def __repr__(self) -> str:
        n = self.cells["status"].value_counts().to_dict()
        return (f"StudyResults({self.root!r}: {len(self.cells)} cells {n}, metric "
                f"{self.metric}, {len(self.final)} final scores)")


def open_study(root: str, metric: str | None = None,
               claims: ClaimsSpec | str | None = None) -> StudyResults:
    """Load the results under ``root`` (local path or ``s3://bucket/prefix``) for analysis.

    ``metric``: the primary metric (default: the figures' choice, first fid_inception_*, fd_*,
    mmd_*). ``claims``: the study's claims declaration, as the study YAML's path (its
    ``claims:`` section is read) or a ``ClaimsSpec``; None: the default claims. A root with no
    result rows or no quality metric raises ``harness.declare.config.ConfigError`` saying so.
    """
    if isinstance(claims, str):
        claims = load_study_file(claims).claims
    rows = load_rows(root)
    study = load_study(root, metric, rows=rows)
    if study is None:
        raise ConfigError("results", f"{root}: no result rows with a quality metric; run the "
                                     f"study first (harness run STUDY) or check the path")
    raw = read_bytes(root, "pin.json")
    pin = json.loads(raw) if raw else {}
    proto = study.protocol.protocol if study.protocol is not None else None
    return StudyResults(root=root, metric=study.metric, higher_better=study.higher_better,
                        protocol=proto, rows=typed(rows), cells=cell_table(study, rows),
                        scores=typed(study.scores), final=typed(study.final),
                        refs=typed(study.refs), pin=pin, claims_spec=claims, study=study)
