"""Local file I/O shared by every writer: atomic saves (temp file + fsync + rename, so a crash never
leaves a half file under the final name), the one checkpoint reader, and the EMA update.

Results (Parquet, pin.json) go through ``harness.store.results`` instead, which speaks pyarrow
filesystems; this module is for local caches and checkpoints.
"""
from __future__ import annotations

import json
import os

import torch

from harness.base.digest import file_sha256
from harness.base.safefs import replace_atomic


class CheckpointError(ValueError):
    """A checkpoint or cache file that cannot be used: the message names it and the fix."""


def _atomic(path: str, write, before_rename=None) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    replace_atomic(path, write, before_rename)


def save_atomic(obj, path: str) -> None:
    """``torch.save`` to ``path`` atomically."""
    _atomic(path, lambda fh: torch.save(obj, fh))


DIGEST_SUFFIX = ".sha256"


def _digests(path: str) -> list[str]:
    """The digests recorded beside ``path`` (``path.sha256``: the newest first, the one before
    it second, so a crash between writing the digest and renaming the file still verifies)."""
    try:
        with open(path + DIGEST_SUFFIX, "rb") as fh:
            doc = json.loads(fh.read(4096))
        return [d for d in doc["sha256"] if isinstance(d, str)][:2]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def save_checkpoint(obj, path: str) -> None:
    """``torch.save`` to ``path`` atomically, with its sha256 recorded in ``path.sha256``
    (see :func:`checkpoint_ok`): a bit flip in storage is caught before a resume uses it."""
    def record_digest(tmp: str) -> None:  # before the rename: see _digests
        write_json_atomic({"sha256": [file_sha256(tmp)] + _digests(path)[:1]}, path + DIGEST_SUFFIX)

    _atomic(path, lambda fh: torch.save(obj, fh), record_digest)


def checkpoint_ok(path: str, digest: str | None = None) -> bool:
    """Whether ``path`` (or bytes with sha256 ``digest``) matches the digest recorded beside it;
    a checkpoint with no recorded digest (written before digests existed) counts as good."""
    recorded = _digests(path)
    return not recorded or (digest or file_sha256(path)) in recorded


def write_json_atomic(obj, path: str) -> None:
    _atomic(path, lambda fh: fh.write((json.dumps(obj, indent=1) + "\n").encode()))


def load_torch(path: str) -> dict:
    """A harness checkpoint or cache file (tensors and plain data only: ``weights_only``)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a truncated or foreign file
        raise CheckpointError(f"checkpoint {path!r} is unreadable ({type(e).__name__}: {e}). "
                              "It is corrupt or not a harness file: move it aside and run again "
                              "to recompute it from the start.") from None


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, beta: float) -> None:
    """``ema <- beta * ema + (1 - beta) * model``, parameter by parameter."""
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p, 1 - beta)
