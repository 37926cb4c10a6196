"""The CLI's error paths, lock, dry run and status, through ``python -m harness.cli`` (fast tier).

Every user error exits 2 with one paragraph naming the problem, and leaves results untouched.
Only the GPU check starts Ray (a few seconds); nothing here runs a sweep.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import textwrap
import types

import pytest

from harness.declare import hashing
from harness.store import pins, results
from harness.store.lock import acquire_lock

HERE = pathlib.Path(__file__).parent
BAD_FILES = sorted((HERE / "studies_bad").glob("*.yaml"))
FIXTURE = HERE / "fixtures" / "results_small"
TOY = """\
study: {name}
data: {{name: toy2d}}
teacher: {{kimg: 4}}
student: {{kimg: 2, batch: 64}}
eval: {{n: 200, every_kimg: 0.5}}
"""


def cli(*args, cwd, env=None, timeout=120):
    """Run ``python -m harness.cli ARGS``; (exit code, stdout, stderr with whitespace joined)."""
    full_env = {**os.environ, **(env or {})}
    p = subprocess.run([sys.executable, "-m", "harness.cli", *map(str, args)], cwd=cwd,
                       env=full_env, capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, " ".join(p.stderr.split())


def tree_hash(root: pathlib.Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def write_study(folder: pathlib.Path, name: str, extra: str = "") -> pathlib.Path:
    path = folder / f"{name}.yaml"
    path.write_text(TOY.format(name=name) + textwrap.dedent(extra))
    return path


def fake_rows(study_path, root, states: dict[int, str]):
    """Rows for cell index -> status (done, running, failed, diverged); returns the cell ids."""
    from harness.orchestrate.status import fingerprints
    from harness.declare.study import load_study

    study = load_study(str(study_path))
    fp, _ = fingerprints(study)
    pins.pin_study(study, str(root), fp)
    ids = [cid for cid, *_ in hashing.compute_ids(study, fp)]
    rows = []
    for i, status in states.items():
        for kimg, st in ((0.0, "running"), (1.0, status)):
            rows.append({"study": study.name, "cell": ids[i], "kimg": kimg, "step": int(kimg * 16),
                         "metric": "mmd_toy2d_200", "value": 0.1, "wall_s": 10.0 * (kimg + 1),
                         "status": st, "message": "boom" if st == "failed" else None})
    results.write_rows(str(root), rows)
    return ids


@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> pathlib.Path:
    """The toy teacher, trained once per test session (shared with tests/test_sweep.py)."""
    from harness.core import data
    from harness.orchestrate import teacher
    from harness.declare.config import resolve_cell

    folder = tmp_path_factory.getbasetemp() / "harness-cache"
    cfg = resolve_cell({"data": {"name": "toy2d"}, "teacher": {"kimg": 4}})
    teacher.load_or_train(cfg, data.from_config(cfg["data"]), str(folder), "cpu",
                          log=lambda *a: None)
    return folder


# ---------------------------------------------------------------------------------------------
# malformed studies

def test_there_are_enough_malformed_studies():
    assert len(BAD_FILES) >= 12


@pytest.mark.parametrize("path", BAD_FILES, ids=[p.stem for p in BAD_FILES])
def test_run_malformed_study(path, tmp_path):
    root = tmp_path / "results"
    shutil.copytree(FIXTURE, root)
    before = tree_hash(root)
    expected = path.read_text().splitlines()[0][len("# expect: "):]
    code, out, err = cli("run", path, "--results", root, cwd=tmp_path)
    assert code == 2, err
    assert f"{path}" in err and " ".join(expected.split()) in err, err
    assert err.startswith("error: ") and "Traceback" not in err
    assert tree_hash(root) == before


# ---------------------------------------------------------------------------------------------
# harness cell

@pytest.mark.parametrize("args, words", [
    (["--data", "npz", "--data-path", "/nonexistent.npz"], ["/nonexistent.npz"]),
    (["--data", "toy2d", "--loss", "nope"], ["unknown loss 'nope'", "sid"]),
    (["--data", "toy2d", "--init", "nope"], ["unknown", "'nope'", "reset_layers"]),
    (["--data", "toy2d", "--init", "{name: reset_layers, groups: [head]}"], ["'head'", "output"]),
    (["--data", "toy2d", "--set", "student.lr=fast"], ["student.lr", "'fast'"]),
], ids=["missing-npz", "unknown-loss", "unknown-init", "unknown-group", "set-not-a-number"])
def test_cell_user_errors(args, words, tmp_path):
    code, out, err = cli("cell", *args, "--out", tmp_path / "out", "--cache", tmp_path / "c",
                         cwd=tmp_path)
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err
    for w in words:
        assert w in err, err
    assert not (tmp_path / "c" / "teachers").exists()  # failed before any training


def test_cell_corrupt_checkpoint(tmp_path, cache):
    out = tmp_path / "out"
    from harness.core.data import load
    from harness.declare.hashing import cell_id

    cfg = {"data": {"name": "toy2d"}, "teacher": {"kimg": 4}, "student": {"kimg": 0.5},
           "eval": {"n": 200}}
    (out / "ckpt").mkdir(parents=True)
    ckpt = out / "ckpt" / f"{cell_id(cfg, load('toy2d').fingerprint)}.pt"  # where `cell` looks
    ckpt.write_bytes(b"not a checkpoint")
    code, _, err = cli("cell", "--data", "toy2d", "--set", "teacher.kimg=4", "--kimg", "0.5",
                       "--set", "eval.n=200", "--out", out, "--cache", cache, cwd=tmp_path)
    assert code == 2, err
    assert ckpt.name in err and "move it aside" in err and "Traceback" not in err
    assert ckpt.read_bytes() == b"not a checkpoint"


# ---------------------------------------------------------------------------------------------
# harness run: resources, lock, dry run; harness status

def test_run_gpu_study_without_gpus(tmp_path, cache):
    study = write_study(tmp_path, "wants-gpu", "resources: {gpu: 1}\ngrid: {seed: [0, 1]}\n")
    code, out, err = cli("run", study, "--results", tmp_path / "r", cwd=tmp_path,
                         env={"HARNESS_CACHE": str(cache), "RAY_ADDRESS": ""})
    assert code == 2, out + err
    assert "1 GPU(s) per cell" in err and "pending forever" in err and "gpu: 0" in err
    assert "Nothing was run" in err
    assert not (tmp_path / "r" / "rows").exists() and not (tmp_path / "r" / ".lock").exists()


def test_one_resource_check_serves_the_cluster_and_the_dry_run(tmp_path):
    """``status.resource_problem`` is what `harness run` asks of Ray's live nodes and what the
    dry run asks of this machine: a cell must fit one node, all its workers the whole cluster."""
    from harness.declare.study import load_study
    from harness.orchestrate.status import resource_problem

    def study(extra):
        return load_study(str(write_study(tmp_path, "res", extra)))

    two = [{"CPU": 2, "GPU": 1}, {"CPU": 2, "GPU": 1}]
    assert resource_problem(study("resources: {cpu: 2}\n"), two) is None
    wide = resource_problem(study("resources: {cpu: 3}\n"), two)
    assert "asks for 3 CPU(s) per cell (resources.cpu)" in wide
    assert "4 CPU(s) in all and at most 2 on one node" in wide and "a smaller resources.cpu" in wide
    workers = study("resources: {cpu: 2, workers: 4}\n")
    assert "4 workers: 8 in all" in resource_problem(workers, two + [{"CPU": 2}])
    assert resource_problem(workers, two + two) is None
    gpu = study("resources: {gpu: 2}\n")
    assert "resources: {gpu: 0}" in resource_problem(gpu, two)
    assert resource_problem(gpu, [{"CPU": 8}], "this machine", ("CPU",)) is None  # CPUs only
    here = resource_problem(study("teacher_resources: {cpu: 4}\n"), [{"CPU": 2}], "this machine")
    assert "per teacher (teacher_resources.cpu), but this machine has 2 CPU(s)," in here


def test_second_run_is_refused_while_locked(tmp_path):
    study = write_study(tmp_path, "locked", "grid: {seed: [0, 1]}\n")
    root = tmp_path / "r"
    with acquire_lock(str(root)):
        code, out, err = cli("run", study, "--results", root, cwd=tmp_path)
        assert code == 2, out + err
        assert f"process {os.getpid()} on host {socket.gethostname()}" in err
        assert "another `harness run`" in err
        status = cli("status", study, "--results", root, cwd=tmp_path)[1]
        assert "a run is in progress" in status
    assert not (root / ".lock").exists()


def test_status_reports_the_teachers_of_the_running_process_cache(tmp_path):
    """A run started with HARNESS_CACHE=X: `harness status` from a shell without it must look
    for the teachers in X (the lock records it), not in <results>/cache."""
    study = write_study(tmp_path, "theirs", "grid: {seed: [0, 1]}\n")
    root = tmp_path / "r"
    fake_rows(study, root, {0: "done"})
    theirs = tmp_path / "their-cache"
    env = {"HARNESS_CACHE": ""}
    status = cli("status", study, "--results", root, cwd=tmp_path, env=env)[1]
    assert f"[{root}/cache/teachers/" in status, status
    with acquire_lock(str(root), cache=str(theirs)):
        status = cli("status", study, "--results", root, cwd=tmp_path, env=env)[1]
    assert "a run is in progress" in status and f"[{theirs}/teachers/" in status, status


def test_stale_lock_is_taken_over(tmp_path):
    study = write_study(tmp_path, "stale", "grid: {seed: [0, 1]}\n")
    root = tmp_path / "r"
    fake_rows(study, root, {0: "done", 1: "done"})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (root / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                            "started_at": "earlier", "token": "x"}))
    code, out, err = cli("run", study, "--results", root, cwd=tmp_path)  # all done: reads only
    assert code == 0 and "all 2 cells done" in out and "nothing was trained" in out, out + err
    out = cli("run", study, "--results", root, "--dry-run", cwd=tmp_path)[1]
    assert "teachers: none needed (no cell left to run)" in out and "not cached" not in out, out
    out = cli("status", study, "--results", root, cwd=tmp_path)[1]  # nothing waits for a teacher
    assert "ETA none: nothing left\n" in out and "cells left wait" not in out, out
    assert (root / ".lock").exists()
    code, out, err = cli("compact", study, "--results", root, cwd=tmp_path)  # takes the lock
    assert code == 0, out + err
    assert "taking over the stale lock" in err and f"process {dead.pid}" in err
    assert not (root / ".lock").exists()


def test_dry_run_writes_nothing(tmp_path):
    study = write_study(tmp_path, "dry", "grid: {loss: [sid, ratio_kl], seed: [0, 1]}\n")
    root = tmp_path / "r"
    ids = fake_rows(study, root, {0: "done", 1: "failed", 2: "running"})
    before = tree_hash(root)
    code, out, err = cli("run", study, "--results", root, "--dry-run", cwd=tmp_path)
    assert code == 0, err
    assert tree_hash(root) == before
    lines = {cid: line for cid in ids for line in out.splitlines() if cid in line}
    assert lines[ids[0]].endswith("done") and "would retry" in lines[ids[1]]
    assert "would resume" in lines[ids[2]] and lines[ids[3]].endswith("would run")
    assert "3 to run, 1 done, 0 diverged, 0 orphaned" in out
    # a fresh root: nothing is created
    code, out, _ = cli("run", study, "--results", tmp_path / "new", "--dry-run", cwd=tmp_path)
    assert code == 0 and "4 to run" in out and not (tmp_path / "new").exists()
    assert "pending forever" not in out
    out = cli("run", study, "--results", root, "--dry-run", "--set", "resources.cpu=1000",
              cwd=tmp_path, env={"RAY_OVERRIDE_RESOURCES": '{"CPU": 2}'})[1]
    assert ("asks for 1000 CPU(s) per cell (resources.cpu), but this machine has 2 CPU(s)" in out
            and "`harness run` here would refuse to start" in out), out


def test_status(tmp_path):
    study = write_study(tmp_path, "st", "grid: {loss: [sid, ratio_kl], seed: [0, 1, 2]}\n")
    root = tmp_path / "r"
    # cells: 0 sid-0, 1 sid-1, 2 sid-2, 3 ratio_kl-0, 4 ratio_kl-1, 5 ratio_kl-2
    fake_rows(study, root, {0: "done", 1: "failed", 2: "done", 3: "running", 4: "diverged"})
    # one seed less: the seed-2 cells (2 and 5) become orphaned
    small = write_study(tmp_path, "st", "grid: {loss: [sid, ratio_kl], seed: [0, 1]}\n")
    pin_before = (root / "pin.json").read_bytes()
    code, out, err = cli("status", small, "--results", root, cwd=tmp_path)
    assert code == 0, err
    assert (root / "pin.json").read_bytes() == pin_before  # read-only
    assert "done 1, interrupted 1, failed 1, diverged 1, pending 0, orphaned 2" in out, out
    assert "compute spent: 1m20s" in out  # 4 cells x 20 s of latest wall_s
    # cells left to run and their teacher not trained here: the ETA says they wait for it
    assert "; 2 of the 2 cells left wait for 1 teacher still to train (time unknown until " \
           "they start" in out, out
    # mean 20 s per done cell x (half of 2 cells left) over the cells that run at once: the
    # CPUs a run started here gets (RAY_OVERRIDE_RESOURCES, Ray's own setting, narrows them) ...
    for cpus, eta in ((2, "~10s at 2 cells at a time on this machine"),
                      (1, "~20s at 1 cell at a time on this machine")):
        env = {"RAY_OVERRIDE_RESOURCES": json.dumps({"CPU": cpus})}
        assert eta in cli("status", small, "--results", root, cwd=tmp_path, env=env)[1]
    # ... or, while a run is live, the CPUs of its Ray cluster (recorded in the lock)
    with acquire_lock(str(root), cluster={"CPU": 4, "GPU": 0}):
        out = cli("status", small, "--results", root, cwd=tmp_path)[1]
    assert "~5s at 4 cells at a time on the running cluster" in out, out


def test_run_study_with_missing_data_files(tmp_path):
    study = tmp_path / "nodata.yaml"
    study.write_text("study: nodata\ndata: {name: npz, path: /nonexistent/data.npz}\n"
                     "grid: {seed: [0, 1]}\n")
    code, out, err = cli("run", study, "--results", tmp_path / "r", cwd=tmp_path)
    assert code == 2, out + err
    assert "/nonexistent/data.npz" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_cell_reuses_the_teacher_that_run_trained(tmp_path, monkeypatch):
    """One cache resolver: `harness cell --out ROOT` finds the teacher that `harness run` of the
    results root ROOT trained (same settings): no second training, the same teacher folder."""
    monkeypatch.delenv("HARNESS_CACHE", raising=False)
    env = {k: v for k, v in os.environ.items() if k != "HARNESS_CACHE"}
    study = write_study(tmp_path, "reuse", "grid: {seed: [0]}\n")
    root = tmp_path / "r"
    code, out, err = cli("run", study, "--results", root, cwd=tmp_path, env=env, timeout=300)
    assert code == 0, out + err
    trained = sorted(os.listdir(root / "cache" / "teachers"))
    assert len(trained) == 1 and (root / "cache" / "teachers" / trained[0] / "teacher.pt").exists()
    code, out, err = cli("cell", "--data", "toy2d", "--set", "teacher.kimg=4", "--kimg", "0.2",
                         "--set", "eval.n=200", "--out", root, cwd=tmp_path, env=env)
    assert code == 0, out + err
    assert "training mlp" not in out and " done " in out
    assert sorted(os.listdir(root / "cache" / "teachers")) == trained


def test_paths_and_devices_that_cannot_work_are_refused_before_anything_runs(tmp_path, capsys,
                                                                              monkeypatch):
    """A data folder that is a file, a cache or --out that is a file, a bench table in a folder
    that is a file, an empty --rows, a device that does not exist or is not here: one paragraph,
    exit 2, before any teacher trains (nothing is created)."""
    import torch

    from harness.cli import main

    afile = tmp_path / "a-file"
    afile.write_text("x")
    study = tmp_path / "f.yaml"
    study.write_text(f"study: f\ndata: {{name: folder, path: {afile}}}\n")
    teacher = ["teacher", "--data", "toy2d", "--kimg", "0.128"]
    import numpy as np

    np.savez(tmp_path / "nolabels.npz", x=np.zeros((20, 8, 8, 1), np.uint8))
    nolab = tmp_path / "nolab.yaml"
    nolab.write_text(f"study: nolab\ndata: {{name: npz, path: {tmp_path / 'nolabels.npz'}}}\n"
                     f"teacher: {{arch: unet-xs}}\n")
    cases = [
        (["run", str(nolab), "--dry-run", "--results", str(tmp_path / "r")], {},
         "dataset 'npz' has no labels, and metric 'auto' scores images with a domain classifier"),
        (["run", str(study), "--dry-run", "--results", str(tmp_path / "r")], {},
         f"dataset 'folder': path '{afile}' is not a folder"),
        (teacher + ["--out", str(tmp_path / "o")], {"HARNESS_CACHE": str(afile)},
         f"HARNESS_CACHE: {afile} exists and is a file"),
        (teacher + ["--out", str(afile)], {}, f"the results root {afile} exists and is a file"),
        (["bench", "--rows", "init", "--out", str(afile / "x.md")], {},
         "its folder does not exist (or is a file)"),
        (["bench", "--rows", ""], {}, "--rows: unknown row ''"),
        (teacher[:2] + ["npz", "--data-path", str(afile), "--kimg", "0.128"], {},
         "is not an .npz archive"),  # numpy would read it as a pickle
    ]
    if os.path.exists("/dev/zero"):  # a device reads without end: refused before it is opened
        cases.append((teacher[:2] + ["npz", "--data-path", "/dev/zero", "--kimg", "0.128"], {},
                      "path '/dev/zero' is not a regular file"))
    if not torch.cuda.is_available():
        cases.append((["cell", "--device", "cuda", "--data", "toy2d", "--out", str(tmp_path / "c"),
                       "--set", "teacher.kimg=0.128", "--kimg", "0.064"], {},
                      "'cuda' asked for, but this machine has no CUDA device"))
    for args, env, expected in cases:
        with monkeypatch.context() as m:  # restores HARNESS_CACHE (bench sets it for its runs)
            m.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
            for k, v in env.items():
                m.setenv(k, v)
            assert main(args) == 2, args
        err = " ".join(capsys.readouterr().err.split())
        assert expected in err and "Traceback" not in err, (args, err)
    with pytest.raises(SystemExit) as e:  # argparse: usage and the reason, exit 2
        main(teacher + ["--device", "tpu"])
    assert e.value.code == 2 and "'tpu' is not a device" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "f.yaml", "nolab.yaml",
                                                          "nolabels.npz"]


def test_a_memory_kill_that_stops_tune_starts_the_round_again(tmp_path, monkeypatch, capsys):
    """Ray's memory monitor killing a worker makes Tune's controller raise (not fail the trial):
    the run starts the experiment again for the cells still unfinished (they resume from their
    checkpoints), up to MEMORY_RETRIES times, instead of leaving the study with a traceback."""
    from harness.orchestrate import sweep
    from harness.orchestrate.status import fingerprints

    study_path = write_study(tmp_path, "oom", "grid: {seed: [0, 1]}\n")
    study = sweep.load_study(str(study_path))
    root = str(tmp_path / "r")
    fp, datasets = fingerprints(study)
    calls = []
    oom = RuntimeError("Caught unexpected exception: 1 worker(s) were killed due to the node "
                       "running low on memory. Memory on the node was 22.99GB used")

    def fake_sweep(study, pin, pending, *rest):
        calls.append(list(pending))
        if len(calls) == 1:  # the first cell finished before the kill
            fake_rows(study_path, pathlib.Path(root), {0: "done"})
            raise oom
        return 0

    monkeypatch.setattr(sweep, "_sweep", fake_sweep)
    class Cached:  # every teacher is cached: the cells make one wave
        ready, watch = set(), types.SimpleNamespace(t0=None)

        def wait(self, until=None):
            return self

        check = poll = wait

    monkeypatch.setattr(sweep, "_teachers", lambda study, pin, pending, *a:
                        (Cached(), {c: set() for c in pending}))
    assert sweep._rounds(study, root, str(tmp_path / "c"), fp, datasets, "cpu", None, None,
                         None) == 0
    assert len(calls) == 2 and len(calls[0]) == 2 and calls[1] == calls[0][1:]
    out = " ".join(capsys.readouterr().out.split())
    assert "Ray's memory monitor killed a worker and Tune stopped the experiment" in out
    assert "(retry 1 of 3)" in out
    calls.clear()  # every attempt killed: the error reaches the caller after the retries
    def always_killed(*a):
        calls.append(1)
        raise oom

    monkeypatch.setattr(sweep, "_sweep", always_killed)
    with pytest.raises(RuntimeError, match="low on memory"):
        sweep._rounds(study, root, str(tmp_path / "c"), fp, datasets, "cpu", None, None, None)
    assert len(calls) == 1 + sweep.MEMORY_RETRIES
