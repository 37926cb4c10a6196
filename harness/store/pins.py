"""``pin.json``: every cell a study ever had, in its results root; the study lock is
``harness.store.lock``.

Entries are added, never changed, so results of unchanged cells stay valid when the YAML grows,
and cells that left the YAML are reported as orphaned. All I/O goes through
``harness.store.results`` (local paths and pyarrow filesystem URIs alike).
"""
from __future__ import annotations

import copy
import datetime as _dt
import json
from dataclasses import dataclass, field

from harness import __version__
from harness.declare import config as C
from harness.declare.hashing import PinError, compute_ids, identity
from harness.store import results

PIN = "pin.json"

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
    computed: list = field(default_factory=list, repr=False)  # hashing.compute_ids of the cells

    @property
    def ids(self) -> list[str]:
        return [i for i, _ in self.current]

    def teacher_of(self, cid: str) -> str:
        return self.document["cells"][cid]["teacher"]


def _not_ours(root: str, owner: str, study) -> str:
    return (f"{location(root, PIN)} belongs to study {C.cut(owner, 80)!r}, not {study.name!r}: "
            f"two studies cannot share one results root. Give this study its own `results:` path "
            f"in its YAML ({study.path or 'the study file'}) or --results, or fix its `study:` "
            f"name if it was renamed.")


def check_owner(root: str, study) -> None:
    """Refuse a results root that another study pinned (PinError), for the commands that only
    read it (``harness figures``, ``harness report``); a corrupt pin.json is left to them."""
    data = results.read_bytes(root, PIN)
    try:
        doc = json.loads(data.decode("utf-8")) if data is not None else None
    except (UnicodeDecodeError, ValueError):
        return
    owner = doc.get("study") if isinstance(doc, dict) else None
    if isinstance(owner, str) and owner != study.name:
        raise PinError(_not_ours(root, owner, study))


def results_to_read(study, given: str | None) -> str:
    """The results root ``harness figures`` and ``report`` read: a folder (or s3:// prefix) that
    exists and that no other study pinned, checked before anything is drawn or written."""
    root = given or study.results_root
    results.check_root(root, must_exist=True)
    check_owner(root, study)
    return root


def read_pin(root: str) -> dict | None:
    """The pin.json document of a results root, None if there is none; PinError if corrupt."""
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


def pin_study(study, root: str | None = None, data_fingerprint=None, *, write: bool = True,
              computed: list | None = None) -> Pin:
    """Pin the study's cells in ``root/pin.json`` (root defaults to ``study.results_root``).

    ``data_fingerprint``: the dataset's fingerprint (str), a ``{dataset name: fingerprint}``
    mapping, or a callable ``(data config) -> fingerprint`` (for studies with a data axis).
    Existing cell entries are never modified; new cells are added; ``current`` is set to the study's
    cells now. ``write=False`` computes the same answer without writing (dry runs, status).
    ``computed``: the study's ``compute_ids`` rows when the caller has them (each id is computed
    once per round of ``harness run``); pin.json itself is always read again.
    """
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
            raise PinError(_not_ours(root, doc["study"], study))
        before = copy.deepcopy(doc)
        for key, empty in (("current", []), ("teachers", {}), ("fingerprints", {})):
            doc.setdefault(key, empty)
        if doc.get("version") != __version__:
            notes.append(f"pin.json was written by harness {doc.get('version')}, this is "
                         f"{__version__}; cell ids are unchanged unless configs resolve differently")
    rows = compute_ids(study, data_fingerprint) if computed is None else computed
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
               new=new, orphaned=orphaned, teachers=teachers, notes=notes, document=doc,
               computed=rows)


def dumps(doc: dict) -> bytes:
    """pin.json text: sorted keys, two-space indent (entries re-serialise byte-identically)."""
    return (json.dumps(doc, sort_keys=True, indent=2, allow_nan=False) + "\n").encode()
