"""Cell and teacher ids: canonical JSON of everything that changes a cell's numbers, hashed.

Pure Python (no torch, no Ray, no I/O but reading a teacher pickle to hash it). A cell id is a
short hash of the canonical JSON of the resolved sections ``data`` (less ``path``: the dataset's
fingerprint stands for its content, so the same files at another path give the same id),
``teacher`` and ``student`` (less the settings declared ``identity="no"``, and those added later
while at the value that reproduces older ids: see ``ADDED_LATER``), ``loss``, ``init``, ``eval``
and ``seed``, the dataset fingerprint and the teacher id. Scheduling settings (resources,
max_failures) never enter. ``harness.store.pins`` records them in ``pin.json``.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from typing import Callable, Mapping

from harness.base import digest
from harness.declare import config as C
from harness.declare import schema

ID_SECTIONS = ("data", "teacher", "student", "loss", "init", "eval", "seed")
# settings that do not change numbers: file locations (data content is fingerprinted; the
# Inception weights are the one published file, named in each metric's protocol) and execution
# choices that agree to float rounding (memory layout, torch.compile: see harness.core.perf)
NOT_IDENTITY = schema.NOT_IDENTITY  # declared per setting in harness.declare.schema (identity="no")
# settings added after ids were first stored: left out at the value that reproduces what those
# ids were computed for, so stored teachers and cells keep their ids (identity="unless_default")
ADDED_LATER = schema.ADDED_LATER


class PinError(RuntimeError):
    """pin.json cannot be used (corrupt, or another study's): the message names file and fix."""


# ---------------------------------------------------------------------------------------------
# Canonical JSON and ids

def _normalise(obj):
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise ValueError(f"canonical_json: non-finite number {obj!r}")
        # 1.0 and 1, 1e-4 and 0.0001: one text. Integral floats become ints.
        if obj.is_integer() and abs(obj) < 2 ** 53:
            return int(obj)
        return obj
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"canonical_json: keys must be strings, got {k!r}")
            out[k] = _normalise(v)
        return out
    if isinstance(obj, (list, tuple)):
        return [_normalise(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return _normalise(obj.item())
    raise TypeError(f"canonical_json: cannot encode {type(obj).__name__} {obj!r}")


def canonical_json(obj) -> str:
    """Deterministic JSON: sorted keys, no whitespace, integral floats as ints, shortest reprs."""
    return json.dumps(_normalise(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False)


def sha(obj) -> str:
    """sha256 hex digest of ``obj``'s canonical JSON (every id and hash of the harness)."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def identity(config: dict) -> dict:
    """The part of a (possibly partial) cell config that ids hash: resolved, ``ID_SECTIONS`` only."""
    sub = {k: copy.deepcopy(config[k]) for k in ID_SECTIONS if k in config}
    resolved = C.resolve_cell(sub)
    for section, keys in NOT_IDENTITY.items():
        resolved[section] = {k: v for k, v in resolved[section].items() if k not in keys}
    for section, legacy in ADDED_LATER.items():
        resolved[section] = {k: v for k, v in resolved[section].items()
                             if k not in legacy or v != legacy[k]}
    if resolved["teacher"].get("import"):  # the file's content is the teacher, not its path
        resolved["teacher"]["import"] = "sha256:" + file_sha256(resolved["teacher"]["import"])
    return resolved


def file_sha256(path: str) -> str:
    """sha256 of a local file (memoised by path, size and mtime: teacher pickles are ~200 MB)."""
    path = os.path.abspath(os.path.expanduser(path))
    try:
        return digest.file_sha256(path, memo=True)
    except OSError:
        raise C.ConfigError("teacher.import", f"{path} does not exist or cannot be read: put the "
                                              f"EDM .pkl there (see README, Running on a "
                                              f"cluster) or fix teacher.import") from None


def _teacher_id(ident: dict, data_fingerprint: str) -> str:
    """``t-`` + hash of data, teacher section and fingerprint; an imported teacher: ``t-`` + the
    first 12 hex digits of its file's sha256 (the id ``teacher.load_imported`` reports)."""
    imported = ident["teacher"].get("import")
    if imported:
        return "t-" + imported[len("sha256:"):][:12]
    doc = {"data": ident["data"], "teacher": ident["teacher"], "data_fingerprint": data_fingerprint}
    return "t-" + sha(doc)[:12]


def teacher_id(config: dict, data_fingerprint: str) -> str:
    """``t-`` + hash of the data config, the teacher section and the dataset fingerprint."""
    return _teacher_id(identity(config), data_fingerprint)


def teacher_plan(cells) -> dict[str, dict]:
    """Every teacher that cells given as (config, data fingerprint) need, by id: ``{"cfg": a cell
    config with that teacher section, "role": "teacher" | "init source", "refs": {evaluation
    protocol: cell config}}``: each cell's own teacher (with one config per evaluation protocol
    whose reference rows it writes) and each teacher whose weights start a generator (``init:
    {name: teacher, source: {...}}``). ``harness run``, ``harness tune`` and ``harness status``
    all plan from it."""
    plan: dict[str, dict] = {}
    for cfg, fp in cells:
        own = plan.setdefault(teacher_id(cfg, fp), {"cfg": cfg, "role": "teacher", "refs": {}})
        own["refs"].setdefault(canonical_json([cfg["eval"]["n"], cfg["eval"]["metric"]]), cfg)
        source = C.source_teacher(cfg)
        if source is not None:
            other = {**cfg, "teacher": source}
            plan.setdefault(teacher_id(other, fp), {"cfg": other, "role": "init source",
                                                    "refs": {}})
    return plan


def cell_id(config: dict, data_fingerprint: str) -> str:
    """Hash of the resolved cell config, the dataset fingerprint and the teacher id."""
    ident = identity(config)
    doc = {"config": ident, "data_fingerprint": data_fingerprint,
           "teacher": _teacher_id(ident, data_fingerprint)}
    return sha(doc)[:12]


def _fingerprinter(data_fingerprint) -> Callable[[dict], str]:
    if isinstance(data_fingerprint, str):
        return lambda data: data_fingerprint
    if isinstance(data_fingerprint, Mapping):
        def get(data):
            try:
                return data_fingerprint[data["name"]]
            except KeyError:
                raise ValueError(f"no data fingerprint given for dataset {data['name']!r}; "
                                 f"have {sorted(data_fingerprint)}") from None
        return get
    if callable(data_fingerprint):
        return data_fingerprint
    raise TypeError("data_fingerprint: a str, a {dataset name: fingerprint} mapping or a "
                    "callable(data config) -> str")


def compute_ids(study, data_fingerprint) -> list[tuple[str, object, str, str]]:
    """[(cell id, Cell, teacher id, fingerprint)] for the study's cells, without touching pin.json."""
    fp_of = _fingerprinter(data_fingerprint)
    out, seen = [], {}
    for cell in study.cells:
        fp = fp_of(cell.config["data"])
        ident = identity(cell.config)
        tid = _teacher_id(ident, fp)
        cid = sha({"config": ident, "data_fingerprint": fp, "teacher": tid})[:12]
        if cid in seen:
            raise ValueError(f"cells {seen[cid]} and {cell.index} of study {study.name!r} have the "
                             f"same id {cid}: they differ only in settings that do not change "
                             f"numbers (such as data.path); remove one of them")
        seen[cid] = cell.index
        out.append((cid, cell, tid, fp))
    return out
