"""Benchmark (not a test): figures from a synthetic store of 1,000,000 result rows.

    python -m analysis.bench_figures [--rows 1000000] [--keep DIR]

Builds 5 losses x 10 inits x 20 seeds x 5 learning rates (an extra grid axis) = 5000 cells,
x 50 evaluations (kimg) x 4 metrics = 1,000,000 rows in 5 Parquet files (ROWS schema), with
failed, diverged and orphaned cells, a pin.json and 8x8 samples for the seed-0 cells; then times
``load_rows`` and ``make_all`` and prints one line per step (load, aggregate and render per
figure). Target: under 15 s in total on 2 cores.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from analysis.figures import make_all
from harness.store.results import ROWS, SAMPLES, load_rows

LOSSES = ["di", "sid", "ratio_kl", "ratio_js", "ratio_rkl"]
INITS = [("teacher", "teacher", None, None), ("random", "random", None, None),
         ("reset_layers[output]", "reset_layers", "output", None),
         ("reset_layers[encoder+middle+decoder]", "reset_layers", "encoder+middle+decoder", None),
         ("reset_layers[input+output]", "reset_layers", "input+output", None)]
INITS += [(f"feature_transplant[{s:g}]", "feature_transplant", None, s)
          for s in (0.002, 0.02, 0.2, 2.5, 80.0)]
MULT = [1.0, 4.0, 1.1, 2.9, 1.6, 2.4, 2.1, 1.8, 1.3, 2.6]
METRICS = ["fd_digits_1k", "kid_digits_1k", "img_per_s", "peak_mem_mb"]


def build(root: str, n_rows: int = 1_000_000, seeds: int = 20, lrs=(1e-5, 3e-5, 1e-4, 3e-4, 1e-3),
          files: int = 5) -> int:
    rng = np.random.default_rng(0)
    cells = [(lo, i, s, lr) for lo in range(len(LOSSES)) for i in range(len(INITS))
             for s in range(seeds) for lr in lrs]
    n_kimg = max(2, n_rows // (len(cells) * len(METRICS)))
    kimgs = np.arange(n_kimg, dtype=float) * 2.0
    nc, nk, nm = len(cells), n_kimg, len(METRICS)
    c_idx = np.repeat(np.arange(nc), nk * nm)
    k_idx = np.tile(np.repeat(np.arange(nk), nm), nc)
    m_idx = np.tile(np.arange(nm), nc * nk)
    loss_i = np.array([c[0] for c in cells])[c_idx]
    init_i = np.array([c[1] for c in cells])[c_idx]
    seed = np.array([c[2] for c in cells])[c_idx]
    lr = np.array([c[3] for c in cells])[c_idx]
    final = (18 + 1.5 * loss_i) * np.array(MULT)[init_i] * (1 + 0.1 * np.abs(np.log10(lr) + 4))
    final = final * (1 + 0.03 * rng.standard_normal(len(c_idx)))
    frac = kimgs[k_idx] / kimgs[-1]
    fd = final + (300 - final) * np.exp(-5 * frac)
    value = np.where(m_idx == 0, fd, np.where(m_idx == 1, fd / 1000, np.where(
        m_idx == 2, 900 + rng.standard_normal(len(c_idx)), 2048.0)))
    fate = rng.random(nc)  # 2% failed, 1% diverged, 1% orphaned
    status = np.where(k_idx == nk - 1, "done", "running").astype(object)
    bad = (fate < 0.03)[c_idx] & (k_idx == nk - 1)
    status[bad] = np.where(fate[c_idx[bad]] < 0.02, "failed", "diverged")
    cell_ids = np.array([f"{LOSSES[lo]}-{i}-s{s}-lr{lr:g}" for lo, i, s, lr in cells], dtype=object)
    axes = np.array([json.dumps({"loss": LOSSES[lo], "init": INITS[i][0], "seed": s,
                                 "student.lr": lr}) for lo, i, s, lr in cells], dtype=object)
    init_arr = np.array([x[0] for x in INITS], dtype=object)
    cols = {
        "study": pa.array(np.full(len(c_idx), "bench", dtype=object)),
        "cell": pa.array(cell_ids[c_idx]),
        "loss": pa.array(np.array(LOSSES, dtype=object)[loss_i]),
        "init": pa.array(init_arr[init_i]),
        "init_scheme": pa.array(np.array([x[1] for x in INITS], dtype=object)[init_i]),
        "reset_groups": pa.array(np.array([x[2] for x in INITS], dtype=object)[init_i]),
        "sigma_feat": pa.array(np.array([np.nan if x[3] is None else x[3] for x in INITS])[init_i],
                               from_pandas=True),
        # the typed columns of harness.declare.config.cell_params (reinit matched for every reset and
        # transplant, reset_output false for transplants)
        "loss_family": pa.array(np.array(["ratio" if lo.startswith("ratio_") else lo
                                          for lo in LOSSES], dtype=object)[loss_i]),
        "reinit": pa.array(np.array([None if x[1] not in ("reset_layers", "feature_transplant")
                                     else "matched" for x in INITS], dtype=object)[init_i]),
        "reset_output": pa.array(np.array([False if x[1] == "feature_transplant" else None
                                           for x in INITS], dtype=object)[init_i]),
        "seed": pa.array(seed.astype(np.int64)),
        "axes": pa.array(axes[c_idx]),
        "kimg": pa.array(kimgs[k_idx]),
        "step": pa.array((kimgs[k_idx] * 1000 / 64).astype(np.int64)),
        "metric": pa.array(np.array(METRICS, dtype=object)[m_idx]),
        "value": pa.array(value),
        "protocol": pa.array(np.full(len(c_idx), "synthetic", dtype=object)),
        "wall_s": pa.array(kimgs[k_idx] * 3.0),
        "status": pa.array(status),
        "message": pa.nulls(len(c_idx), pa.string()),
        "version": pa.array(np.full(len(c_idx), "bench", dtype=object)),
        "written_at": pa.array(np.full(len(c_idx), np.datetime64("2024-01-01T00:00:00", "us")),
                               type=pa.timestamp("us", tz="UTC")),
    }
    for f in ROWS:  # every other typed column null
        cols.setdefault(f.name, pa.nulls(len(c_idx), f.type))
    table = pa.table(cols, schema=ROWS)
    os.makedirs(os.path.join(root, "rows"), exist_ok=True)
    step = -(-len(c_idx) // files)
    for f in range(files):
        pq.write_table(table.slice(f * step, step),
                       os.path.join(root, "rows", f"part-bench-{f:03d}.parquet"))
    refs = [{n: None for n in ROWS.names} | {
        "study": "bench", "cell": f"ref-{name}", "loss": "reference", "init": name, "seed": 0,
        "metric": "fd_digits_1k", "value": v, "status": "reference",
        "protocol": f"{name}; synthetic",
        "written_at": dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)}
        for name, v in (("teacher_heun35", 9.5), ("data_floor", 1.2))]
    pq.write_table(pa.Table.from_pylist(refs, schema=ROWS),
                   os.path.join(root, "rows", "part-bench-ref.parquet"))
    current = [c for c, f in zip(cell_ids, fate) if not 0.03 <= f < 0.04]
    with open(os.path.join(root, "pin.json"), "w") as f:
        json.dump({"current": current}, f)
    samples = []
    for ci, (lo, i, s, lr_) in enumerate(cells):
        if s == 0:
            arr = rng.integers(0, 255, size=(16, 1, 8, 8), dtype=np.uint8)
            samples.append({"study": "bench", "cell": cell_ids[ci], "loss": LOSSES[lo],
                            "init": INITS[i][0], "seed": 0, "kimg": kimgs[-1],
                            "shape": list(arr.shape), "data": arr.tobytes(), "dtype": "uint8",
                            "written_at": dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)})
    os.makedirs(os.path.join(root, "samples"), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(samples, schema=SAMPLES),
                   os.path.join(root, "samples", "part-bench-000.parquet"))
    return table.num_rows + len(refs)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--keep", help="build the store here and keep it")
    args = ap.parse_args(argv)

    tmp = args.keep or tempfile.mkdtemp(prefix="bench-figures-")
    try:
        t = time.perf_counter()
        n = build(tmp, args.rows)
        print(f"built {n:,} rows in {time.perf_counter() - t:.1f} s under {tmp}")
        t = time.perf_counter()
        rows = load_rows(tmp)
        t_load = time.perf_counter() - t
        timings: list = []
        t = time.perf_counter()
        paths = make_all(tmp, os.path.join(tmp, "figures"), timings=timings, rows=rows)
        t_all = time.perf_counter() - t
        print(f"\n{'step':44s} {'seconds':>8s}")
        print(f"{'load_rows (standalone)':44s} {t_load:8.2f}")
        for step, s in timings:
            print(f"{'make_all: ' + step:44s} {s:8.2f}")
        print(f"{'make_all total (incl. its own load)':44s} {t_all:8.2f}")
        print(f"{'load_rows + make_all':44s} {t_load + t_all:8.2f}")
        print(f"\n{len(rows):,} rows loaded, {len(paths)} files written")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
