"""The same hyperparameter-search budget for every loss family (``tune:``, ``harness tune``).

A study's ``tune:`` section names the settings to search and their distributions, for every loss
family or per family::

    tune:
      space:
        student.lr: loguniform(1.0e-5, 1.0e-3)          # every family
        sid: {loss.alpha: [1.0, 1.2]}                   # one family only (a list: a choice)
        ratio: {student.aux_lr: loguniform(1.0e-5, 1.0e-3)}
      trials: 8            # per family, the same for every family
      kimg: 8              # training budget per trial and selection seed
      seeds: [100]         # selection seeds, disjoint from the study's seeds
      metric: auto         # the study's primary metric (the first one a cell reports), or a name
      scheduler: asha      # asha | none

A *family* is one loss of the study (each distinct loss config of its cells, named by its label:
``di``, ``sid``, ``ratio_js``, ...). A scope key of ``space`` is a loss family (``di``, ``sid``,
``ratio``: all its losses) or a loss name (``ratio_js``: that loss only). Distributions are Ray
Tune's: ``uniform(a, b)``, ``loguniform(a, b)``, ``quniform(a, b, q)``, ``qloguniform(a, b, q)``,
``randint(a, b)`` and ``lograndint(a, b)`` (b excluded, as in Ray) and a YAML list (``choice``).
Searchable: ``student.KEY`` (not ``kimg``: the trial budget is ``tune.kimg``) and, under a family,
``loss.PARAM``. Validation is the study file's: both ends of a range and every choice are checked
against the setting's schema (``harness.declare.settings``), and every trial's values again before it
runs (``trial_config``), with the file, line and YAML path of any problem.

``harness tune STUDY`` runs, per family, one Ray Tune experiment (``<results root>/tune/``):
``num_samples = trials`` of random search (``BasicVariantGenerator`` with the fixed seed
``SEARCH_SEED`` for every family, so families with the same space are tried at the same points),
``ASHAScheduler`` (``time_attr = kimg``, the trial's training kimg summed over its seeds;
``max_t`` = the whole trial, grace period a quarter of it, reduction factor 2) or none. A trial is
the study's cell config for the family (teacher init, or the study's fixed init; other grid axes
at their first value; ``eval.verifier`` off) at ``student.kimg = tune.kimg``, trained on each
selection seed in turn with ``harness.orchestrate.cell.run_cell``. Its evaluations are stored as rows of the
results store with status ``tuning`` (cell ``tune-<trial id>-s<seed>``; the ``axes`` column holds
the family, the tune hash, the trial and its values as JSON). A killed ``harness tune`` resumes
with ``Tuner.restore`` (finished trials are not run again, running ones continue from their last
checkpoint; a trial seed whose final evaluation is in the rows is never trained again, whatever
Ray's periodically saved state says). Families whose choice is pinned under the current hash are
skipped. The Ray part lives in ``harness.orchestrate.tune_run``.

Selection (``SELECTION_RULE``): among the family's trials that reached the full budget on every
selection seed, the lowest (for higher-is-better metrics the highest) mean over the selection
seeds of the final metric value (the evaluation at the trial's last step); ties go to the earlier
trial. Only rows of the selection seeds are read (``read_trial_rows`` filters in Parquet).

The choice is pinned in ``pin.json`` under ``tuned``: ``choice`` ({family: {setting: value}}),
``protocol`` (trials, kimg, seeds, metric, scheduler, the rule), ``hash`` (of the ``tune:``
section) and ``families`` (per family: its hash, which also covers its search space and its
trial config, the winning trial and its score). ``apply`` makes the chosen values ordinary
settings of the family's cells (so they enter cell ids); ``harness run`` calls it through
``apply_pinned``, which refuses (exit 2) a study whose choice is missing or stale.

Validation and ``apply`` are pure Python (no torch, no Ray): ``harness.declare.study`` imports this module.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import re

from harness import __version__
from harness.declare import config as C
from harness.declare.hashing import canonical_json, identity, sha
from harness.declare.schema import check_value, higher_is_better
from harness.declare.study import Cell
from harness.declare.tune_spec import (  # SELECTION_RULE: analysis reads it here
    NOT_SEARCHED,
    SELECTION_RULE,  # noqa: F401
    Family,
    Tune,
    TuneError,
    loss_label,
)
from harness.store import results
from harness.store.pins import PIN, dumps, read_pin, utc_now

# ---------------------------------------------------------------------------------------------
# Values -> configs (the one place a tuned value enters a config)

def with_values(cfg: dict, values: dict, where: str = "tuned ") -> dict:
    """``cfg`` with ``{setting path: value}`` set, each value checked by the same schema as study
    files (``settings.check_value`` for ``student.*``, the family's ``param`` for ``loss.*``) and
    the result resolved (``config.resolve_cell``). Raises ``config.ConfigError``."""

    out = copy.deepcopy(cfg)
    for setting, value in values.items():
        section, _, key = setting.partition(".")
        if section == "loss":
            out["loss"] = C.resolve_loss({**out["loss"], key: value}, f"{where}loss")
        elif section == "student" and key in C.DEFAULTS["student"] and \
                key not in NOT_SEARCHED["student"]:
            out["student"][key] = check_value("student", key, value, where=where)
        else:
            raise C.ConfigError(where + setting, "not a searchable setting")
    return C.resolve_cell(out)


def trial_config(family: Family, values: dict, seed: int) -> dict:
    """The config one trial trains for one selection seed."""
    return with_values({**family.base, "seed": seed}, values, where=f"tune trial ({family.label}) ")


def final_kimg(cfg: dict) -> float:
    """The kimg of a config's last evaluation (``train.train_student``: whole steps)."""
    st = cfg["student"]
    return C.steps(st["kimg"], st["batch"]) * st["batch"] / 1000


def family_hash(tune: Tune, family: Family) -> str:
    """What a family's choice depends on: the protocol, its space and its trial config."""

    ident = identity({**family.base, "seed": 0})
    ident.pop("seed", None)
    doc = {"protocol": {k: v for k, v in tune.section().items() if k != "space"},
           "space": {k: d.text for k, d in family.space.items()}, "trial": ident}
    return sha(doc)[:16]


# ---------------------------------------------------------------------------------------------
# Applying the pinned choice

def apply(study, choice: dict):
    """The study with each cell's family's chosen values (``{family: {setting: value}}``) as
    ordinary settings of its config, and so of its cell id. Axes are unchanged."""

    if study.tune is None:
        return study
    return dataclasses.replace(study, cells=_tuned(study, study.cells, choice, Cell),
                               seed_pool=_tuned(study, study.seed_pool, choice, Cell))


def _tuned(study, cells_in: list, choice: dict, Cell) -> list:
    cells, seen = [], {}
    for cell in cells_in:
        label = loss_label(cell.config)
        if label not in choice:
            raise TuneError(f"no tuned values for loss {label} of study {study.name!r}")
        cfg = with_values(cell.config, choice[label], where=f"tuned {label}: ")
        text = canonical_json(cfg)
        if text in seen:
            raise TuneError(f"cells {seen[text]} and {cell.index} of study {study.name!r} are "
                            f"the same config once their tuned values are applied; search a "
                            f"setting that does not merge them")
        seen[text] = cell.index
        cells.append(Cell(config=cfg, axes=dict(cell.axes), index=cell.index))
    return cells


def pinned(root: str) -> dict | None:
    """The ``tuned`` entry of a results root's ``pin.json`` (None if none)."""

    doc = read_pin(root)
    tuned = doc.get("tuned") if doc else None
    return tuned if isinstance(tuned, dict) else None


def family_states(study, root: str) -> dict[str, tuple[str, dict | None]]:
    """{family: (state, pinned entry)}: state ``tuned`` (pinned under the current hash),
    ``stale`` (pinned under another) or ``untuned``."""
    tuned = pinned(root) or {}
    fams = tuned.get("families") if isinstance(tuned.get("families"), dict) else {}
    out = {}
    for label, fam in study.tune.families.items():
        entry = fams.get(label)
        h = family_hash(study.tune, fam)
        state = "untuned" if not isinstance(entry, dict) else \
            "tuned" if entry.get("hash") == h and isinstance(entry.get("choice"), dict) else "stale"
        out[label] = (state, entry)
    return out


def apply_pinned(study, root: str, strict: bool = True, log=print):
    """``harness run`` / ``status`` / dry run: the study with its pinned tuned values applied.
    Without a ``tune:`` section the study is returned as is. ``strict``: a missing or stale
    choice raises ``TuneError`` (exit 2); otherwise a note is printed and the untuned cells are
    returned (their ids change once tuned)."""
    if getattr(study, "tune", None) is None:
        return study
    states = family_states(study, root)
    missing = [f for f, (s, _) in states.items() if s != "tuned"]
    where = study.path or study.name
    if missing:
        words = {"stale": "tuned under another tune: section or other settings",
                 "untuned": "not tuned"}
        why = ", ".join(f"{f} ({words[s]})" for f, (s, _) in states.items() if s != "tuned")
        text = (f"{where} has a tune: section, but no tuned choice is pinned in {root}/pin.json "
                f"for {why}. Run `harness tune {where}` first (it searches each loss family's "
                f"hyperparameters and pins the choice); ")
        if strict:
            raise TuneError(text + "nothing was run.")
        log("note: " + text + "the cells below use the study's own settings, so their ids "
                              "change once tuned.")
        return study
    choice = {f: e["choice"] for f, (_, e) in states.items()}
    log("tuned (pinned by harness tune): " + "; ".join(
        f"{f} " + " ".join(f"{k}={fmt_value(v)}" for k, v in c.items()) for f, c in choice.items()))
    return apply(study, choice)


def fmt_value(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def record_choice(root: str, study, label: str, entry: dict) -> dict:
    """Pin one family's choice in ``pin.json`` (``tuned``): entries of families that are no
    longer current (another hash, or gone from the study) move to ``tuned.previous``."""

    doc = read_pin(root) or {"study": study.name, "version": __version__, "updated_at": None,
                             "current": [], "cells": {}, "teachers": {}, "fingerprints": {}}
    tuned = doc.get("tuned") if isinstance(doc.get("tuned"), dict) else {}
    fams = dict(tuned.get("families") or {})
    previous = list(tuned.get("previous") or [])
    fams[label] = entry
    hashes = {f: family_hash(study.tune, fam) for f, fam in study.tune.families.items()}
    for f in list(fams):
        if hashes.get(f) != fams[f].get("hash"):
            previous.append({"family": f, **fams.pop(f)})
    doc["tuned"] = {"hash": study.tune.hash, "section": study.tune.section(),
                    "protocol": study.tune.protocol(),
                    "choice": {f: fams[f]["choice"] for f in study.tune.families if f in fams},
                    "families": {f: fams[f] for f in study.tune.families if f in fams},
                    **({"previous": previous} if previous else {})}
    doc["updated_at"] = utc_now()
    results.write_bytes_atomic(root, PIN, dumps(doc))
    return doc["tuned"]


# ---------------------------------------------------------------------------------------------
# Trial rows and selection (pandas; no torch, no Ray)

def read_trial_rows(root: str, seeds, cell: str | None = None):
    """Rows with status ``tuning`` of the given seeds only (and of one ``cell``, if given):
    filtered while reading the Parquet files, so rows of other seeds are never read. Repeated
    keys resolve to the newest."""
    fs, base = results.filesystem(root)
    files = results.part_files(fs, base.rstrip("/") + "/rows")
    where = [("status", "=", "tuning"), ("seed", "in", [int(s) for s in seeds])]
    if cell is not None:
        where.append(("cell", "=", cell))
    df = results.read_parts(fs, files, results.ROWS, filters=where).to_pandas()
    if df.empty:
        return df
    df = df.sort_values("written_at", kind="stable")
    return df.drop_duplicates(results.KEY, keep="last").reset_index(drop=True)


def stored_final(root: str, cell: str, seed: int, final: float) -> tuple[str, float] | None:
    """(metric, value) of a trial seed's final evaluation if its rows hold one: the rows are the
    truth about what finished, whatever Ray's experiment state (saved every few seconds) says."""
    rows = read_trial_rows(root, [seed], cell=cell)
    for axes in rows["axes"].dropna().unique() if len(rows) else ():
        metric = json.loads(axes).get("tune.metric")
        hit = rows[(rows["metric"] == metric) & (rows["kimg"] >= final - 1e-9)]
        if len(hit):
            return metric, float(hit["value"].iloc[-1])
    return None


def trial_table(rows, family_hash_: str, seeds, final: float):
    """One row per trial of a family (by its hash): trial, its values (``params`` JSON), the
    metric, seeds that reached ``final`` kimg, ``score`` (mean final value over the selection
    seeds; NaN unless every seed finished), the last kimg and value, and ``state`` (complete,
    stopped, diverged). Only rows of ``seeds`` are used."""
    import numpy as np
    import pandas as pd

    cols = ["trial", "params", "metric", "n_final", "score", "last_kimg", "last_value", "state"]
    if rows.empty:
        return pd.DataFrame(columns=cols)
    rows = rows[rows["seed"].isin([int(s) for s in seeds]).to_numpy()
                & (rows["status"] == "tuning").to_numpy()]
    parsed = {a: json.loads(a) for a in rows["axes"].dropna().unique()}
    axes = rows["axes"].map(parsed)
    mine = axes.map(lambda a: isinstance(a, dict) and a.get("tune.hash") == family_hash_)
    rows, axes = rows[mine.to_numpy()], axes[mine.to_numpy()]
    if rows.empty:
        return pd.DataFrame(columns=cols)
    rows = rows.assign(trial=axes.map(lambda a: a.get("tune.trial")),
                       tmetric=axes.map(lambda a: a.get("tune.metric")),
                       params=axes.map(lambda a: json.dumps(a.get("tune.values", {}),
                                                            sort_keys=True)))
    out = []
    for trial, g in rows.groupby("trial", sort=True):
        metric = g["tmetric"].iloc[0]
        diverged = (g["metric"] == "diverged").any()
        m = g[g["metric"] == metric].sort_values("kimg")
        fin = m[m["kimg"] >= final - 1e-9]
        per_seed = fin.groupby("seed")["value"].last()
        complete = (len(per_seed) == len(seeds) and not diverged
                    and np.isfinite(per_seed.to_numpy(float)).all())
        last = m.iloc[-1] if len(m) else None
        out.append({"trial": trial, "params": g["params"].iloc[0], "metric": metric,
                    "n_final": int(len(per_seed)),
                    "score": float(per_seed.mean()) if complete else math.nan,
                    "last_kimg": float(last["kimg"]) if last is not None else math.nan,
                    "last_value": float(last["value"]) if last is not None else math.nan,
                    "state": "complete" if complete else "diverged" if diverged else "stopped"})
    return pd.DataFrame(out, columns=cols)


def select(table) -> dict | None:
    """The rule (``SELECTION_RULE``) over a ``trial_table``: the winning row as a dict, with
    ``values`` parsed and ``candidates`` counted; None when no trial is complete."""
    ok = table[table["state"] == "complete"]
    if ok.empty:
        return None
    hb = higher_is_better(str(ok["metric"].iloc[0]))
    ok = ok.assign(key=-ok["score"] if hb else ok["score"]).sort_values(["key", "trial"],
                                                                       kind="stable")
    best = ok.iloc[0].to_dict()
    best.pop("key")
    best["values"] = json.loads(best["params"])
    best["candidates"] = int(len(ok))
    return best


# ---------------------------------------------------------------------------------------------
# harness tune (the Ray part is harness.orchestrate.tune_run; what it says: tune_views)

def scratch_root(root: str) -> str:
    """Where trials' own cell rows, samples and references go (``<root>/tune/trials``); the
    study's store gets their ``tuning`` rows."""
    return root.rstrip("/") + "/tune/trials"


def experiment_name(study, label: str, fam_hash: str) -> str:
    """The family's Ray experiment under ``<root>/tune``: ``<study>-<family>-<hash8>``."""
    return f"{study.name}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', label)}-{fam_hash[:8]}"
