"""One protocol per metric: which rows of a metric figures and tables read when the store holds
the same metric under several protocols (``harness rescore`` adds rows beside the old ones), and
how the ones left out are described. No torch, no Ray."""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

FLOOR = "data_floor"
"""The reference rows of the data floor: real training images scored as generated samples are."""


@dataclass
class ProtocolChoice:
    """The one protocol a metric is read under, why, and what was left out."""

    protocol: str | None
    source: str
    left_out: pd.DataFrame  # protocol, rows, cells, refs: the metric's rows under other protocols

    def left_words(self, full: bool = True) -> str | None:
        """``None`` if every row had this protocol; else 'left out N rows under K other
        protocols: ...' (``full``: whole protocol texts; else the parts that differ)."""
        if self.left_out.empty:
            return None
        others = list(self.left_out["protocol"])
        show = (lambda p: p) if full else (lambda p: protocol_excerpt(p, others + [self.protocol]))
        parts = []
        for r in self.left_out.itertuples(index=False):
            what = []
            if r.rows - r.refs:
                what.append(f"{int(r.rows - r.refs)} row{'s' if r.rows - r.refs != 1 else ''} "
                            f"of {int(r.cells)} cell{'s' if r.cells != 1 else ''}")
            if r.refs:
                what.append(f"{int(r.refs)} reference row{'s' if r.refs != 1 else ''}")
            parts.append(f"{' and '.join(what)} under '{show(r.protocol)}'")
        n = int(self.left_out["rows"].sum())
        return (f"left out {n} row{'s' if n != 1 else ''} under {len(others)} other "
                f"protocol{'s' if len(others) != 1 else ''}: {'; '.join(parts)}")

    def words(self, full: bool = True) -> str | None:
        """A sentence for figure notes: the protocol, why, and what was left out (None if
        nothing was)."""
        left = self.left_words(full)
        if left is None:
            return None
        shown = self.protocol if full else protocol_excerpt(self.protocol,
                                                             list(self.left_out["protocol"])
                                                             + [self.protocol])
        return f"One protocol per metric: '{shown}' ({self.source}); {left}."


def protocol_excerpt(p: str, all_protocols: list, width: int = 60) -> str:
    """The part of protocol ``p`` that tells it apart from the others (common prefix and suffix
    cut to '…'), at most ``width`` characters."""
    ps = [str(x) for x in all_protocols if x is not None]
    p = str(p)
    if len(set(ps)) < 2:
        return p if len(p) <= width else p[:width - 1] + "…"
    pre = len(_common_prefix(ps))
    suf = len(_common_prefix([x[::-1] for x in ps]))
    pre = p.rfind(" ", 0, pre) + 1 if pre < len(p) else pre  # cut at a word boundary
    end = len(p) - suf
    end = p.find(" ", end) if 0 <= end < len(p) and p.find(" ", end) >= 0 else len(p)
    if end - pre < 24:  # a short difference: show some words before it for context
        back = p.rfind(" ", 0, max(0, pre - (24 - (end - pre))))
        pre = back + 1 if back >= 0 else 0
    core = p[pre:max(end, pre)]
    if len(core) > width:
        core = core[:width - 1] + "…"
    return ("…" if pre > 0 else "") + core + ("…" if end < len(p) else "")


def _common_prefix(ps: list) -> str:
    a, b = min(ps), max(ps)
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    return a[:i]


def reference_protocol(p: str, known) -> str:
    """The metric part of a reference row's protocol: reference rows store
    ``'<what the reference is>; <metric protocol>'``; ``known`` are the cells' protocols."""
    p = "" if p is None else str(p)
    if p in known:
        return p
    for k in known:
        if k and p.endswith("; " + k):
            return k
    return p.split("; ", 1)[1] if "; " in p else p


def select_protocol(m: pd.DataFrame, done: set) -> tuple[ProtocolChoice, pd.Series]:
    """Choose ONE protocol for the rows ``m`` of one metric: the protocol of the newest data-floor
    reference row among those that done cells also have (any floor row when no done cell has
    rows), else the one with most done cells (ties: more rows, then newest, then name).
    Returns the choice and a boolean mask over ``m`` of the rows kept."""
    proto = m["protocol"].fillna("").astype(str)
    is_ref = (m["status"] == "reference").to_numpy()
    cellp = proto[~is_ref]
    is_done = m["cell"].isin(done).to_numpy() & ~is_ref
    known = set(cellp.unique())
    ref_map = {p: reference_protocol(p, known) for p in proto[is_ref].unique()}
    eff = proto.copy()
    if is_ref.any():
        eff[is_ref] = proto[is_ref].map(ref_map).to_numpy()
    stats = (pd.DataFrame({"protocol": eff[is_done], "cell": m["cell"][is_done],
                           "t": m["written_at"][is_done]})
             .groupby("protocol").agg(cells=("cell", "nunique"), rows=("cell", "size"),
                                      newest=("t", "max")).reset_index())
    chosen, source = None, ""
    floor = m.loc[is_ref & (m["init"] == FLOOR).to_numpy()]
    if len(floor):
        floor = floor.assign(eff=eff[floor.index]).sort_values("written_at", ascending=False,
                                                                kind="stable")
        for r in floor.itertuples(index=False):
            if stats.empty or r.eff in set(stats["protocol"]):
                chosen = r.eff
                source = f"that of the newest data-floor reference row ({r.init})"
                break
    if chosen is None and not stats.empty:
        st = stats.sort_values(["cells", "rows", "newest", "protocol"],
                               ascending=[False, False, False, True], kind="stable")
        chosen = st["protocol"].iloc[0]
        source = (f"the most common among done cells ({int(st['cells'].iloc[0])} of "
                  f"{len(done & set(m['cell'][is_done]))})")
    if chosen is None:
        counts = eff.value_counts()
        chosen = counts.index[0] if len(counts) else None
        source = "the most common among all rows"
    keep = (eff == chosen).to_numpy()
    out = pd.DataFrame({"protocol": eff[~keep], "cell": m["cell"][~keep],
                        "ref": is_ref[~keep]})
    lo = (out.assign(cellname=out["cell"].where(~out["ref"]))
          .groupby("protocol").agg(rows=("cell", "size"), cells=("cellname", "nunique"),
                                   refs=("ref", "sum"))
          .reset_index().sort_values(["rows", "protocol"], ascending=[False, True]))
    return ProtocolChoice(chosen, source, lo.reset_index(drop=True)), pd.Series(keep, m.index)
