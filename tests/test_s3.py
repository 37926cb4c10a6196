"""Results on S3 for real: a local S3-compatible server (moto's ThreadedMotoServer on 127.0.0.1)
behind the standard AWS variables, and the harness's own code paths (pyarrow.fs, boto3).

    python -m pytest -q tests/test_s3.py              # the lock, the store, trackers (seconds)
    python -m pytest -q -m slow tests/test_s3.py      # harness run killed and resumed on S3

Skips without moto's server extra (``pip install -e '.[test]'`` brings it).
"""
from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")

from conftest import reap_ray
from harness.store import lock as locks, results  # noqa: E402
from harness.store.lock import LockedError, acquire_lock  # noqa: E402

BUCKET = "harness-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 and the AWS variables pointing at it (this process and every
    child: harness run, Ray workers); yields the endpoint URL."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield url
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def objects(prefix: str) -> list[str]:
    """The keys under a prefix (pyarrow's folder markers left out)."""
    client = boto3.client("s3")
    keys, token = [], {}
    while True:
        page = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix, **token)
        keys += [o["Key"] for o in page.get("Contents", []) if not o["Key"].endswith("/")]
        if not page.get("IsTruncated"):
            return keys
        token = {"ContinuationToken": page["NextContinuationToken"]}


def put_lock(key: str, **info):
    boto3.client("s3").put_object(Bucket=BUCKET, Key=key, Body=json.dumps(info).encode())


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---------------------------------------------------------------------------------------------
# default tier

def test_store_round_trip_through_the_endpoint_variable(s3):
    """pyarrow's FileSystem.from_uri honours AWS_ENDPOINT_URL: rows land in the moto bucket."""
    root = f"s3://{BUCKET}/store"
    results.write_rows(root, [{"study": "s", "cell": "c", "kimg": 0.0, "metric": "m",
                               "value": 1.5, "status": "running"}])
    assert [k for k in objects("store/rows/") if k.endswith(".parquet")]
    df = results.load_rows(root)
    assert list(df.value) == [1.5]


def test_open_study_and_report_from_s3_match_the_local_store(s3):
    """The notebook API and the study page read an s3:// root like a folder: the same frames
    and claims as the local copy; the page lands in the bucket beside the results."""
    import pandas as pd

    import analysis
    import harness
    from analysis.report import write_report

    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "results_small")
    client = boto3.client("s3")
    for d, _, fs in os.walk(here):
        for f in fs:
            rel = os.path.relpath(os.path.join(d, f), here).replace(os.sep, "/")
            client.upload_file(os.path.join(d, f), BUCKET, f"nb/{rel}")
    remote, local = harness.open_study(f"s3://{BUCKET}/nb"), analysis.open_study(here)
    for name in ("cells", "scores", "final", "refs"):
        pd.testing.assert_frame_equal(getattr(remote, name), getattr(local, name))
    assert remote.pin == local.pin and remote.data_floor == local.data_floor
    assert [(c.name, c.effect, c.lo, c.hi, c.verdict) for c in remote.claims] == \
        [(c.name, c.effect, c.lo, c.hi, c.verdict) for c in local.claims]
    where = write_report(f"s3://{BUCKET}/nb", regenerate=False)
    assert where == f"s3://{BUCKET}/nb/report.html" and "nb/report.html" in objects("nb/")
    page = client.get_object(Bucket=BUCKET, Key="nb/report.html")["Body"].read().decode()
    assert page.startswith("<!DOCTYPE html>") and "c-di-teacher-s7" in page


def test_lock_on_s3_is_exclusive_and_released(s3):
    root = f"s3://{BUCKET}/lock-a"
    with acquire_lock(root) as held:
        assert isinstance(held, locks._S3Lock)
        assert locks.holder(root)["token"] == held.info["token"]
        with pytest.raises(LockedError, match=f"process {os.getpid()} on host"):
            acquire_lock(root)
    assert "lock-a/.lock" not in objects("lock-a/")
    assert locks.holder(root) is None
    acquire_lock(root).release()


def test_lock_on_s3_race_has_one_winner(s3):
    """Eight contenders at once: If-None-Match lets exactly one create the lock."""
    root, barrier, won, refused = f"s3://{BUCKET}/lock-race", threading.Barrier(8), [], []

    def contend():
        barrier.wait()
        try:
            won.append(acquire_lock(root))
        except LockedError:
            refused.append(1)

    threads = [threading.Thread(target=contend) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(won) == 1 and len(refused) == 7
    assert locks.holder(root)["token"] == won[0].info["token"]
    won[0].release()


def test_stale_lock_on_s3_is_taken_over_once(s3, capsys):
    root = f"s3://{BUCKET}/lock-stale"
    put_lock("lock-stale/.lock", pid=dead_pid(), host=socket.gethostname(),
             started_at="yesterday", token="old")
    new = acquire_lock(root)
    assert "taking over the stale lock" in capsys.readouterr().err
    with pytest.raises(LockedError):  # the new holder is alive
        acquire_lock(root)
    # a live holder on another host is never taken over
    new.release()
    put_lock("lock-stale/.lock", pid=1, host="elsewhere", started_at="now", token="other")
    with pytest.raises(LockedError, match="process 1 on host elsewhere"):
        acquire_lock(root)


def test_release_keeps_a_lock_taken_over_meanwhile(s3):
    """A holder that lost its lock (taken over as stale) must not delete the new one."""
    root = f"s3://{BUCKET}/lock-keep"
    old = acquire_lock(root)
    put_lock("lock-keep/.lock", pid=os.getpid(), host=socket.gethostname(), started_at="now",
             token="newer")
    old.release()
    assert locks.holder(root)["token"] == "newer"


STUDY = """\
study: {name}
data: {{name: toy2d}}
teacher: {{kimg: 4}}
student: {{kimg: {kimg}, batch: 64}}
eval: {{n: 200, every_kimg: 0.5}}
grid: {{loss: [sid, ratio_kl, di]}}
"""


def write_study(folder, name, kimg=4) -> str:
    path = pathlib.Path(folder) / f"{name}.yaml"
    path.write_text(STUDY.format(name=name, kimg=kimg))
    return str(path)


def harness(*args, env=None, cwd=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=timeout)


def test_second_run_on_a_locked_s3_root_exits_2(s3, tmp_path):
    study = write_study(tmp_path, "busy")
    root = f"s3://{BUCKET}/busy"
    with acquire_lock(root):
        done = harness("run", study, "--results", root, env={**os.environ, "RAY_ADDRESS": ""},
                       cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "are locked by process" in done.stderr and f"{root}/.lock" in done.stderr
    assert not objects("busy/rows/")


def test_s3_cache_is_refused_with_exit_2(tmp_path):
    study = write_study(tmp_path, "cache")
    done = harness("run", study, env={**os.environ, "HARNESS_CACHE": "s3://bucket/cache"},
                   cwd=tmp_path, timeout=120)
    assert done.returncode == 2
    assert "HARNESS_CACHE: 's3://bucket/cache' is an object-store URI" in done.stderr
    assert not (tmp_path / "results").exists()


def test_tensorboard_event_files_are_uploaded_to_s3(s3):
    from harness.store import tracking

    root = f"s3://{BUCKET}/tb-up"
    t = tracking.open_trackers({}, root, "st", "c0ffee", {"a": 1}, {"seed": 0})
    local = t.sinks[0].dir
    t.log_rows([{"metric": "mmd_toy2d_1k", "value": 0.5, "kimg": 0.0, "status": "running"}])
    (first,) = objects("tb-up/tb/c0ffee/")
    size = boto3.client("s3").head_object(Bucket=BUCKET, Key=first)["ContentLength"]
    t.log_rows([{"metric": "mmd_toy2d_1k", "value": 0.25, "kimg": 0.5, "status": "done"}])
    t.close("done")
    assert objects("tb-up/tb/c0ffee/") == [first]
    assert boto3.client("s3").head_object(Bucket=BUCKET, Key=first)["ContentLength"] > size
    assert not os.path.exists(local)  # the local copy is gone after close


# ---------------------------------------------------------------------------------------------
# slow: harness run on S3, SIGKILLed and resumed, against a file:// run of the same study

def _figure_data(folder) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(pathlib.Path(folder).glob("*.data.csv"))}


@pytest.mark.slow
def test_killed_run_on_s3_resumes_and_matches_a_local_run(s3, tmp_path):
    import pandas as pd
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    from harness.declare import hashing
    from harness.orchestrate.progress import checkpoint_files
    from harness.orchestrate.status import cell_states, fingerprints
    from harness.declare.study import load_study

    study = write_study(tmp_path, "s3kill")
    root = f"s3://{BUCKET}/s3kill"
    cache = str(tmp_path / "cache")
    ray_tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # short: Ray's socket paths live here
    env = {**os.environ, "HARNESS_CACHE": cache, "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "harness.cli", "run", study, "--results", root]
    s = load_study(study)
    ids = [cid for cid, *_ in hashing.compute_ids(s, fingerprints(s)[0])]

    # 1. run until one cell is done and another has a checkpoint on S3, then SIGKILL the driver
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=tmp_path)
        deadline, done, resumable, second = time.time() + 480, set(), set(), None
        while time.time() < deadline and proc.poll() is None:
            df = results.load_rows(root)
            if second is None and not df.empty:  # Ray is up: a concurrent run is refused
                second = harness("run", study, "--results", root, env=env, cwd=tmp_path)
            if not df.empty:
                cells = df[df.status != "reference"]
                done = set(cells.cell[cells.status == "done"])
                far = cells.groupby("cell").kimg.max()
                saved = {c for c, *_ in checkpoint_files(root + "/ray", "s3kill")}
                resumable = set(far[(far >= 1) & (far <= 2.5)].index) & saved - done
                if done and resumable:
                    break
            time.sleep(0.5)
        assert done and resumable, "never saw a done cell beside a checkpointed one: " + \
            (tmp_path / "first.log").read_text()[-3000:]
        t_kill = results.now()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    reap_ray(ray_tmp)
    assert second is not None and second.returncode == 2, second and second.stderr
    assert "are locked by process" in second.stderr
    before = results.load_rows(root)
    done = set(before.cell[before.status == "done"])
    resumable -= done
    assert resumable
    saved = {cid: path for cid, path, _ in checkpoint_files(root + "/ray", "s3kill")}
    assert resumable <= set(saved)
    assert any(k.endswith("/cell.pt") for k in objects("s3kill/ray/s3kill-1/"))  # on S3 itself
    last_step = {c: int(before[before.cell == c].step.max()) for c in resumable}

    # 2. the same command again: done cells untouched, the interrupted cell resumes from S3
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    print(again.stdout[-3000:], again.stderr[-3000:])
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "taking over the stale lock" in again.stderr
    assert "unfinished cells resume from their last checkpoint" in again.stdout
    after = results.load_rows(root)
    assert {st["state"] for st in cell_states(after, ids).values()} == {"done"}
    assert not after.duplicated(results.KEY).any()
    fs, base = results.filesystem(root)
    files = [i.path for i in fs.get_file_info(pafs.FileSelector(base + "/rows"))
             if i.path.rsplit("/", 1)[-1].startswith("part-")]
    raw = pd.concat([pq.read_table(f, filesystem=fs, schema=results.ROWS).to_pandas()
                     for f in files], ignore_index=True)
    new = raw[raw.written_at > t_kill]
    for cid in done:  # not re-run: nothing written for a done cell after the kill
        assert cid not in set(new.cell)
    resumed_at = {}
    for cid in resumable:  # continued from its checkpoint on S3: no evaluation at step 0 again
        resumed_at[cid] = int(new[new.cell == cid].step.min())
        assert 0 < resumed_at[cid] <= last_step[cid] + 8, new[new.cell == cid]
    print(f"S3 kill/resume: {len(done)} of {len(ids)} cells done at the kill; rows loaded "
          f"before {len(before)}, after {len(after)} ({len(raw)} stored, {len(new)} after the "
          f"kill); interrupted cells' last stored step {last_step}, first step after the "
          f"resume {resumed_at}")
    assert objects("s3kill/tb/")  # TensorBoard event files were uploaded too

    # 3. figures from S3 equal those of an uninterrupted file:// run of the same study
    local = "file://" + str(tmp_path / "local")
    ok = subprocess.run([*cmd[:-1], local], env=env, capture_output=True, text=True,
                        timeout=600, cwd=tmp_path)
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]
    for where, results_root in (("from-s3", root), ("from-file", local)):
        (tmp_path / where).mkdir()  # a URI root's figures go to ./figures
        figs = harness("figures", study, "--results", results_root, env=env, cwd=tmp_path / where)
        assert figs.returncode == 0, figs.stderr
    remote, here = _figure_data(tmp_path / "from-s3" / "figures"), \
        _figure_data(tmp_path / "from-file" / "figures")
    assert remote and remote.keys() == here.keys()
    for name in remote:
        assert remote[name] == here[name], name
    print(f"figure data equal: {', '.join(remote)}")
