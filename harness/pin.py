"""The pinned matrix: cell and teacher ids and ``pin.json`` (DESIGN "The pinned matrix"); the
study lock is ``harness.lock``.

Pure Python (no torch, no Ray). A cell id is a short hash of the canonical JSON of everything that
changes the cell's numbers: the resolved sections ``data`` (less ``path``: the dataset's
fingerprint stands for its content, so the same files at another path give the same id),
``teacher`` and ``student`` (less ``channels_last`` and ``compile``, and ``teacher.precision``
when ``fp32``: see ``ADDED_LATER``), ``loss``, ``init``, ``eval`` and ``seed``, the dataset
fingerprint and the teacher id. Scheduling settings (``config.STUDY_ONLY``: resources,
max_failures) never enter.

``pin.json`` in the study's results root records every cell the study ever had; entries are
added, never changed, so results of unchanged cells stay valid when the YAML grows, and cells that
left the YAML are reported as orphaned. All I/O goes through ``harness.results`` (local paths and
pyarrow filesystem URIs alike); it is imported lazily so ``harness.study`` stays light.
"""
from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import json
import math
import os
import posixpath
from dataclasses import dataclass, field
from typing import Callable, Mapping

from . import __version__
from . import config as C, schema

PIN = "pin.json"
ID_SECTIONS = ("data", "teacher", "student", "loss", "init", "eval", "seed")
# settings that do not change numbers: file locations (data content is fingerprinted; the
# Inception weights are the one published file, named in each metric's protocol) and execution
# choices that agree to float rounding (memory layout, torch.compile: see harness.perf)
NOT_IDENTITY = schema.NOT_IDENTITY  # declared per setting in harness.schema (identity="no")
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


def _sha(obj) -> str:
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


_FILE_SHA: dict = {}


def file_sha256(path: str) -> str:
    """sha256 of a local file (memoised by path, size and mtime: teacher pickles are ~200 MB)."""
    path = os.path.abspath(os.path.expanduser(path))
    try:
        st = os.stat(path)
    except OSError:
        raise C.ConfigError("teacher.import", f"{path} does not exist or cannot be read: put the "
                                              f"EDM .pkl there (see README, Running on a "
                                              f"cluster) or fix teacher.import") from None
    key = (path, st.st_size, st.st_mtime_ns)
    if key not in _FILE_SHA:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _FILE_SHA[key] = h.hexdigest()
    return _FILE_SHA[key]


def _teacher_id(ident: dict, data_fingerprint: str) -> str:
    """``t-`` + hash of data, teacher section and fingerprint; an imported teacher: ``t-`` + the
    first 12 hex digits of its file's sha256 (the id ``teacher.load_imported`` reports)."""
    imported = ident["teacher"].get("import")
    if imported:
        return "t-" + imported[len("sha256:"):][:12]
    doc = {"data": ident["data"], "teacher": ident["teacher"], "data_fingerprint": data_fingerprint}
    return "t-" + _sha(doc)[:12]


def teacher_id(config: dict, data_fingerprint: str) -> str:
    """``t-`` + hash of the data config, the teacher section and the dataset fingerprint."""
    return _teacher_id(identity(config), data_fingerprint)


def cell_id(config: dict, data_fingerprint: str) -> str:
    """Hash of the resolved cell config, the dataset fingerprint and the teacher id."""
    ident = identity(config)
    doc = {"config": ident, "data_fingerprint": data_fingerprint,
           "teacher": _teacher_id(ident, data_fingerprint)}
    return _sha(doc)[:12]


# ---------------------------------------------------------------------------------------------
# pin.json

def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def location(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name


@dataclass
class Pin:
    study: str
    root: str
    current: list  # [(cell id, Cell)] in study order
    new: list  # ids pinned by this call
    orphaned: list  # ids in pin.json that are no longer in the study
    teachers: dict  # teacher id -> {data, teacher, data_fingerprint}
    notes: list = field(default_factory=list)  # drift: harness version, dataset fingerprints
    document: dict = field(default_factory=dict, repr=False)  # pin.json as written

    @property
    def ids(self) -> list[str]:
        return [i for i, _ in self.current]

    def teacher_of(self, cid: str) -> str:
        return self.document["cells"][cid]["teacher"]


def read_pin(root: str) -> dict | None:
    """The pin.json document of a results root, None if there is none; PinError if corrupt."""
    from . import results

    where = location(root, PIN)
    data = results.read_bytes(root, PIN)
    if data is None:
        return None
    fix = ("It is not safe to overwrite it. Move it aside (e.g. rename it to pin.json.bad) and run "
           "again: the study is re-pinned from its YAML and finished results are kept (cell ids "
           "come from the configs), but cells that are no longer in the YAML will not be listed "
           "as orphaned.")
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise PinError(f"{where} is not valid JSON ({e}). {fix}") from None
    problems = []
    if not isinstance(doc, dict):
        problems.append(f"expected a JSON object, got {type(doc).__name__}")
    else:
        if not isinstance(doc.get("study"), str):
            problems.append("'study' is missing or not a string")
        if not isinstance(doc.get("cells"), dict):
            problems.append("'cells' is missing or not an object")
        elif not all(isinstance(v, dict) and isinstance(v.get("config"), dict)
                     for v in doc["cells"].values()):
            problems.append("an entry of 'cells' is not an object with a 'config'")
        for key, kind in (("current", list), ("teachers", dict), ("fingerprints", dict)):
            if key in doc and not isinstance(doc[key], kind):
                problems.append(f"'{key}' is not a JSON {kind.__name__}")
    if problems:
        raise PinError(f"{where} is not a pin file: {'; '.join(problems)}. {fix}")
    return doc


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
        cid = _sha({"config": ident, "data_fingerprint": fp, "teacher": tid})[:12]
        if cid in seen:
            raise ValueError(f"cells {seen[cid]} and {cell.index} of study {study.name!r} have the "
                             f"same id {cid}: they differ only in settings that do not change "
                             f"numbers (such as data.path); remove one of them")
        seen[cid] = cell.index
        out.append((cid, cell, tid, fp))
    return out


def pin_study(study, root: str | None = None, data_fingerprint=None, *, write: bool = True) -> Pin:
    """Pin the study's cells in ``root/pin.json`` (root defaults to ``study.results_root``).

    ``data_fingerprint``: the dataset's fingerprint (str), a ``{dataset name: fingerprint}``
    mapping, or a callable ``(data config) -> fingerprint`` (for studies with a data axis).
    Existing cell entries are never modified; new cells are added; ``current`` is set to the study's
    cells now. ``write=False`` computes the same answer without writing (dry runs, status).
    """
    from . import results

    root = study.results_root if root is None else root
    if data_fingerprint is None:
        raise TypeError("pin_study: data_fingerprint is required")
    doc = read_pin(root)
    notes = []
    if doc is None:
        doc = {"study": study.name, "version": __version__, "updated_at": None, "current": [],
               "cells": {}, "teachers": {}, "fingerprints": {}}
        before = None
    else:
        if doc["study"] != study.name:
            raise PinError(f"{location(root, PIN)} belongs to study {C.cut(doc['study'], 80)!r}, "
                           f"not {study.name!r}: two studies cannot share one results root. Give "
                           f"this study its own `results:` path in its YAML "
                           f"({study.path or 'the study file'}) or --results, or fix its "
                           f"`study:` name if it was renamed.")
        before = copy.deepcopy(doc)
        for key, empty in (("current", []), ("teachers", {}), ("fingerprints", {})):
            doc.setdefault(key, empty)
        if doc.get("version") != __version__:
            notes.append(f"pin.json was written by harness {doc.get('version')}, this is "
                         f"{__version__}; cell ids are unchanged unless configs resolve differently")
    rows = compute_ids(study, data_fingerprint)
    stamp = utc_now()
    new, teachers, fingerprints = [], {}, {}
    for cid, cell, tid, fp in rows:
        ident = identity(cell.config)
        teachers[tid] = {"data": ident["data"], "teacher": ident["teacher"], "data_fingerprint": fp}
        fingerprints[cell.config["data"]["name"]] = fp
        if cid not in doc["cells"]:
            new.append(cid)
            doc["cells"][cid] = {"axes": copy.deepcopy(cell.axes), "config": copy.deepcopy(cell.config),
                                 "teacher": tid, "data_fingerprint": fp, "pinned_at": stamp}
        if tid not in doc["teachers"]:
            doc["teachers"][tid] = copy.deepcopy(teachers[tid])
    for name, fp in fingerprints.items():
        old = doc["fingerprints"].get(name)
        if old is not None and old != fp:
            notes.append(f"dataset {name!r} changed (fingerprint {old} -> {fp}): its cells get new "
                         f"ids, the old ones are orphaned")
        doc["fingerprints"][name] = fp
    current = [cid for cid, *_ in rows]
    previous = [cid for cid in doc["current"] if isinstance(cid, str)]
    doc["current"] = current
    doc["version"] = __version__
    # orphans: those current last time in their old order, then older ones by id
    now_ids = set(current)
    orphaned = list(dict.fromkeys(
        [c for c in previous if c in doc["cells"] and c not in now_ids]
        + sorted(c for c in doc["cells"] if c not in now_ids)))
    if before is None or {**doc, "updated_at": None} != {**before, "updated_at": None}:
        doc["updated_at"] = stamp
        if write:
            results.write_bytes_atomic(root, PIN, dumps(doc))
    return Pin(study=study.name, root=root, current=[(cid, cell) for cid, cell, *_ in rows],
               new=new, orphaned=orphaned, teachers=teachers, notes=notes, document=doc)


def dumps(doc: dict) -> bytes:
    """pin.json text: sorted keys, two-space indent (entries re-serialise byte-identically)."""
    return (json.dumps(doc, sort_keys=True, indent=2, allow_nan=False) + "\n").encode()
