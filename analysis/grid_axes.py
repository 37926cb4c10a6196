"""Grid axes other than loss, init and seed (``student.lr``, ...) read from a cell's ``axes``
JSON: the loss label suffix that keeps such cells apart in figures, and the level a claim is
judged within."""
from __future__ import annotations

import json

import pandas as pd


def _fmt_axis_value(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True, separators=(",", ":"))
    return str(v)


def _varying_axes(cells: pd.DataFrame) -> tuple[dict, list]:
    """({axes json: {axis: value}} without loss/init/seed, the axes whose value varies)."""
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
    return parsed, varying


def extra_axis_labels(cells: pd.DataFrame) -> pd.Series:
    """Per cell: the loss label, suffixed with grid axes other than loss/init/seed that vary
    across the study, e.g. ``sid (student.lr=0.0001)`` (figures keep such cells apart)."""
    parsed, varying = _varying_axes(cells)
    if not varying:
        return cells["loss"].astype(str)
    suffix = {a: ", ".join(f"{k}={_fmt_axis_value(d[k])}" for k in varying if k in d)
              for a, d in parsed.items()}
    sfx = cells["axes"].map(suffix).fillna("")
    loss = cells["loss"].astype(str)
    return loss.where(sfx == "", loss + " (" + sfx + ")")


def axis_levels(cells: pd.DataFrame) -> pd.Series:
    """Per cell: the levels of the grid axes other than loss/init/seed that vary across the
    study, as canonical JSON (``{"student.lr":0.001}``; ``{}`` when none vary). Claims are
    judged within each level, never averaged across levels unless the study pools the axis."""
    parsed, varying = _varying_axes(cells)
    text = {a: json.dumps({k: d[k] for k in varying if k in d}, sort_keys=True,
                          separators=(",", ":"), default=str) for a, d in parsed.items()}
    return cells["axes"].map(text).fillna("{}")
