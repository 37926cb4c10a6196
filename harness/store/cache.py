"""Where teachers, feature extractors and mapping_match nets are cached: one resolver
(``cache_for``) for every command, and the check that the cache is a local folder
(``cache_folder``). No torch, no Ray."""
from __future__ import annotations

import os

from harness.declare.config import ConfigError


def cache_for(root: str | None, log=print) -> str:
    """THE cache resolver (teachers, extractors, mapping_match nets) of every command:
    ``$HARNESS_CACHE`` if set, else ``<results root>/cache`` for a local root (``harness run``,
    ``harness cell --out ROOT``: the same root finds the same teachers), else
    ``~/.cache/harness`` (a remote root, said in a note: every Ray node must see that path)."""
    if os.environ.get("HARNESS_CACHE"):  # a local or mounted folder; s3:// is a user error
        return cache_folder(os.environ["HARNESS_CACHE"])
    if root is not None and "://" not in root:
        return cache_folder(os.path.join(root, "cache"), "the cache under the results root")
    path = os.path.expanduser("~/.cache/harness")
    if root is not None:
        log(f"note: teachers are cached in {path} (HARNESS_CACHE is not set and the results root "
            f"{root} is not a local folder): every Ray node must see the same cache at that path")
    return path


def cache_folder(value: str, where: str = "HARNESS_CACHE") -> str:
    """The teacher and extractor cache as an absolute local folder; an object-store URI is a
    user error (``config.ConfigError``, exit 2): torch and torch-fidelity open cache files by
    path, so the cache cannot live on S3."""
    if "://" in value and not value.startswith("file://"):
        raise ConfigError(where, (
            f"{value!r} is an object-store URI, but the cache of teachers and feature "
            f"extractors must be a folder on the filesystem (torch and torch-fidelity open its "
            f"files by path); only the results root (--results / results:) may be s3://. Set "
            f"{where} to a local folder, on a Ray cluster to a shared mount that every node sees "
            f"at the same path (NFS, or the bucket mounted with a FUSE tool such as "
            f"mountpoint-s3), or leave it unset (`harness run` then uses <results root>/cache "
            f"for a local results root, ~/.cache/harness otherwise). Nothing was run."))
    path = os.path.abspath(os.path.expanduser(value.removeprefix("file://")))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(where, f"{path} exists and is a file, but the cache of teachers and "
                                 f"feature extractors is a folder. Set {where} to a folder (or "
                                 f"leave it unset), or move that file aside. Nothing was run.")
    return path
