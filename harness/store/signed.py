"""Third-party state the harness must reload but cannot read as data: Ray Tune's experiment
folder (``tuner.pkl``, ``experiment_state-*.json`` with pickled fields, search-algorithm state,
``*.pkl`` in trial folders), which ``Tuner.restore`` unpickles and so would run any code planted
in it by whoever can write the results root, or by the author of a copied results folder.

The harness signs what it saw Ray write: a ledger ``<experiment>.harness-ledger.json`` beside the
folder holds, per state file, the HMAC-SHA256 of each version seen (recorded while the run goes
on and when it ends). The key is this user's own secret, 32 random bytes in
``~/.config/harness/state.key`` (mode 0600; ``HARNESS_KEY_FILE`` names another), never in the
results root, so nobody without the key can make a file verify, and a folder copied from
another user's machine never does. :func:`unverified` lists the state files whose current bytes
match no recorded version; the caller then does not restore but sets them aside and starts
afresh (the harness's own rows say what finished).

No torch, no Ray: pyarrow filesystems only, so local paths, NFS and ``s3://`` all work.
"""
from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import posixpath
import secrets

import pyarrow.fs as pafs

from harness.store import results as store

KEEP = 64  # recorded versions per file (Ray rewrites its experiment state every few seconds)


def key_path() -> str:
    return os.path.expanduser(os.environ.get("HARNESS_KEY_FILE")
                              or "~/.config/harness/state.key")


def _key() -> bytes:
    path = key_path()
    with contextlib.suppress(FileExistsError):
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
    with open(path, "rb") as f:
        key = f.read(4096)
    if len(key) < 16:
        raise ValueError(f"the harness key {path} holds {len(key)} bytes; delete it (a new one "
                         f"is made) or set HARNESS_KEY_FILE to a file of 32 random bytes")
    return key


def _is_state(rel: str) -> bool:
    """Files Ray may unpickle on restore: every top-level file of the experiment folder and any
    ``*.pkl`` below it, outside checkpoint folders (their files are the harness's own, read as
    data)."""
    parts = rel.split("/")
    if rel.endswith(".unverified"):
        return False
    if any(p.startswith("checkpoint_") for p in parts[:-1]):
        return False
    return len(parts) == 1 or rel.endswith(".pkl")


def _state_files(where: str) -> dict[str, pafs.FileInfo]:
    fs, base = store.filesystem(where)
    out = {}
    for info in fs.get_file_info(pafs.FileSelector(base, allow_not_found=True, recursive=True)):
        rel = posixpath.relpath(info.path, base)
        if info.type == pafs.FileType.File and _is_state(rel):
            out[rel] = info
    return out


def _ledger_name(where: str) -> tuple[str, str]:
    parent, name = posixpath.split(where.rstrip("/"))
    return parent, f"{name}.harness-ledger.json"


def _read_ledger(where: str) -> dict[str, list[str]]:
    parent, name = _ledger_name(where)
    try:
        raw = store.read_bytes(parent, name)
        doc = json.loads(raw) if raw and len(raw) < (64 << 20) else {}
    except (OSError, ValueError):
        doc = {}
    files = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(files, dict):
        return {}
    return {k: [m for m in v if isinstance(m, str)] for k, v in files.items()
            if isinstance(k, str) and isinstance(v, list)}


def _mac(key: bytes, fs, path: str) -> str:
    h = hmac.new(key, digestmod=hashlib.sha256)
    with fs.open_input_stream(path) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Ledger:
    """Records the MAC of every version of an experiment's state files (:meth:`record`)."""

    def __init__(self, where: str):
        self.where, self._seen = where, {}
        self._key = _key()

    def record(self) -> None:
        fs, _ = store.filesystem(self.where)
        files = _state_files(self.where)
        changed = {rel: info for rel, info in files.items()
                   if self._seen.get(rel) != (info.size, info.mtime_ns)}
        if not changed:
            return
        ledger = _read_ledger(self.where)
        for rel, info in changed.items():
            try:
                mac = _mac(self._key, fs, info.path)
            except OSError:  # replaced while read: the next record sees it
                continue
            versions = [m for m in ledger.get(rel, []) if m != mac]
            ledger[rel] = (versions + [mac])[-KEEP:]
            self._seen[rel] = (info.size, info.mtime_ns)
        parent, name = _ledger_name(self.where)
        store.write_bytes_atomic(parent, name, json.dumps({"files": ledger}, indent=0).encode())


def unverified(where: str) -> list[str]:
    """State files of the experiment at ``where`` whose bytes match no version in its ledger."""
    key = _key()
    ledger = _read_ledger(where)
    fs, _ = store.filesystem(where)
    bad = []
    for rel, info in sorted(_state_files(where).items()):
        try:
            ok = _mac(key, fs, info.path) in ledger.get(rel, ())
        except OSError:
            ok = False
        if not ok:
            bad.append(rel)
    return bad


def set_aside(where: str, files: list[str]) -> None:
    """Rename each state file ``F`` to ``F.unverified`` (kept for inspection, never read)."""
    fs, base = store.filesystem(where)
    for rel in files:
        path = posixpath.join(base, rel)
        fs.move(path, path + ".unverified")
