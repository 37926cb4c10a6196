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
import posixpath
import uuid

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

ROWS = pa.schema([
    ("study", pa.string()),
    ("cell", pa.string()),  # cell id, or ``ref-...`` for reference rows
    ("loss", pa.string()),  # loss label (config.loss_label), "reference" for reference rows
    ("init", pa.string()),  # init label (config.init_label), or the reference's name
    ("init_scheme", pa.string()),
    ("reset_groups", pa.string()),  # '+'-joined, null unless reset_layers
    ("sigma_feat", pa.float64()),  # null unless feature_transplant
    ("seed", pa.int64()),
    ("axes", pa.string()),  # JSON {axis path: value} of every grid axis of the cell
    ("kimg", pa.float64()),
    ("step", pa.int64()),
    ("metric", pa.string()),  # carries its protocol: fd_digits_1k, mmd_toy2d_1k, img_per_s ...
    ("value", pa.float64()),
    ("protocol", pa.string()),  # how the metric was computed, in words
    ("wall_s", pa.float64()),  # the cell's own compute seconds so far
    ("status", pa.string()),  # running | done | diverged | failed | reference
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
STATUSES = ("running", "done", "diverged", "failed", "reference")
KEY = ["cell", "kimg", "metric"]


def filesystem(root: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it for a local path or a URI (s3://, file://)."""
    if "://" in root:
        return pafs.FileSystem.from_uri(root)
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
    return _write(root, "rows", pa.Table.from_pylist(rows, schema=ROWS))


def write_samples(root: str, meta: dict, array) -> str:
    """Store one evaluation's samples: ``array`` is a numpy array (uint8 images or 2-D points)."""
    row = {**{n: None for n in SAMPLES.names}, **meta, "shape": list(array.shape),
           "data": array.tobytes(), "dtype": str(array.dtype), "written_at": now()}
    return _write(root, "samples", pa.Table.from_pylist([row], schema=SAMPLES))


def _read(root: str, kind: str, schema: pa.Schema) -> pa.Table:
    fs, base = filesystem(root)
    folder = posixpath.join(base, kind)
    info = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    files = sorted(i.path for i in info if i.type == pafs.FileType.File
                   and posixpath.basename(i.path).startswith("part-")
                   and i.path.endswith(".parquet"))
    if not files:
        return schema.empty_table()
    tables = [pq.read_table(f, filesystem=fs, schema=schema) for f in files]
    return pa.concat_tables(tables)


def load_rows(root: str):
    """All rows as a pandas DataFrame, repeated (cell, kimg, metric) rows resolved to the newest."""
    df = _read(root, "rows", ROWS).to_pandas()
    if df.empty:
        return df
    df = df.sort_values("written_at", kind="stable")
    return df.drop_duplicates(KEY, keep="last").reset_index(drop=True)


def load_samples(root: str):
    """Stored samples as a DataFrame; decode one with ``decode_samples(row)``."""
    df = _read(root, "samples", SAMPLES).to_pandas()
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
    for cell, status in df.loc[df.status != "reference", ["cell", "status"]].itertuples(index=False):
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
    for kind, schema, load in (("rows", ROWS, load_rows), ("samples", SAMPLES, load_samples)):
        folder = posixpath.join(base, kind)
        info = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
        old = [i.path for i in info if i.type == pafs.FileType.File
               and posixpath.basename(i.path).startswith("part-")]
        before += len(old)
        if len(old) <= 1:
            after += len(old)
            continue
        table = pa.Table.from_pandas(load(root), schema=schema, preserve_index=False)
        _write(root, kind, table)
        for path in old:
            fs.delete_file(path)
        after += 1
    return before, after


def read_bytes(root: str, name: str) -> bytes | None:
    fs, base = filesystem(root)
    path = posixpath.join(base, name)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes_atomic(root: str, name: str, data: bytes) -> None:
    """Replace ``root/name`` atomically (for pin.json and similar small documents)."""
    fs, base = filesystem(root)
    path = posixpath.join(base, name)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    tmp = posixpath.join(posixpath.dirname(path), f".{posixpath.basename(path)}.{uuid.uuid4().hex[:8]}")
    with fs.open_output_stream(tmp) as out:
        out.write(data)
    fs.move(tmp, path)


