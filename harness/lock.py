"""The study lock: one ``harness run`` per results root at a time (``root/.lock``).

Local roots use exclusive create; other pyarrow filesystems a best-effort check, write and
re-read. A lock left by a dead process on this host is taken over. Pure Python (no torch, no Ray).
"""
from __future__ import annotations

import json
import os
import posixpath
import socket
import sys
import uuid

from .pin import location, utc_now

LOCK = ".lock"


class LockedError(RuntimeError):
    """The study's results root is locked by another run."""



def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError):
        return False
    return True


class Lock:
    """A held lock on a results root; a context manager that releases it on exit."""

    def __init__(self, root: str, path: str, info: dict, fs=None):
        self.root, self.path, self.info, self._fs = root, path, info, fs
        self.held = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
        return False

    def release(self):
        if not self.held:
            return
        self.held = False
        try:
            current = json.loads(self._read() or b"null")
        except ValueError:
            current = None
        if isinstance(current, dict) and current.get("token") == self.info["token"]:
            if self._fs is None:
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
            else:
                self._fs.delete_file(self.path)

    def _read(self) -> bytes | None:
        return _read_lock(self._fs, self.path)


def _read_lock(fs, path) -> bytes | None:
    if fs is None:
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None
    import pyarrow.fs as pafs

    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return f.read()


def _holder(data: bytes | None) -> dict | None:
    try:
        info = json.loads((data or b"").decode())
    except (ValueError, UnicodeDecodeError):
        return None
    return info if isinstance(info, dict) else None


def _refuse(root: str, where: str, info: dict | None) -> LockedError:
    if info is None:
        who = "an unknown process (the lock file is unreadable)"
    else:
        who = (f"process {info.get('pid')} on host {info.get('host')}, running since "
               f"{info.get('started_at')}")
    return LockedError(
        f"The results of this study ({root}) are locked by {who}: another `harness run` of the "
        f"same study is using them, and two runs must not work on one study at once. Wait for it "
        f"to finish (or stop it); if that process is gone (for example its machine crashed), "
        f"delete the lock file {where} and run again.")


def _is_stale(info: dict | None) -> bool:
    if not info or info.get("host") != socket.gethostname():
        return False
    pid = info.get("pid")
    return isinstance(pid, int) and not isinstance(pid, bool) and not _alive(pid)


def acquire_lock(root: str) -> Lock:
    """Lock a study's results root (``root/.lock``) or raise LockedError naming the holder.

    Local roots use exclusive create (O_CREAT|O_EXCL); other pyarrow filesystems a best-effort
    check, write and re-read. A lock left by a dead process on this host is taken over.
    """
    from . import results

    info = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": utc_now(),
            "token": uuid.uuid4().hex}
    payload = json.dumps(info).encode()
    import pyarrow.fs as pafs

    fs, base = results.filesystem(root)
    where = location(root, LOCK)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(base, exist_ok=True)
        path = os.path.join(base, LOCK)
        for _ in range(3):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                data = _read_lock(None, path)
                if data is None:
                    continue  # released meanwhile
                holder = _holder(data)
                if not _is_stale(holder):
                    raise _refuse(root, path, holder) from None
                # move the stale lock aside; only one contender wins the rename
                aside = f"{path}.stale-{info['token']}"
                try:
                    os.rename(path, aside)
                except FileNotFoundError:
                    continue
                moved = _read_lock(None, aside)
                if moved != data:  # someone else's fresh lock: put it back
                    try:
                        os.link(aside, path)
                    except FileExistsError:
                        pass
                    os.unlink(aside)
                    raise _refuse(root, path, _holder(moved)) from None
                os.unlink(aside)
                print(f"note: taking over the stale lock {path}: process {holder.get('pid')} on "
                      f"this host (since {holder.get('started_at')}) is gone", file=sys.stderr)
                continue
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            return Lock(root, path, info)
        raise _refuse(root, path, _holder(_read_lock(None, path)))

    path = posixpath.join(base, LOCK)
    data = _read_lock(fs, path)
    if data is not None:
        holder = _holder(data)
        if not _is_stale(holder):
            raise _refuse(root, where, holder)
        print(f"note: taking over the stale lock {where}: process {holder.get('pid')} on this "
              f"host (since {holder.get('started_at')}) is gone", file=sys.stderr)
    results.write_bytes_atomic(root, LOCK, payload)
    if _read_lock(fs, path) != payload:  # lost a race
        raise _refuse(root, where, _holder(_read_lock(fs, path)))
    return Lock(root, path, info, fs)


def holder(root: str) -> dict | None:
    """Who holds the study lock, if a live process does (on another host: assumed live)."""
    from . import results

    info = _holder(results.read_bytes(root, LOCK))
    return None if info is None or _is_stale(info) else info
