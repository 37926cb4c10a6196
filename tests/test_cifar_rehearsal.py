"""``studies/cifar10.yaml`` itself, end to end on a CPU (slow tier), every piece together:

    python -m pytest -m slow tests/test_cifar_rehearsal.py -q -s

The study file is run unchanged except for overrides on the command line (``--set``): scale
(kimg, batch, eval.n, resources, one seed, mapping_match's steps, teacher.channels for the narrow
teacher), the three file paths, which point at stand-ins written by ``tests/rehearsal_files``
(a CIFAR-10 python-format folder of 96 images, an NVIDIA-format EDM pickle of a 4-channel DDPM++,
imported, never trained, and a torch-fidelity ``pt_inception`` weights file with random weights),
and the study's own matrix: 5 losses x 10 inits x one seed, 50 cells (each cell costs two
Inception evaluations on the CPU: the whole test took 728 s on this 2-core machine).
bf16 autocast runs on the CPU. Ray is a loopback cluster of three ``ray start`` nodes (a head
with no CPUs and two 1-CPU workers, each with its own temp dir and ports), results go to a moto
S3 server on 127.0.0.1, and one worker node is SIGKILLed while both run a cell: the run must
finish on the other node with every cell done and no (cell, kimg, metric) row lost or repeated,
a second run must train nothing, then ``harness status``, ``figures`` and the claims.
"""
from __future__ import annotations

import os
import pathlib
import random
import signal
import subprocess
import sys
import tempfile
import time

import pytest

pytest.importorskip("moto.server")

from conftest import ray_leftovers  # noqa: E402
from rehearsal_files import write_all  # noqa: E402
from test_s3 import BUCKET, objects, s3  # noqa: E402,F401 (s3: the moto server fixture)

REPO = pathlib.Path(__file__).resolve().parents[1]
STUDY = str(REPO / "studies" / "cifar10.yaml")
CHANNELS = 4
CELLS, SHAPE = 50, "5 loss x 10 init"
SCALE = ["student.kimg=0.002", "student.batch=2", "eval.n=4", "eval.every_kimg=0.002",
         "eval.samples=4", "resources.cpu=1", "resources.gpu=0", "grid.seed=[0]",
         "init.mapping_match.steps=2", "init.mapping_match.batch=2", f"teacher.channels={CHANNELS}"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_start(tag: str, env: dict, *args: str) -> None:
    ports = {"--node-manager-port": _free_port(), "--object-manager-port": _free_port(),
             "--runtime-env-agent-port": _free_port(), "--metrics-export-port": _free_port(),
             "--dashboard-agent-listen-port": _free_port(),
             "--dashboard-agent-grpc-port": _free_port()}
    base = random.randrange(30000, 60000, 100)
    cmd = [os.path.join(os.path.dirname(sys.executable), "ray"), "start", *args,
           "--node-ip-address", "127.0.0.1", "--temp-dir", tag, "--num-gpus", "0",
           "--object-store-memory", str(100 * 2 ** 20), "--disable-usage-stats",
           "--min-worker-port", str(base), "--max-worker-port", str(base + 60),
           *[str(x) for kv in ports.items() for x in kv]]
    for attempt in range(5):  # a loaded machine: Ray gives a raylet 30 s to register
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300,
                              start_new_session=True)
        if done.returncode == 0:
            return
        _kill_node(tag)
        print(f"ray start failed (attempt {attempt + 1}): {done.stderr[-300:]}")
    raise AssertionError(done.stdout[-2000:] + done.stderr[-2000:])


def _descendants(pids: list[int]) -> list[int]:
    parent = {}
    for d in os.listdir("/proc"):
        try:
            with open(f"/proc/{d}/stat") as f:
                parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            pass
    out, todo = [], list(pids)
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += [c for c, p in parent.items() if p == pid and c not in out]
    return out


def _kill_node(tag: str) -> int:
    """SIGKILL every process of the node whose temp dir is ``tag`` (its raylet and the others
    naming the dir, and their children: the node's workers); how many there were."""
    pids = [p for p in _descendants(ray_leftovers(tag)) if p != os.getpid()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(pids)


@pytest.fixture
def loopback_cluster():
    """A head (0 CPUs) and two 1-CPU worker nodes on 127.0.0.1; yields (address, [worker temp
    dirs], env); every process of the three nodes is killed at the end (by temp dir, nothing
    else)."""
    tags = [tempfile.mkdtemp(prefix=f"rq{k}", dir="/tmp") for k in range(3)]  # short: sockets
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    port = _free_port()
    try:
        _ray_start(tags[0], env, "--head", "--port", str(port), "--num-cpus", "0",
                   "--include-dashboard", "false")
        for tag in tags[1:]:
            _ray_start(tag, env, "--address", f"127.0.0.1:{port}", "--num-cpus", "1")
        yield f"127.0.0.1:{port}", tags[1:], env
    finally:
        for tag in reversed(tags):
            _kill_node(tag)


def _rows(root):
    from harness.store import results

    df = results.load_rows(root)
    return df, df[df.status != "reference"]


@pytest.mark.slow
def test_cifar10_study_end_to_end_on_a_loopback_cluster_with_s3(s3, loopback_cluster, tmp_path):
    from harness.store import results

    address, workers, env = loopback_cluster
    files = write_all(str(tmp_path / "files"), channels=CHANNELS, per_batch=16)
    sets = [a for kv in [*SCALE, *(f"{k}={v}" for k, v in files.items())] for a in ("--set", kv)]
    root = f"s3://{BUCKET}/cifar10"
    env = {**env, "HARNESS_CACHE": str(tmp_path / "cache")}  # every node sees this local path
    cli = [sys.executable, "-m", "harness.cli"]
    run = [*cli, "run", STUDY, "--address", address, "--results", root, "--device", "cpu", *sets]

    dry = subprocess.run([*cli, "run", STUDY, "--dry-run", "--results", root, *sets], env=env,
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert f"{CELLS} cells = {SHAPE} x 1 seed" in dry.stdout

    # 1. run; once both workers are mid-cell (two cells with rows, not done), kill worker 1
    t0, log = time.time(), tmp_path / "run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(run, env=env, stdout=out, stderr=subprocess.STDOUT,
                                cwd=tmp_path, start_new_session=True)
        killed, deadline = 0, time.time() + 2400
        while proc.poll() is None and time.time() < deadline:
            if not killed:
                _, cells = _rows(root)
                done = set(cells.cell[cells.status == "done"])
                busy = set(cells.cell) - done
                if done and len(busy) == 2:
                    killed, t_kill = _kill_node(workers[0]), time.time()
                    print(f"killed worker node 1 ({killed} processes) at +{t_kill - t0:.0f} s: "
                          f"{len(done)} cells done, 2 mid-cell")
            time.sleep(1)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    text = log.read_text()
    print(text[-4000:])
    assert killed, "never saw both workers mid-cell"
    assert proc.returncode == 0, text[-3000:]
    assert "attempt 1 failed" in text and "retrying from its last checkpoint" in text
    assert f"study cifar10: done {CELLS}, diverged 0, failed 0, unfinished 0, pending 0" in text
    print(f"first run: {time.time() - t0:.0f} s")

    # 2. every cell done, each evaluation exactly once (the killed cell resumed, nothing lost)
    df, cells = _rows(root)
    assert cells.cell.nunique() == CELLS and set(cells.status) <= {"done", "running"}
    assert not cells.duplicated(["cell", "kimg", "metric"]).any()
    expected = {(0.0, m) for m in ("fid_inception_4", "kid_inception_4")} | \
               {(0.002, m) for m in ("fid_inception_4", "kid_inception_4")}
    for cid, rows in cells.groupby("cell"):
        got = {(round(float(k), 6), m) for k, m in zip(rows.kimg, rows.metric)}
        assert expected <= got, (cid, sorted(got))
        assert (rows[rows.kimg == rows.kimg.max()].status == "done").all()
    assert got == {(round(float(k), 6), m) for k, m in zip(cells.kimg, cells.metric)}
    assert {"data_floor", "teacher_heun35"} <= set(df[df.status == "reference"].init)

    # 3. the same command again trains nothing and writes no row
    stored = sorted(objects("cifar10/rows/"))
    again = subprocess.run(run, env=env, capture_output=True, text=True, timeout=300,
                           cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert f"all {CELLS} cells done" in again.stdout
    assert sorted(objects("cifar10/rows/")) == stored

    # 4. status (with the run's --set), figures and claims from S3
    status = subprocess.run([*cli, "status", STUDY, "--results", root, *sets], env=env,
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert f"{CELLS} cells" in status.stdout and f"done {CELLS}" in status.stdout, status.stdout
    figs = subprocess.run([*cli, "figures", STUDY, "--results", root], env=env,
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert figs.returncode == 0, figs.stdout[-3000:] + figs.stderr[-3000:]
    made = {pathlib.Path(p).name for p in figs.stdout.split() if p.startswith("figures/")}
    assert "claims.md" in made and "heatmap.png" in made, figs.stdout
    claims = (tmp_path / "figures" / "claims.md").read_text()
    assert "fid_inception_4" in claims
    print(f"end to end: {time.time() - t0:.0f} s; {len(df)} rows; outputs: {sorted(made)}")
    assert results.load_rows(root).equals(df)  # figures and status wrote nothing
