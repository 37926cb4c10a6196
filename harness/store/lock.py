"""The study lock: one ``harness run`` per results root at a time (``root/.lock``).

- Local roots (and ``file://``): exclusive create (``O_CREAT|O_EXCL``).
- ``s3://`` roots: S3 conditional writes through boto3 (``pip install 'harness[s3]'``): the lock
  is created with ``PutObject`` + ``If-None-Match: *``, which the store refuses (412) when the
  object exists, so of two runs racing for it exactly one wins; a stale lock is taken over with
  ``If-Match: <its ETag>`` (only one contender can replace that version) and released with
  ``DeleteObject`` + ``If-Match``. The endpoint and credentials come from the standard AWS
  variables (``AWS_ENDPOINT_URL``, ...), as for pyarrow. Amazon S3 honours these conditions;
  an S3-compatible store that ignores ``If-None-Match`` silently turns this into the best-effort
  scheme below, and one that rejects it (501 NotImplemented) gets that scheme with a note.
- Other pyarrow filesystems (``gs://``, ``hdfs://``, and S3 without boto3): a best-effort check,
  write and re-read. The failure it accepts: two runs that start within the same moment can both
  see no lock, both write, and each read back its own write before the other's lands, so both run
  (their rows stay correct, being append-only; only the work is doubled).

A lock left by a dead process on this host is taken over. Pure Python (no torch, no Ray).
"""
from __future__ import annotations

import json
import os
import posixpath
import socket
import sys
import uuid

from harness.store import results
from harness.store.pins import location, utc_now

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


def process_start(pid: int) -> str | None:
    """An identity of the process ``pid`` that a reused PID does not share: this boot's id and
    the process's start time in clock ticks since boot (Linux ``/proc``); None elsewhere."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        with open(f"/proc/{int(pid)}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return f"{boot}/{fields[19]}"  # field 22 of stat: starttime
    except (OSError, IndexError, ValueError):
        return None


class Lock:
    """A held lock on a results root; a context manager that releases it on exit."""

    def __init__(self, root: str, path: str, info: dict, fs=None):
        self.root, self.path, self.info, self._fs = root, path, info, fs
        self.held = True
        results.held(root, True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
        return False

    def release(self):
        if not self.held:
            return
        self.held = False
        results.held(self.root, False)
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


QUIET_S, QUIET_MAX_S = 4.0, 60.0


def wait_for_quiet(root: str, quiet_s: float = QUIET_S, max_s: float = QUIET_MAX_S) -> None:
    """After taking over a dead driver's lock: its Ray workers can outlive it by a few seconds
    and still write rows. Wait until no new row file has appeared for ``quiet_s`` (at most
    ``max_s``), so this run plans from rows nobody else is still adding to."""
    import time

    folder = os.path.join(root, "rows")

    def count():
        try:
            return len(os.listdir(folder))
        except OSError:
            return 0

    start, last, seen = time.monotonic(), time.monotonic(), count()
    while time.monotonic() - last < quiet_s and time.monotonic() - start < max_s:
        time.sleep(0.25)
        now = count()
        if now != seen:
            seen, last = now, time.monotonic()


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
    if not isinstance(pid, int) or isinstance(pid, bool):
        return False
    if not _alive(pid):
        return True
    # alive, but a reused PID is another process: the lock records its holder's start
    recorded = info.get("process_start")
    return isinstance(recorded, str) and process_start(pid) not in (None, recorded)


def acquire_lock(root: str, cache: str | None = None, cluster: dict | None = None,
                 command: str | None = None) -> Lock:
    """Lock a study's results root (``root/.lock``) or raise LockedError naming the holder.
    ``cache``: the teacher cache this run uses, recorded so that ``harness status`` reports the
    teachers the running process sees (its ``HARNESS_CACHE`` may not be the reader's);
    ``cluster``: the CPUs and GPUs its Ray cluster has, so that status's ETA counts the cells
    that run at once there, not on the reader's machine; ``command``: what holds it (``harness
    tune``, ...), named by status.

    Local roots use exclusive create (O_CREAT|O_EXCL), ``s3://`` roots conditional writes, other
    pyarrow filesystems a best-effort check, write and re-read (see the module docstring). A lock
    left by a dead process on this host is taken over.
    """

    results.check_root(root)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": utc_now(),
            "process_start": process_start(os.getpid()),
            "token": uuid.uuid4().hex, **({"cache": cache} if cache else {}),
            **({"cluster": cluster} if cluster else {}),
            **({"command": command} if command else {})}
    payload = json.dumps(info).encode()
    import pyarrow.fs as pafs

    fs, base = results.filesystem(root)
    where = location(root, LOCK)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(base, exist_ok=True)
        path = os.path.join(base, LOCK)
        settled = False
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
                settled = True
                continue
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            if settled:
                wait_for_quiet(root)
            return Lock(root, path, info)
        raise _refuse(root, path, _holder(_read_lock(None, path)))

    path = posixpath.join(base, LOCK)
    if root.startswith("s3://"):
        try:
            return _acquire_s3(root, where, info, payload)
        except _NoConditions as e:
            print(f"note: {e}; the study lock of {root} is best-effort", file=sys.stderr)
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

    info = _holder(results.read_bytes(root, LOCK))
    return None if info is None or _is_stale(info) else info


# ---------------------------------------------------------------------------------------------
# S3: conditional writes (If-None-Match / If-Match) through boto3

class _NoConditions(Exception):
    """boto3 is missing, or the store rejects conditional requests."""


def _code(error) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


_GONE = ("NoSuchKey", "404")
_LOST = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409") + _GONE
_UNSUPPORTED = ("NotImplemented", "501")


def _s3_target(root: str):
    """(boto3 client, bucket, key of the lock) for an ``s3://bucket/prefix`` root."""
    from urllib.parse import urlsplit

    try:
        import boto3
    except ImportError:
        raise _NoConditions("boto3 is not installed (pip install 'harness[s3]')") from None
    url = urlsplit(root)
    prefix = url.path.strip("/")
    return boto3.client("s3"), url.netloc, f"{prefix}/{LOCK}" if prefix else LOCK


class _S3Lock(Lock):
    """A lock object that this process created; released only while it is that version."""

    def __init__(self, root, where, info, client, bucket, key, etag):
        super().__init__(root, where, info)
        self._client, self._bucket, self._key, self._etag = client, bucket, key, etag

    def _read(self) -> bytes | None:
        from botocore.exceptions import ClientError

        try:
            return self._client.get_object(Bucket=self._bucket, Key=self._key)["Body"].read()
        except ClientError as e:
            if _code(e) in _GONE:
                return None
            raise

    def release(self):
        if not self.held:
            return
        self.held = False
        results.held(self.root, False)
        from botocore.exceptions import ClientError

        try:
            self._client.delete_object(Bucket=self._bucket, Key=self._key, IfMatch=self._etag)
        except ClientError as e:
            if _code(e) in _LOST:  # not our version any more (taken over as stale): keep it
                return
            if _code(e) not in _UNSUPPORTED + ("InvalidArgument", "400"):
                raise
            current = _holder(self._read())  # no conditional delete here: check, then delete
            if current is not None and current.get("token") == self.info["token"]:
                self._client.delete_object(Bucket=self._bucket, Key=self._key)


def _acquire_s3(root: str, where: str, info: dict, payload: bytes) -> Lock:
    from botocore.exceptions import ClientError

    client, bucket, key = _s3_target(root)

    def put(**condition):
        """The new lock's ETag, or None when the condition failed (another run was first)."""
        try:
            return client.put_object(Bucket=bucket, Key=key, Body=payload, **condition)["ETag"]
        except ClientError as e:
            if _code(e) in _LOST:
                return None
            if _code(e) in _UNSUPPORTED:
                raise _NoConditions(f"the S3 store at {client.meta.endpoint_url} does not "
                                    f"support conditional writes ({_code(e)})") from None
            if _code(e) == "NoSuchBucket":
                raise FileNotFoundError(
                    f"the results root {root} is in bucket {bucket!r}, which does not exist at "
                    f"{client.meta.endpoint_url}: create the bucket, or check --results / "
                    f"results: and AWS_ENDPOINT_URL. Nothing was run.") from None
            raise

    for _ in range(5):
        etag = put(IfNoneMatch="*")
        if etag is not None:
            return _S3Lock(root, where, info, client, bucket, key, etag)
        try:
            held = client.get_object(Bucket=bucket, Key=key)
        except ClientError as e:
            if _code(e) in _GONE:
                continue  # released meanwhile: try again
            raise
        holder = _holder(held["Body"].read())
        if not _is_stale(holder):
            raise _refuse(root, where, holder)
        etag = put(IfMatch=held["ETag"])  # replace exactly the stale version, or lose the race
        if etag is not None:
            print(f"note: taking over the stale lock {where}: process {holder.get('pid')} on this "
                  f"host (since {holder.get('started_at')}) is gone", file=sys.stderr)
            return _S3Lock(root, where, info, client, bucket, key, etag)
    raise _refuse(root, where, _holder(_read_lock(*_pyarrow(root))))


def _pyarrow(root: str):

    fs, base = results.filesystem(root)
    return fs, posixpath.join(base, LOCK)
