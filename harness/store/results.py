"""The append-only results store: tidy Parquet rows and uint8 sample grids.

Layout under a study's results root (a local folder or any pyarrow filesystem URI)::

    rows/part-<utc>-<uuid>.parquet      one (cell, kimg, metric) per row, schema ROWS
    samples/part-<utc>-<uuid>.parquet   uint8 samples per (cell, kimg), schema SAMPLES

Every write is a new, uniquely named file written under a dot-temp name and renamed into place,
so concurrent writers and crashes never leave a half file visible and nothing is overwritten.
Loading drops rows repeated by a resumed cell, keeping the newest ``written_at``.
No torch and no Ray here: analysis reads results through this module alone.
"""
from __future__ import annotations

import datetime as _dt
import json
import posixpath
import sys
import uuid

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from harness.declare.config import (
    cell_params,
    cut,
    init_label,
    loss_label,
    param_columns,
)
from harness.store import environment

_ARROW = {str: pa.string(), float: pa.float64(), int: pa.int64(), bool: pa.bool_()}
ROWS = pa.schema([
    ("study", pa.string()),
    ("cell", pa.string()),  # cell id, or ``ref-...`` for reference rows
    ("loss", pa.string()),  # loss label (config.loss_label), "reference" for reference rows
    ("init", pa.string()),  # init label (config.init_label), or the reference's name
    # one typed column per loss/init parameter, declared in harness.declare.config (null where the
    # cell's scheme has no such parameter): loss_family, init_scheme, reset_groups ('+'-joined),
    # reinit, sigma_feat, ...
    *((col, _ARROW[kind]) for col, kind in param_columns().items()),
    ("seed", pa.int64()),
    ("axes", pa.string()),  # JSON {axis path: value} of every grid axis of the cell
    ("kimg", pa.float64()),
    ("step", pa.int64()),
    ("metric", pa.string()),  # carries its protocol: fd_digits_1k, mmd_toy2d_1k, img_per_s ...
    ("value", pa.float64()),
    ("protocol", pa.string()),  # how the metric was computed, in words
    ("wall_s", pa.float64()),  # the cell's own compute seconds so far
    ("status", pa.string()),  # running | done | diverged | failed | reference | tuning
    ("message", pa.string()),  # why a cell failed or diverged; null otherwise
    ("version", pa.string()),
    ("written_at", pa.timestamp("us", tz="UTC")),
])
SAMPLES = pa.schema([
    ("study", pa.string()),
    ("cell", pa.string()),
    ("loss", pa.string()),
    ("init", pa.string()),
    ("seed", pa.int64()),
    ("kimg", pa.float64()),
    ("shape", pa.list_(pa.int64())),  # N, C, H, W (toy2d: N, 2)
    ("data", pa.binary()),  # uint8 bytes; toy2d: float32 bytes of the points
    ("dtype", pa.string()),
    ("written_at", pa.timestamp("us", tz="UTC")),
])
BOOKKEEPING = ("img_per_s", "peak_mem_mb", "generator_params", "aux_params", "diverged", "failed")
"""Metric rows that describe a run, not its samples' quality."""
STATUSES = ("running", "done", "diverged", "failed", "reference", "tuning")
"""``tuning``: an evaluation of a ``harness tune`` trial (harness.store.tuning), never a cell's."""
KEY = ["cell", "kimg", "metric", "protocol"]
"""A row is one (cell, kimg, metric) under one protocol: `harness rescore` adds rows under a new
protocol beside the old ones; a resumed cell's repeated rows resolve to the newest."""


GCS_RETRY_S = 15
"""How long a ``gs://`` root's requests are retried before the error reaches the user (pyarrow's
own ``retry_limit_seconds``)."""


class RootError(ValueError):
    """A results root that cannot hold results (for example an existing file)."""


def unreachable(root: str, e: OSError) -> RootError:
    return RootError(f"the results root {root} cannot be reached ({cut(str(e), 300)}): check "
                     f"the address, the network and the credentials (AWS_* for s3://, README: "
                     f"results on S3; Google's application default credentials for gs://). "
                     f"Nothing was read or written.")


def check_root(root: str, must_exist: bool = False) -> None:
    """Refuse, before anything is written, a results root that exists but is not a folder, one
    that cannot be reached, and (``must_exist``: commands that only read) one that is absent."""
    fs, base = filesystem(root)
    try:
        kind = fs.get_file_info(base).type
    except OSError as e:
        raise unreachable(root, e) from None
    if kind not in (pafs.FileType.NotFound, pafs.FileType.Directory):
        raise RootError(f"the results root {root} exists and is a file, not a folder: results "
                        f"cannot be stored there. Give the study another `results:` path (or "
                        f"--results), or move that file aside.")
    if must_exist and kind == pafs.FileType.NotFound:
        raise RootError(f"there are no results at {root}: the folder does not exist. Run "
                        f"`harness run` on the study first, or give --results the folder it "
                        f"wrote (the study's `results:` path by default). Nothing was written.")


def filesystem(root: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it for a local path or a URI (s3://, gs://,
    file://).

    ``s3://`` takes its endpoint, credentials and region from the standard AWS variables
    (``AWS_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL_S3`` for an S3-compatible store,
    ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``), which pyarrow's
    ``FileSystem.from_uri`` honours itself (``AWS_ENDPOINT_URL`` since Arrow 13, the ``_S3``
    form since 15; checked in tests/test_s3.py), as do Ray's storage and boto3. ``gs://`` retries a
    failing request for at most ``GCS_RETRY_S`` unless the URI sets ``retry_limit_seconds``."""
    if "://" in root:
        uri = root
        if root.startswith("gs://") and "retry_limit_seconds=" not in root:
            # without it, Google's client retries a missing credential for minutes before it
            # says so; a URI that sets its own limit keeps it
            uri += ("&" if "?" in root else "?") + f"retry_limit_seconds={GCS_RETRY_S:g}"
        try:
            return pafs.FileSystem.from_uri(uri)
        except pa.ArrowInvalid as e:
            raise RootError(f"the results root {root} is not an address pyarrow can open "
                            f"({cut(str(e), 300)}); give a local folder, an s3://bucket/prefix "
                            f"or another pyarrow filesystem URI (gs://, hdfs://).") from None
        except OSError as e:
            raise unreachable(root, e) from None
    return pafs.LocalFileSystem(), posixpath.abspath(root)


def now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _write(root: str, kind: str, table: pa.Table) -> str:
    fs, base = filesystem(root)
    folder = posixpath.join(base, kind)
    fs.create_dir(folder, recursive=True)
    name = f"part-{now():%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:8]}.parquet"
    tmp, final = posixpath.join(folder, "." + name), posixpath.join(folder, name)
    with fs.open_output_stream(tmp) as out:
        pq.write_table(table, out)
    fs.move(tmp, final)
    return final


def write_rows(root: str, rows: list[dict]) -> str | None:
    """Append rows (dicts keyed by ROWS' names; missing keys are null) as one new file."""
    if not rows:
        return None
    stamp = now()
    rows = [{**{n: None for n in ROWS.names}, "written_at": stamp, **r} for r in rows]
    bad = {r["status"] for r in rows} - set(STATUSES)
    if bad:
        raise ValueError(f"unknown status {sorted(bad)}; known: {STATUSES}")
    record_versions(root)
    return _write(root, "rows", pa.Table.from_pylist(rows, schema=ROWS))


_VERSIONS_RECORDED: set = set()  # results roots this process has recorded its versions in


def record_versions(root: str) -> None:
    """``versions/<hash>.json`` for this process's software (``harness.store.environment``), once per
    process and root; the same set of versions is the same file, so nothing races."""
    name, data = environment.record()
    if (root, name) in _VERSIONS_RECORDED:
        return
    if read_bytes(root, f"{environment.FOLDER}/{name}") is None:
        write_bytes_atomic(root, f"{environment.FOLDER}/{name}", data)
    _VERSIONS_RECORDED.add((root, name))


def load_versions(root: str) -> list[dict]:
    """The version sets recorded under ``root`` (``record_versions``), unreadable files skipped."""
    fs, base = filesystem(root)
    info = fs.get_file_info(pafs.FileSelector(posixpath.join(base, environment.FOLDER),
                                              allow_not_found=True))
    out = []
    for i in sorted(info, key=lambda i: i.path):
        if i.type != pafs.FileType.File or not i.path.endswith(".json"):
            continue
        try:
            with fs.open_input_stream(i.path) as f:
                doc = json.loads(f.read().decode())
        except (OSError, ValueError):
            continue
        ok = isinstance(doc, dict) and isinstance(doc.get("recorded_at", ""), str) and \
            isinstance(doc.get("versions"), dict) and \
            all(v is None or isinstance(v, str) for v in doc["versions"].values())
        if ok:  # anything else is not ours (or was edited): left out, never a crash
            out.append(doc)
    return out


SAMPLE_KINDS = ("samples", "final")
"""``samples``: the first ``eval.samples`` of every evaluation (grids); ``final``: all ``eval.n``
samples of a cell's final evaluation (``eval.final_samples``), what ``harness rescore`` reads."""


def write_samples(root: str, meta: dict, array, kind: str = "samples") -> str:
    """Store one evaluation's samples: ``array`` is a numpy array (uint8 images or 2-D points)."""
    assert kind in SAMPLE_KINDS, kind
    row = {**{n: None for n in SAMPLES.names}, **meta, "shape": list(array.shape),
           "data": array.tobytes(), "dtype": str(array.dtype), "written_at": now()}
    return _write(root, kind, pa.Table.from_pylist([row], schema=SAMPLES))


def part_files(fs, folder: str) -> list[str]:
    """The ``part-*.parquet`` files of a store folder (``rows``, ``samples``, ...), sorted."""
    info = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    return sorted(i.path for i in info if i.type == pafs.FileType.File
                  and posixpath.basename(i.path).startswith("part-")
                  and i.path.endswith(".parquet"))


def _read(root: str, kind: str, schema: pa.Schema) -> pa.Table:
    fs, base = filesystem(root)
    files = part_files(fs, posixpath.join(base, kind))
    if not files:
        return schema.empty_table()
    return read_parts(fs, files, schema)


QUARANTINE = "quarantine"


def read_parts(fs, files: list[str], schema: pa.Schema, filters=None) -> pa.Table:
    """The part files as one table. A part that cannot be read (truncated by a full disk, a
    bit flip, a foreign file) is moved into ``<store>/quarantine/`` (never read again; left in
    place where the root is read-only) with a note naming it, and every other row is used."""
    tables = []
    for f in files:
        try:
            tables.append(pq.read_table(f, filesystem=fs, schema=schema, filters=filters))
        except (pa.ArrowException, OSError, ValueError) as e:
            _quarantine(fs, f, f"{type(e).__name__}: {cut(str(e), 160)}")
    return pa.concat_tables(tables) if tables else schema.empty_table()


HELD: set[str] = set()
"""The stores (``filesystem(root)[1]``) whose study lock this process holds (``lock.Lock``):
only there is an unreadable part moved; a reader without the lock (status, figures, report, a
worker) writes nothing and leaves it in place."""


def held(root: str, hold: bool) -> None:
    """Record that this process took (``hold``) or released the lock of ``root``'s store; the
    key is the path inside its filesystem, as ``filesystem`` gives it, found without opening one
    (an s3:// root would cost a request)."""
    base = (root.split("://", 1)[1] if "://" in root else posixpath.abspath(root)).rstrip("/")
    if hold:
        HELD.add(base)
    else:
        HELD.discard(base)


def _quarantine(fs, path: str, why: str) -> None:
    folder = posixpath.join(posixpath.dirname(path), QUARANTINE)
    target = posixpath.join(folder, posixpath.basename(path))
    if posixpath.dirname(posixpath.dirname(path)).rstrip("/") not in HELD:
        where = ("left in place (moved aside by the next command that holds the study's lock: "
                 "harness run, tune, compact or rescore)")
    else:
        try:
            fs.create_dir(folder, recursive=True)
            fs.move(path, target)
            where = f"moved to {target}"
        except OSError:
            where = "left in place (the results root is not writable)"
    print(f"note: the results file {path} is unreadable ({why}); {where} and left out: every "
          f"other row is used. Delete it once inspected; the cells it held rerun or resume "
          f"as needed.", file=sys.stderr)


def load_rows(root: str):
    """All rows as a pandas DataFrame, repeated (cell, kimg, metric) rows resolved to the newest."""
    df = _read(root, "rows", ROWS).to_pandas()
    if df.empty:
        return df
    df = df.sort_values("written_at", kind="stable")
    return df.drop_duplicates(KEY, keep="last").reset_index(drop=True)


def load_samples(root: str, kind: str = "samples"):
    """Stored samples as a DataFrame; decode one with ``decode_samples(row)``."""
    df = _read(root, kind, SAMPLES).to_pandas()
    if df.empty:
        return df
    df = df.sort_values("written_at", kind="stable")
    return df.drop_duplicates(["cell", "kimg"], keep="last").reset_index(drop=True)


def decode_samples(row):
    import numpy as np

    return np.frombuffer(row["data"], dtype=row["dtype"]).reshape(tuple(row["shape"]))


def cell_status(df) -> dict[str, str]:
    """Final status per cell from loaded rows: done > diverged > failed > running."""
    out = {}
    if df.empty:
        return out
    rank = {"done": 3, "diverged": 2, "failed": 1, "running": 0}
    for cell, status in df.loc[~df.status.isin(("reference", "tuning")),
                               ["cell", "status"]].itertuples(index=False):
        if rank[status] >= rank.get(out.get(cell), -1):
            out[cell] = status
    return out


def compact(root: str) -> tuple[int, int]:
    """Merge each store's part files into one (repeated rows resolved to the newest), then
    remove the merged files. Run it only while no cell writes (``harness compact`` holds the
    study lock). A crash in between leaves both copies; loading resolves them to one.
    Returns (files before, files after)."""
    fs, base = filesystem(root)
    before = after = 0
    stores = [("rows", ROWS, load_rows)] + [
        (kind, SAMPLES, lambda r, k=kind: load_samples(r, k)) for kind in SAMPLE_KINDS]
    for kind, schema, load in stores:
        folder = posixpath.join(base, kind)
        loaded = load(root)  # first: an unreadable part is quarantined, never merged or deleted
        old = part_files(fs, folder)
        before += len(old)
        if len(old) <= 1:
            after += len(old)
            continue
        table = pa.Table.from_pandas(loaded, schema=schema, preserve_index=False)
        _write(root, kind, table)
        for path in old:
            fs.delete_file(path)
        after += 1
    return before, after


SMALL_DOCUMENT_MAX = 256 << 20  # pin.json, the lock, cells.json: far smaller in any real study


def read_bytes(root: str, name: str, max_bytes: int = SMALL_DOCUMENT_MAX) -> bytes | None:
    """A small document of the root, None if absent; at most ``max_bytes`` are read (a link to
    ``/dev/zero`` or a huge planted file is a ``RootError``, not a hang)."""
    fs, base = filesystem(root)
    path = posixpath.join(base, name)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise RootError(f"{path} is larger than {max_bytes >> 20} MB, far more than the harness "
                        f"writes there; move it aside and run again")
    return data


def write_bytes_atomic(root: str, name: str, data: bytes) -> None:
    """Replace ``root/name`` atomically (for pin.json and similar small documents)."""
    fs, base = filesystem(root)
    path = posixpath.join(base, name)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    tmp = posixpath.join(posixpath.dirname(path), f".{posixpath.basename(path)}.{uuid.uuid4().hex[:8]}")
    with fs.open_output_stream(tmp) as out:
        out.write(data)
    fs.move(tmp, path)


def cell_columns(cfg: dict, study: str, cid: str, axes: dict) -> dict:
    """The columns that describe a cell on every one of its rows."""
    return {"study": study, "cell": cid, "loss": loss_label(cfg["loss"]),
            "init": init_label(cfg["init"]), **cell_params(cfg), "seed": int(cfg["seed"]),
            "axes": json.dumps(axes, sort_keys=True, default=str)}
