"""The sha256 digests the harness keys things by: a file's bytes (streamed; optionally memoised by
path, size and mtime, for files hashed again and again such as a 200 MB teacher pickle) and a
JSON document's canonical text (sorted keys). Cell and teacher ids use
``harness.declare.hashing.sha`` (its own canonical JSON, whose text ids were computed from)."""
from __future__ import annotations

import hashlib
import json
import os

_MEMO: dict[tuple, str] = {}


def file_sha256(path: str, memo: bool = False) -> str:
    """Hex sha256 of the file at ``path``, read in 4 MiB blocks. ``memo``: reuse the digest of
    the same (real path, size, mtime) in this process; never for a file whose damage is being
    checked (bit rot changes neither size nor mtime)."""
    key = None
    if memo:
        st = os.stat(path)
        key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
        if key in _MEMO:
            return _MEMO[key]
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    if key is not None:
        _MEMO[key] = h.hexdigest()
    return h.hexdigest()


def json_sha256(obj) -> str:
    """Hex sha256 of ``json.dumps(obj, sort_keys=True)`` (cache keys of derived files)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()
