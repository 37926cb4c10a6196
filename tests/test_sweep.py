"""The Ray Tune sweep (harness.orchestrate.sweep) end to end on tiny toy2d studies; all marked slow.

    python -m pytest -m slow tests/test_sweep.py -q -x

Shown here: a SIGKILLed driver resumes (done cells untouched, running cells continue from their
Ray checkpoint), retries up to max_failures then a failed row, divergence is final, a lost worker
node costs nothing, a grown study runs only its new cells and a changed one orphans the old,
and a results root given as a pyarrow URI works for write, load and resume.
"""
from __future__ import annotations

import functools
import glob
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import pyarrow.parquet as pq
import pytest

from conftest import reap_ray
from harness.declare import hashing
from harness.store import results
from harness.orchestrate.status import cell_states, fingerprints
from harness.declare.study import load_study
from harness.orchestrate.progress import checkpoint_files
from harness.orchestrate.sweep import run_study, study_status

pytestmark = pytest.mark.slow

TOY = """\
study: {name}
data: {{name: toy2d}}
teacher: {{kimg: 4}}
student: {{kimg: {kimg}, batch: 64}}
eval: {{n: 200, every_kimg: 0.5}}
"""


# ---------------------------------------------------------------------------------------------
# helpers (the injected cell functions are pickled by value: Ray workers cannot import tests/)

def write_study(folder, name, extra, kimg=2):
    path = pathlib.Path(folder) / f"{name}.yaml"
    path.write_text(TOY.format(name=name, kimg=kimg) + textwrap.dedent(extra))
    return str(path)


def ids_of(path):
    study = load_study(path)
    fp, _ = fingerprints(study)
    return [cid for cid, *_ in hashing.compute_ids(study, fp)], study


def raw_rows(root):
    """Every stored row, duplicates included (load_rows keeps only the newest)."""
    fs, base = results.filesystem(root)
    files = sorted(glob.glob(os.path.join(base, "rows", "part-*.parquet")))
    import pandas as pd

    return pd.concat([pq.read_table(f, schema=results.ROWS).to_pandas().assign(file=f)
                      for f in files], ignore_index=True)


def flaky_cell(cfg, root, cache, ckpt, *, attempts, fail_seed, fail_lr=None, after_kimg=0.0,
               once=False, **kw):
    """run_cell, except that the chosen cell raises at its first evaluation at kimg >=
    ``after_kimg`` (every attempt, or only the first with ``once``); attempts are logged."""
    from harness.orchestrate.cell import run_cell

    chosen = cfg["seed"] == fail_seed and fail_lr in (None, cfg["student"]["lr"])
    if chosen:
        with open(attempts, "a") as f:
            f.write(json.dumps({"resumed": os.path.exists(ckpt)}) + "\n")
        with open(attempts) as f:
            n = len(f.readlines())
    report = kw.pop("on_eval")

    def on_eval(ev):
        report(ev)
        if chosen and ev.kimg >= after_kimg and not (once and n > 1):
            raise RuntimeError(f"injected failure at kimg {ev.kimg:g}")

    return run_cell(cfg, root, cache, ckpt, on_eval=on_eval, **kw)


def diverging_cell(cfg, *args, diverge_lr, **kw):
    """flaky_cell, except that the cells at lr ``diverge_lr`` get a NaN generator loss: a real
    divergence of the training loop, with no lr that the study schema refuses."""
    from unittest import mock

    from harness.core import losses

    if cfg["student"]["lr"] != diverge_lr:
        return flaky_cell(cfg, *args, **kw)
    build = losses.build

    def nan_build(*a, **k):
        family = build(*a, **k)
        loss = family.generator_loss
        family.generator_loss = lambda x: loss(x) * float("nan")
        return family

    with mock.patch.object(losses, "build", nan_build):
        return flaky_cell(cfg, *args, **kw)


def slow_cell(cfg, root, cache, ckpt, *, delay, **kw):
    """run_cell with a pause after each evaluation, so a node can be removed mid-cell."""
    from harness.orchestrate.cell import run_cell

    report = kw.pop("on_eval")

    def on_eval(ev):
        report(ev)
        time.sleep(delay)

    return run_cell(cfg, root, cache, ckpt, on_eval=on_eval, **kw)


@pytest.fixture(scope="module", autouse=True)
def pickled_by_value():
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    import ray

    ray.shutdown()


@pytest.fixture(scope="session")
def cache(study_cache):
    return study_cache


@pytest.fixture
def local_ray(cache, monkeypatch):
    import logging

    import ray

    monkeypatch.setenv("HARNESS_CACHE", cache)
    if not ray.is_initialized():
        ray.init(num_cpus=2, log_to_driver=False, include_dashboard=False,
                 logging_level=logging.WARNING)
    yield


# ---------------------------------------------------------------------------------------------
# 1. a SIGKILLed driver (first: before any in-process Ray of this module starts)

def test_killed_driver_resumes(tmp_path, cache):
    study = write_study(tmp_path, "kill", "grid: {loss: [sid, ratio_kl], seed: [0, 1]}\n", kimg=6)
    root = str(tmp_path / "r")
    ray_tmp = tempfile.mkdtemp(prefix="rk", dir="/tmp")  # short: Ray's socket paths live here
    env = {**os.environ, "HARNESS_CACHE": cache, "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "harness.cli", "run", study, "--results", root]
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=tmp_path)
        deadline, done, running = time.time() + 300, set(), set()
        while time.time() < deadline and proc.poll() is None:
            df = results.load_rows(root)
            if not df.empty:
                cells = df[df.status != "reference"]
                done = set(cells.cell[cells.status == "done"])
                far = cells.groupby("cell").kimg.max()  # > 0, with half of the cell still to go
                running = set(far[(far > 0) & (far <= 3)].index) - done
                if done and running:
                    break
            time.sleep(0.1)
        assert done and running, "never saw a done cell beside a running one: " + \
            (tmp_path / "first.log").read_text()[-3000:]
        t_kill = results.now()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = results.load_rows(root)
    done = set(before.cell[before.status == "done"])  # as of the kill
    running = {c for c in running if c not in done}
    assert running
    reap_ray(ray_tmp)

    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    print(second.stdout, second.stderr)  # shown with -s
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "taking over the stale lock" in second.stderr
    assert "unfinished cells resume from their last checkpoint" in second.stdout
    ids, _ = ids_of(study)
    after = results.load_rows(root)
    assert {s["state"] for s in cell_states(after, ids).values()} == {"done"}
    assert not after.duplicated(results.KEY).any()
    raw = raw_rows(root)
    new = raw[raw.written_at > t_kill]
    cols = ["cell", "kimg", "metric", "value", "written_at"]
    for cid in done:  # untouched: the same rows, nothing written for them after the kill
        assert cid not in set(new.cell)
        assert before[before.cell == cid][cols].sort_values(cols[:3]).reset_index(drop=True) \
            .equals(after[after.cell == cid][cols].sort_values(cols[:3]).reset_index(drop=True))
    for cid in running:  # continued from the Ray checkpoint: no evaluation at step 0 again
        assert new[new.cell == cid].step.min() > 0, new[new.cell == cid]
    # Ray's storage keeps its folders (its state may point at any) but no weights of done cells
    assert checkpoint_files(root + "/ray", "kill") == []
    assert glob.glob(f"{root}/ray/kill-1/*/checkpoint_*")


# ---------------------------------------------------------------------------------------------
# 2. retries, then failed; divergence is final

def test_failures_are_retried_then_recorded_and_divergence_is_final(tmp_path, local_ray, capsys):
    study = write_study(tmp_path, "faults", """\
        max_failures: 2
        grid:
          student.lr: [1.0e-4, 2.0e-4]
          seed: [0, 1]
        """)
    root, attempts = str(tmp_path / "r"), str(tmp_path / "attempts.jsonl")
    fn = functools.partial(diverging_cell, diverge_lr=2e-4, attempts=attempts, fail_seed=1,
                           fail_lr=1e-4)
    assert run_study(study, results=root, cell_fn=fn) == 1
    out = capsys.readouterr().out
    ids, _ = ids_of(study)  # order: (1e-4, 0), (1e-4, 1), (2e-4, 0), (2e-4, 1)
    df = results.load_rows(root)
    states = cell_states(df, ids)
    assert [states[c]["state"] for c in ids] == ["done", "failed", "diverged", "diverged"]
    tries = [json.loads(line) for line in open(attempts)]
    assert [t["resumed"] for t in tries] == [False, True, True]  # 1 + max_failures attempts
    failed = df[(df.cell == ids[1]) & (df.status == "failed")]
    assert list(failed.metric) == ["failed"] and "injected failure" in failed.message.iloc[0]
    for cid in ids[2:]:
        rows = df[df.cell == cid]
        assert "diverged" in set(rows.metric) and "non-finite" in rows.message.dropna().iloc[0]
    assert out.count("retrying from its last checkpoint") == 2 and "FAILED after" in out
    assert "failed 1" in study_status(study, root) and "diverged 2" in study_status(study, root)


# ---------------------------------------------------------------------------------------------
# 3. a two-node cluster loses its worker node mid-sweep

def test_lost_worker_node(tmp_path, cache, monkeypatch, capsys):
    import ray
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("HARNESS_CACHE", cache)
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    worker = cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        study = write_study(tmp_path, "nodes", "max_failures: 3\ngrid: {seed: [0, 1, 2, 3]}\n")
        root = str(tmp_path / "r")
        removed, lost = threading.Event(), {}

        def kill_worker():
            deadline = time.time() + 300
            while time.time() < deadline:
                df = results.load_rows(root)
                if not df.empty:
                    cells = df[df.status != "reference"]
                    busy = set(cells.cell[cells.kimg > 0]) - set(cells.cell[cells.status == "done"])
                    if len(busy) >= 2:  # one cell on each node
                        lost.update(cells=busy, at=results.now())
                        cluster.remove_node(worker)
                        removed.set()
                        return
                time.sleep(0.1)

        watcher = threading.Thread(target=kill_worker, daemon=True)
        watcher.start()
        code = run_study(study, results=root, cell_fn=functools.partial(slow_cell, delay=1.0))
        watcher.join(5)
        out = capsys.readouterr().out
        assert removed.is_set(), out
        assert code == 0, out
        assert "retrying from its last checkpoint" in out
        ids, _ = ids_of(study)
        df = results.load_rows(root)
        assert {s["state"] for s in cell_states(df, ids).values()} == {"done"}
        evals = df[(df.metric == "mmd_toy2d_200") & df.cell.isin(ids)].groupby("cell").kimg
        evals = evals.apply(sorted)
        assert all(len(v) == 5 for v in evals), evals  # kimg 0 .. 2: nothing lost
        raw = raw_rows(root)
        later = raw[(raw.written_at > lost["at"]) & raw.cell.isin(lost["cells"])]
        assert later.groupby("cell").step.min().min() > 0  # both went on from a checkpoint
    finally:
        ray.shutdown()
        cluster.shutdown()


# ---------------------------------------------------------------------------------------------
# 4. a grown study runs only its new cells; a changed setting orphans the old ones

def test_added_seed_runs_only_new_cells_and_changes_orphan(tmp_path, local_ray, capsys):
    root = str(tmp_path / "r")
    v1 = write_study(tmp_path, "grow", "grid: {loss: [sid], seed: [0, 1]}\n")
    assert run_study(v1, results=root) == 0
    old_ids, _ = ids_of(v1)
    before = results.load_rows(root)
    before = before[before.cell.isin(old_ids)]
    capsys.readouterr()

    v2 = write_study(tmp_path, "grow", "grid: {loss: [sid], seed: [0, 1, 2]}\n")
    assert run_study(v2, results=root) == 0
    out = capsys.readouterr().out
    ids, _ = ids_of(v2)
    (new_id,) = set(ids) - set(old_ids)
    assert "Ray experiment grow-2: 1 cells" in out
    assert json.loads(open(f"{root}/ray/grow-2.cells.json").read())["cells"] == [new_id]
    after = results.load_rows(root)
    cols = ["cell", "kimg", "metric", "value", "written_at"]
    key = lambda d: d[cols].sort_values(cols[:3]).reset_index(drop=True)  # noqa: E731
    assert key(after[after.cell.isin(old_ids)]).equals(key(before))
    assert cell_states(after, [new_id])[new_id]["state"] == "done"
    assert all(c not in out for c in old_ids)  # no progress line for an old cell

    v3 = write_study(tmp_path, "grow", "grid: {loss: [sid], seed: [0]}\n", kimg=1.5)
    assert run_study(v3, results=root) == 0
    out = capsys.readouterr().out
    (v3_id,) = ids_of(v3)[0]
    assert v3_id not in ids and "3 orphaned cells" in out
    assert json.loads(open(f"{root}/pin.json").read())["current"] == [v3_id]
    status = study_status(v3, root)
    assert "done 1," in status and "orphaned 3" in status
    assert key(results.load_rows(root).query("cell in @old_ids")).equals(key(before))


# ---------------------------------------------------------------------------------------------
# 7. a results root given as a URI (pyarrow filesystem): write, load, resume

def test_uri_results_root_resumes(tmp_path, local_ray, capsys):
    study = write_study(tmp_path, "uri", "grid: {seed: [0, 1]}\n")
    root = "file://" + str(tmp_path / "uri-root")
    attempts = str(tmp_path / "attempts.jsonl")
    fn = functools.partial(flaky_cell, attempts=attempts, fail_seed=1, after_kimg=1.0, once=True)
    assert run_study(study, results=root, cell_fn=fn) == 1  # max_failures 0: seed 1 fails
    ids, _ = ids_of(study)
    assert [s["state"] for s in cell_states(results.load_rows(root), ids).values()] == \
        ["done", "failed"]
    assert os.path.exists(tmp_path / "uri-root" / "ray" / "uri-1" / "tuner.pkl")
    # the race a SIGKILL can leave: Ray's state names a checkpoint whose cell.pt the harness
    # already dropped for a newer one it never recorded; the newest cell.pt must still be found
    (ckpt,) = glob.glob(f"{tmp_path}/uri-root/ray/uri-1/*_cell={ids[1]}_*/checkpoint_*/cell.pt")
    newer = os.path.join(os.path.dirname(os.path.dirname(ckpt)), "checkpoint_999999")
    os.makedirs(newer)
    os.rename(ckpt, os.path.join(newer, "cell.pt"))
    # Ray's state in the results root is not trusted: a planted tuner.pkl is never unpickled
    marker = tmp_path / "ran"
    with open(tmp_path / "uri-root" / "ray" / "uri-1" / "tuner.pkl", "wb") as f:
        f.write(b"cposix\nsystem\n(V" + f"touch {marker}".encode() + b"\ntR.")
    t_second = results.now()
    capsys.readouterr()

    assert run_study(study, results=root) == 0
    assert "1 unfinished cells resume from their last checkpoint" in capsys.readouterr().out
    assert not marker.exists()
    df = results.load_rows(root)
    assert [s["state"] for s in cell_states(df, ids).values()] == ["done", "done"]
    raw = raw_rows(root)
    new = raw[(raw.written_at > t_second) & (raw.cell == ids[1])]
    assert new.step.min() > 0 and new.kimg.min() > 1.0  # continued after its kimg-1 checkpoint
    assert ids[0] not in set(raw[raw.written_at > t_second].cell)
