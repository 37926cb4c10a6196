"""Cluster scale: teachers as Ray tasks, data-parallel cells through Ray Train (harness.core.parallel).

    python -m pytest tests/test_cluster.py -q                # fast tier: no Ray
    python -m pytest -m slow tests/test_cluster.py -q -x    # Ray tasks, Ray Train, SIGKILLs

Fast: each rank's random draws are its rows of the single worker's draws; ``workers`` and
``teacher_resources`` never enter ids; two gloo processes running the one loop with DDP match
one process to a stated tolerance and resume bit-exactly; a teacher's status reads back.
Slow: a teacher task whose driver is SIGKILLed mid-training shows in ``harness status`` while it
trains and after, and resumes bit-identically; two teachers of one study train at the same time
on a 2-CPU Ray; a 2-worker Ray Train cell matches a 1-worker one and resumes exactly after one of
its workers is SIGKILLed.
"""
from __future__ import annotations

import functools
import glob
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest
import torch
import torch.nn.functional as F

from harness.core import data, nets
from harness.store import results
from harness.orchestrate import teacher as teachers
from harness.declare.config import resolve_cell
from harness.core.diffusion import Denoiser
from harness.core.parallel import ParallelError, Shard, _RankRows
from harness.declare.hashing import cell_id, teacher_id
from harness.orchestrate import status
from harness.orchestrate.status import read_teacher_status, teacher_state
from harness.declare.study import StudyError, parse_study
from harness.orchestrate.sweep import study_status
from harness.core.train import build_student, train_student

from conftest import reap_ray, toy_cfg

LR = 1e-4  # student.lr and aux_lr (the defaults) of every cell compared below


# ---------------------------------------------------------------------------------------------
# fast: the pieces

@pytest.mark.parametrize("world", [2, 4])
def test_rank_draws_are_rows_of_the_single_worker_draws(world):
    """Every per-sample draw of a rank is its rows of the one draw of the whole batch, and the
    random stream ends where the single worker's does (so the one RNG state in rank 0's
    checkpoint is every rank's)."""
    n = 3  # local batch
    x = torch.zeros(n, 2)
    img = torch.zeros(n, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    draws = [lambda b: torch.randn(b, 2), lambda b: torch.randn((b, 2)),
             lambda b: torch.rand(b), lambda b: torch.randint(10, (b,)),
             lambda b: torch.randint(0, 10, size=(b,)),
             lambda b: torch.randn_like(x.new_zeros(b, 2)),
             lambda b: torch.rand_like(x.new_zeros(b, 2)),
             lambda b: torch.randn_like(img.new_zeros(b, 3, 4, 5).contiguous(
                 memory_format=torch.channels_last)),
             lambda b: torch.randn(7)]  # not per sample: the same on every rank
    torch.manual_seed(0)
    single = [d(n * world) for d in draws]
    after = torch.rand(4)
    for rank in range(world):
        torch.manual_seed(0)
        with _RankRows(rank, world, n):
            mine = [d(n) for d in draws]
        for full, part in zip(single[:-1], mine[:-1]):
            assert torch.equal(full[rank * n:(rank + 1) * n], part)
        assert mine[-2].is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(single[-1], mine[-1])
        assert torch.equal(torch.rand(4), after)
    with _RankRows(0, 2, n), pytest.raises(ParallelError, match="normal"):
        torch.normal(torch.zeros(n), 1.0)
    with _RankRows(0, 2, n), pytest.raises(ParallelError, match="dropout2d"):
        F.dropout2d(img, 0.5, True)


@pytest.mark.parametrize("world", [2, 3])
def test_rank_dropout_masks_are_rows_of_the_single_worker_mask(world):
    """Dropout draws its mask inside ATen, out of the hooks' sight: each rank's mask must still
    be its rows of the single worker's (it used to be the same mask on every rank)."""
    n, p = 4, 0.3
    flat = torch.randn(n * world, 5)
    img = torch.randn(n * world, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    for x in (flat, img):
        torch.manual_seed(1)
        single = F.dropout(x, p, True)
        after = torch.rand(3)
        masks = []
        for rank in range(world):
            torch.manual_seed(1)
            mine = x[rank * n:(rank + 1) * n].clone()
            with _RankRows(rank, world, n):
                out = F.dropout(mine, p, training=True)
                same = F.dropout(mine.clone(), p, False)  # eval: untouched, no draw
            assert torch.equal(torch.rand(3), after)  # the stream advanced as the single one's
            assert torch.equal(out, single[rank * n:(rank + 1) * n])
            assert torch.equal(same, x[rank * n:(rank + 1) * n])
            torch.manual_seed(1)
            with _RankRows(rank, world, n):
                F.dropout(mine, p, True, inplace=True)
            assert torch.equal(mine, out)
            masks.append(out == 0)
        assert not all(torch.equal(masks[0], m) for m in masks[1:])  # ranks differ
    with pytest.raises(ParallelError, match="cannot be split"):
        Shard(0, 3).local_batch(64)


def test_workers_and_teacher_resources_are_scheduling_only():
    base = "study: x\ndata: {name: toy2d}\nstudent: {batch: 64}\n"
    plain = parse_study(base)
    dp = parse_study(base + "resources: {cpu: 2, gpu: 0.5, workers: 4}\n"
                     "teacher_resources: {cpu: 4, gpu: 1}\n")
    assert (dp.workers, dp.resources, dp.teacher_resources) == \
        (4, {"cpu": 2.0, "gpu": 0.5}, {"cpu": 4.0, "gpu": 1.0})
    assert plain.workers == 1 and plain.teacher_resources == plain.resources
    fp = data.from_config({"name": "toy2d"}).fingerprint
    assert cell_id(dp.cells[0].config, fp) == cell_id(plain.cells[0].config, fp)
    assert teacher_id(dp.cells[0].config, fp) == teacher_id(plain.cells[0].config, fp)
    with pytest.raises(StudyError, match="resources.workers: 3 workers cannot split "
                                         "student.batch 64"):
        parse_study(base + "resources: {workers: 3}\n")
    with pytest.raises(StudyError, match="teacher_resources.workers: unknown key"):
        parse_study(base + "teacher_resources: {workers: 2}\n")


def test_a_training_teacher_shows_its_eta_and_a_silent_one_shows_as_waiting(tmp_path):
    """`harness status` on a teacher whose status.json says "training": its ETA at its mean rate
    while it writes; once silent for STALE_S (its task queued behind another, or lost), waiting."""
    import json
    import time

    st = {"state": "training", "step": 1000, "total": 4000, "wall_s": 600.0, "loss": 0.5,
          "host": "h", "updated_at": time.time() - 20}
    (tmp_path / status.TEACHER_STATUS).write_text(json.dumps(st))
    line = teacher_state(str(tmp_path), live=True)
    assert line.startswith("training: step 1,000/4,000, loss 0.5, 10m00s of training, ETA ~30m00s "
                           "at its mean rate (updated 2"), line  # 20 s ago, give or take
    st["updated_at"] = time.time() - status.STALE_S - 60
    (tmp_path / status.TEACHER_STATUS).write_text(json.dumps(st))
    line = teacher_state(str(tmp_path), live=True)
    assert line.startswith("waiting at step 1,000/4,000 (no progress for 11m0"), line
    assert "its task resumes it from its checkpoint when Ray gives it a CPU" in line


def test_teacher_status_file_and_status_lines(tmp_path, monkeypatch):
    """load_or_train (single process, as `harness teacher` runs it) keeps status.json; `harness
    status` turns it into a line: interrupted at a step, then done."""
    study = tmp_path / "st.yaml"
    study.write_text("study: st\ndata: {name: toy2d}\nteacher: {kimg: 2.56}\n"
                     "student: {kimg: 0.128}\neval: {n: 100}\n")
    cache = tmp_path / "cache"
    monkeypatch.setenv("HARNESS_CACHE", str(cache))
    cfg = resolve_cell({"data": {"name": "toy2d"}, "teacher": {"kimg": 2.56}})
    dataset = data.from_config(cfg["data"])
    tid, folder = teachers.teacher_dir(str(cache), cfg, dataset)
    before = study_status(str(study), str(tmp_path / "r"))
    assert "not trained yet" in before
    # the study's ETA says the cells wait for the teacher, and that its time is not known yet
    assert "; 1 of the 1 cells left waits for 1 teacher still to train (time unknown until " \
           "they start; their lines below)" in before
    with pytest.raises(InterruptedError):
        teachers.load_or_train(cfg, dataset, str(cache), log=lambda *a: None, max_steps=6)
    st = read_teacher_status(folder)
    assert (st["state"], st["step"], st["total"], st["id"]) == ("stopped", 6, 20, tid)
    stopped = study_status(str(study), str(tmp_path / "r"))
    assert f"teacher {tid} (mlp, 2.56 kimg = 20 steps of 128): interrupted at step 6/20: " \
           f"the next `harness run` resumes it" in stopped
    left = status.teacher_left_s(folder)  # 14 steps more at the 6 steps' mean rate
    assert left == pytest.approx(14 * st["wall_s"] / 6)
    assert f"; 1 of the 1 cells left waits for 1 teacher still to train (~" \
           f"{status.duration(left)} of teacher training left at their mean rates; their lines " \
           f"below)" in stopped
    assert teacher_state(folder, live=True).startswith("interrupted at step 6/20")  # stopped
    assert teacher_state(folder).startswith("partly trained (step 6/20)")  # a dry run's words
    teachers.load_or_train(cfg, dataset, str(cache), log=lambda *a: None)
    st = read_teacher_status(folder)
    assert (st["state"], st["step"], st["resumed_at"]) == ("done", 20, 6)
    assert st["finished_at"] >= st["started_at"]
    done = study_status(str(study), str(tmp_path / "r"))
    assert f"teacher {tid} (mlp, 2.56 kimg = 20 steps of 128): done (cached)" in done
    assert "cells left wait" not in done and status.teacher_left_s(folder) == 0.0


def test_cache_note_on_a_multi_node_cluster(tmp_path, monkeypatch):
    from harness.orchestrate import ray_session as sweep

    assert sweep.cache_note(str(tmp_path), nodes=1) is None
    note = sweep.cache_note(str(tmp_path), nodes=3)  # /tmp: a local filesystem here
    kind = sweep.filesystem_type(str(tmp_path))
    if kind and kind.split(".")[0] in sweep.NETWORK_FS:
        pytest.skip(f"{tmp_path} is on a network filesystem ({kind}) on this machine")
    assert note.startswith(f"note: the teacher cache {tmp_path} is a local path") and \
        "3 nodes" in note and "HARNESS_CACHE" in note
    monkeypatch.setattr(sweep, "filesystem_type", lambda path: "nfs4")
    assert sweep.cache_note(str(tmp_path), nodes=3) is None


# ---------------------------------------------------------------------------------------------
# fast: the one loop, data parallel over two gloo processes (no Ray: a plain process group
# stands in for Ray Train's; the Ray Train path itself is tested in the slow tier below)

class _GlooShard(Shard):
    def ddp(self, module):
        return torch.nn.parallel.DistributedDataParallel(module)


def _image_cfg(loss="sid"):
    return resolve_cell({"data": {"name": "digits"}, "loss": loss,
                         "student": {"kimg": 0.032, "batch": 8, "channels_last": True},
                         "eval": {"n": 8, "every_kimg": 0.016, "samples": 2}})


SCENARIOS = {  # name: (config, steps of the uninterrupted run, max_steps of the interrupted one)
    "toy-sid": (lambda: toy_cfg(student={"kimg": 0.64, "batch": 64},
                                eval={"n": 64, "every_kimg": 0.32, "samples": 4}), 10, 3),
    "toy-ratio_js": (lambda: toy_cfg(loss="ratio_js", student={"kimg": 0.64, "batch": 64},
                                     eval={"n": 64, "every_kimg": 0.32, "samples": 4}), 10, None),
    "toy-di": (lambda: toy_cfg(loss="di", student={"kimg": 0.64, "batch": 64},
                               eval={"n": 64, "every_kimg": 0.32, "samples": 4}), 10, None),
    "image-sid": (_image_cfg, 4, 1),  # unet-xs: GroupNorm, channels_last (NHWC) draws
}


def _scenario(name, cache, ckpt, shard, max_steps=None):
    """Train one scenario with ``shard``; rank 0's checkpoint at ``ckpt``."""
    make, _, _ = SCENARIOS[name]
    cfg = make()
    if name.startswith("toy"):
        dataset = data.load("toy2d")
        teacher, _ = teachers.load_or_train(cfg, dataset, cache, "cpu", log=lambda *a: None)
        x, sigma_data = torch.from_numpy(dataset.x), dataset.sigma_data
    else:  # a random unet-xs teacher on random 1x8x8 data (as tests/test_perf.py)
        torch.manual_seed(0)
        teacher = Denoiser(nets.build("unet-xs", (1, 8, 8)), 0.5)
        x, sigma_data = torch.randn(64, 1, 8, 8).clamp(-1, 1), 0.5
    train_student(cfg, teacher, x, sigma_data, lambda s: {"mean": float(s.mean())}, str(ckpt),
                  lambda ev: None, max_steps=max_steps, shard=shard)


def _rank_main(rank, world, port, cache, out):
    """One of ``world`` gloo processes: every scenario straight, and interrupted then resumed."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        shard = _GlooShard(rank, world)
        for name, (_, _, stop) in SCENARIOS.items():
            _scenario(name, cache, f"{out}/{name}-straight.pt", shard)
            if stop is not None:  # every rank resumes from rank 0's file, once it is written
                _scenario(name, cache, f"{out}/{name}-resumed.pt", shard, max_steps=stop)
                dist.barrier()
                assert torch.load(f"{out}/{name}-resumed.pt", weights_only=True)["step"] == stop
                _scenario(name, cache, f"{out}/{name}-resumed.pt", shard)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_two_workers_match_one_and_resume_exactly(toy_teacher, toy_cache, tmp_path):
    """A 2-worker cell (global batch B, B/2 per rank, gradients averaged by DDP) against the
    1-worker cell with batch B, after k steps (10 for toy2d, 4 for the unet-xs image net).

    Why it can match at all: each rank draws exactly its rows of the single worker's batch
    (latents, data indices, noise levels, noises: see harness.core.parallel), and every network is
    per-sample (GroupNorm in UNet/DDPM++, LayerNorm in the MLP; no BatchNorm anywhere), so a
    rank's forward pass is the single worker's on its rows, and the mean of the two ranks' mean
    losses is the global mean loss.

    Why only to a tolerance: the sums are done in another order (two half-batch means averaged
    by the all-reduce instead of one mean over B, weight gradients accumulated over B/2 rows,
    GEMMs blocked differently for B/2 rows), a relative difference of about 1e-7; Adam then
    divides each gradient by its own running RMS, which amplifies that where a gradient
    component is near zero, and with beta1 = 0 any one step moves a weight by at most a few lr.
    Tolerance: 2% of k * lr on every weight of the generator, EMA and auxiliary net (2e-5 for
    k = 10 at lr 1e-4); observed: at most about 2e-6. The weights move much more than that
    (checked), so the comparison is not vacuous. Resume is exact: the interrupted 2-worker run
    resumed from rank 0's checkpoint ends bit-identical to the uninterrupted 2-worker run.
    """
    import torch.multiprocessing as mp

    torch.set_num_threads(1)
    out = str(tmp_path)
    mp.start_processes(_rank_main, args=(2, _free_port(), toy_cache, out), nprocs=2,
                       start_method="spawn")
    for name, (make, k, stop) in SCENARIOS.items():
        _scenario(name, toy_cache, f"{out}/{name}-single.pt", Shard())
        single = torch.load(f"{out}/{name}-single.pt", weights_only=True)
        two = torch.load(f"{out}/{name}-straight.pt", weights_only=True)
        assert single["step"] == two["step"] == k
        assert torch.equal(single["rng"], two["rng"])  # the same draws, in the same order
        tol = 0.02 * k * LR
        for part in ("generator", "ema", "aux"):
            assert _max_diff(single[part], two[part]) <= tol, (name, part)
        if name == "toy-sid":  # not vacuous: k steps moved the weights far more than tol
            teacher, _, dataset = toy_teacher
            state = {k: v.detach().cpu() for k, v in teacher.net.state_dict().items()}
            start, _ = build_student(make(), state, (2,), dataset.sigma_data)
            assert _max_diff(start.state_dict(), single["generator"]) > 10 * tol
        if stop is not None:  # interrupted at step `stop`, resumed: bit-identical
            resumed = torch.load(f"{out}/{name}-resumed.pt", weights_only=True)
            for part in ("generator", "ema", "aux", "opt_g", "opt_aux", "rng", "step"):
                assert _same(two[part], resumed[part]), (name, part)


def _same(a, b) -> bool:
    """Bit-for-bit equality of nested checkpoint contents."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


# ---------------------------------------------------------------------------------------------
# slow: through Ray (each with its own Ray temp dir: other Ray instances may run on the machine)

TOY = """\
study: {name}
data: {{name: toy2d}}
teacher: {{kimg: {teacher_kimg}}}
student: {{kimg: {kimg}, batch: 64}}
eval: {{n: 200, every_kimg: 0.5}}
"""


def write_study(folder, name, extra="", kimg=1.5, teacher_kimg=4):
    path = pathlib.Path(folder) / f"{name}.yaml"
    path.write_text(TOY.format(name=name, kimg=kimg, teacher_kimg=teacher_kimg)
                    + textwrap.dedent(extra))
    return str(path)


@pytest.fixture
def ray_tmp():
    """A Ray temp dir of one test's own (short: Ray's socket paths live in it)."""
    path = tempfile.mkdtemp(prefix="rc", dir="/tmp")
    yield path
    reap_ray(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def local_ray():
    """A 2-CPU Ray of this module's own (own temp dir), shut down at the end."""
    import logging

    import ray
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    ray.shutdown()
    path, saved = tempfile.mkdtemp(prefix="rc", dir="/tmp"), os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = path
    ray.init(num_cpus=2, log_to_driver=False, include_dashboard=False,
             logging_level=logging.WARNING)
    yield
    ray.shutdown()
    if saved is None:
        os.environ.pop("RAY_TMPDIR", None)
    else:
        os.environ["RAY_TMPDIR"] = saved
    reap_ray(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
def test_teacher_task_killed_with_its_driver_resumes_bit_identically(tmp_path, ray_tmp):
    """`harness run` is SIGKILLed while its teacher task trains: `harness status` shows the
    teacher training, then interrupted at its step; the next run resumes it from its checkpoint,
    and the teacher ends bit-identical to one trained without interruption (one thread, as the
    task's 1 CPU gives it)."""
    study = write_study(tmp_path, "tkill", kimg=0.128, teacher_kimg=100)  # 782 teacher steps
    root, cache = str(tmp_path / "r"), str(tmp_path / "cache")
    env = {**os.environ, "HARNESS_CACHE": cache, "RAY_TMPDIR": ray_tmp, "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    cfg = resolve_cell({"data": {"name": "toy2d"}, "teacher": {"kimg": 100}})
    dataset = data.from_config(cfg["data"])
    tid, folder = teachers.teacher_dir(cache, cfg, dataset)
    cmd = [sys.executable, "-m", "harness.cli", "run", study, "--results", root]
    saved = os.environ.get("HARNESS_CACHE")
    os.environ["HARNESS_CACHE"] = cache  # for study_status in this process
    try:
        with open(tmp_path / "first.log", "w") as log:
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, cwd=tmp_path)
            deadline, st, line = time.time() + 300, None, f"teacher {tid} (mlp on toy2d)  step "
            while time.time() < deadline and proc.poll() is None:  # mid-way, progress printed
                st = read_teacher_status(folder)
                if st and st["state"] == "training" and 0.1 < st["step"] / st["total"] < 0.8 \
                        and line in (tmp_path / "first.log").read_text():
                    break
                time.sleep(0.05)
            assert st and st["state"] == "training", (tmp_path / "first.log").read_text()[-3000:]
            live = study_status(study, root)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        reap_ray(ray_tmp)
        assert f"teacher {tid} (mlp, 100 kimg = 782 steps of 128): training: step " in live, live
        st = read_teacher_status(folder)
        stopped = study_status(study, root)
        assert f"teacher {tid} (mlp, 100 kimg = 782 steps of 128): interrupted at step " \
               f"{st['step']}/782" in stopped, stopped
        first = (tmp_path / "first.log").read_text()
        assert "teachers: 1 Ray task(s), 1 CPU and 0 GPU each" in first
        assert line in first  # progress printed by the driver

        second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600,
                                cwd=tmp_path)
        print(first, second.stdout, second.stderr)  # shown with -s
        assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
        assert f"teacher {tid} (mlp on toy2d)  resuming at step " in second.stdout
        assert f"teacher {tid} (mlp on toy2d)  done: 782 steps" in second.stdout
        assert read_teacher_status(folder)["resumed_at"] > 0
        assert "done (cached)" in study_status(study, root)
    finally:
        if saved is None:
            os.environ.pop("HARNESS_CACHE", None)
        else:
            os.environ["HARNESS_CACHE"] = saved

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        straight, _ = teachers.load_or_train(cfg, dataset, str(tmp_path / "straight"),
                                             log=lambda *a: None)
    finally:
        torch.set_num_threads(threads)
    resumed = torch.load(os.path.join(folder, "teacher.pt"), weights_only=True)["ema"]
    assert resumed.keys() == straight.net.state_dict().keys()
    assert all(torch.equal(v, resumed[k]) for k, v in straight.net.state_dict().items())


@pytest.mark.slow
def test_two_teachers_train_in_parallel(tmp_path, local_ray, capsys, monkeypatch):
    """Two teachers (teacher.seed 0 and 1) of one study on a 2-CPU Ray: two tasks of 1 CPU each,
    whose training intervals (status.json: started_at .. finished_at) overlap."""
    cache = str(tmp_path / "cache")
    monkeypatch.setenv("HARNESS_CACHE", cache)
    from harness.orchestrate.sweep import run_study

    study = write_study(tmp_path, "two", "grid: {teacher.seed: [0, 1]}\n", kimg=0.128,
                        teacher_kimg=40)
    assert run_study(study, results=str(tmp_path / "r")) == 0
    out = capsys.readouterr().out
    folders = sorted(glob.glob(f"{cache}/teachers/t-*"))
    assert len(folders) == 2
    spans = []
    for folder in folders:
        st = read_teacher_status(folder)
        assert st["state"] == "done" and st["resumed_at"] is None
        spans.append((st["started_at"], st["finished_at"]))
        assert f"teacher {st['id']} (mlp on toy2d)  done: 313 steps" in out
    (a0, a1), (b0, b1) = spans
    assert max(a0, b0) < min(a1, b1), spans  # both were training at the same time
    assert "teachers: 2 Ray task(s), 1 CPU and 0 GPU each" in out


def test_a_wave_waits_only_for_teachers_due_within_an_experiment_start():
    """Cells a and b need teacher q (cached), c needs s (training): the wave of a and b starts
    now when s is due later than an experiment takes to start or has no rate yet, and waits
    (so c joins it) when s is due sooner; nothing starts before some cell's teachers are ready."""
    from harness.orchestrate.sweep import WAVE_START_S, start_wave

    needs = {"a": {"q"}, "b": {"q"}, "c": {"s"}}
    left = ["a", "b", "c"]
    assert start_wave(left, needs, {"q"}, lambda t: 10 * WAVE_START_S)
    assert start_wave(left, needs, {"q"}, lambda t: None)
    assert not start_wave(left, needs, {"q"}, lambda t: WAVE_START_S / 3)
    assert not start_wave(left, needs, set(), lambda t: None)
    assert start_wave(left, needs, {"q", "s"}, lambda t: 0.0)  # every teacher ready
    assert start_wave(["a"], needs, {"q"}, lambda t: 1.0)  # no cell left waits for s


@pytest.mark.slow
def test_cells_start_as_soon_as_their_own_teachers_are_cached(tmp_path, local_ray, capsys,
                                                             monkeypatch):
    """A quick teacher (1.28 kimg) and a slow one (160 kimg) on a 2-CPU Ray: the quick
    teacher's cell trains in a first Ray experiment beside the slow teacher (its final line
    comes before the slow teacher's done line, which the driver prints from inside that
    experiment), and the slow teacher's cell runs in a second one once it is cached."""
    cache = str(tmp_path / "cache")
    monkeypatch.setenv("HARNESS_CACHE", cache)
    from harness.orchestrate import sweep
    from harness.orchestrate.sweep import run_study

    # the slow teacher trains for seconds: on a fast machine it may be due within an
    # experiment's start, and the cells would rightly run together (the test above)
    monkeypatch.setattr(sweep, "WAVE_START_S", 0.0)
    study = tmp_path / "waves.yaml"
    study.write_text("study: waves\ndata: {name: toy2d}\nstudent: {kimg: 0.256, batch: 64}\n"
                     "eval: {n: 200, every_kimg: 0.5}\ngrid: {teacher.kimg: [1.28, 160]}\n")
    study = str(study)
    root = str(tmp_path / "r")
    assert run_study(study, results=root) == 0
    out = capsys.readouterr().out
    slow = next(st["id"] for st in map(read_teacher_status, glob.glob(f"{cache}/teachers/t-*"))
                if st["total"] == 1250)
    assert f"1 cells start now; 1 wait for teacher {slow} (still training) and start in the " \
           f"next Ray experiment" in out, out
    assert "Ray experiment waves-1: 1 cells" in out and "Ray experiment waves-2: 1 cells" in out
    first_done = re.search(r"cell \w+ \[[^\]]*\]  kimg [\d.]+/0\.256  \S+ [\d.e+-]+  done  ", out)
    assert first_done is not None, out
    slow_done = out.index(f"teacher {slow} (mlp on toy2d)  done: 1,250 steps")
    assert first_done.start() < slow_done < out.index("Ray experiment waves-2"), out
    assert "cells not finished" not in out  # the first wave does not say "run it again"
    # one clock for teachers and cells, and the count of finished cells across both waves
    unit = {"h": 3600, "m": 60, "s": 1}
    heads = [sum(int(n) * unit[u] for n, u in re.findall(r"(\d+)([hms])", h))
             for h in re.findall(r"^\[\+([\dhms]+)\]", out, flags=re.M)]
    assert heads == sorted(heads), heads
    assert re.findall(r"done  \(\S+; (\d)/2 cells finished\)", out) == ["1", "2"], out
    rows = results.load_rows(root)
    rows = rows[~rows["cell"].str.startswith("ref-")]  # the teachers' reference rows
    assert rows.loc[rows["status"] == "done", "cell"].nunique() == rows["cell"].nunique() == 2


def _dp_cell(cfg, root, cache, ckpt, *, out, tag, kill_after=None, **kw):
    """run_cell that keeps a copy of rank 0's final checkpoint as ``<out>/<tag>.pt``, logs each
    attempt of rank 0 (``<out>/<tag>.jsonl``: resumed from step k), and with ``kill_after``
    SIGKILLs rank 1's process once, 6 s after its report at that kimg (Ray Train's controller
    collects reports every 2 s: a worker dead sooner can take that report's checkpoint with it,
    and the retry then resumes, still exactly, from the one before)."""
    from harness.orchestrate.cell import run_cell

    shard = kw.get("shard") or Shard()
    if shard.lead:
        step = torch.load(ckpt, weights_only=True)["step"] if os.path.exists(ckpt) else None
        with open(f"{out}/{tag}.jsonl", "a") as f:
            f.write(json.dumps({"resumed_at": step, "world": shard.world}) + "\n")
    report = kw.pop("on_eval")
    marker = f"{out}/{tag}.killed"

    def on_eval(ev):
        report(ev)
        if shard.lead and ev.status == "done":
            shutil.copy(ckpt, f"{out}/{tag}.pt")
        if kill_after is not None and shard.rank == 1 and ev.kimg >= kill_after \
                and not os.path.exists(marker):
            open(marker, "w").close()
            time.sleep(6)
            os.kill(os.getpid(), signal.SIGKILL)

    return run_cell(cfg, root, cache, ckpt, on_eval=on_eval, **kw)


@pytest.mark.slow
def test_data_parallel_cell_through_ray_train(tmp_path, local_ray, capsys, monkeypatch):
    """`resources: {workers: 2}`: the cell runs as a 2-worker TorchTrainer (gloo) inside its Tune
    trial; it matches the 1-worker cell (same cell id) to the tolerance of
    test_two_workers_match_one_and_resume_exactly (2% of k * lr, k = 24 steps here), and after
    one of its workers is SIGKILLed at kimg 1 the retried trial resumes from rank 0's Train
    checkpoint and ends bit-identical to the uninterrupted 2-worker run."""
    from harness.orchestrate.sweep import run_study

    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    out = str(tmp_path)
    roots = {}
    for tag, extra, fn in (
            ("one", "", functools.partial(_dp_cell, out=out, tag="one")),
            ("two", "resources: {cpu: 1, workers: 2}\n",
             functools.partial(_dp_cell, out=out, tag="two")),
            ("killed", "resources: {cpu: 1, workers: 2}\nmax_failures: 1\n",
             functools.partial(_dp_cell, out=out, tag="killed", kill_after=1.0))):
        roots[tag] = str(tmp_path / tag / "r")
        os.makedirs(tmp_path / tag)
        study = write_study(tmp_path / tag, "dp", extra)
        assert run_study(study, results=roots[tag], cell_fn=fn) == 0, capsys.readouterr().out
        lines = capsys.readouterr().out
        print(lines)
        if tag != "one":
            assert "1 cells, 2 Ray Train workers each (data parallel)" in lines
            assert "kimg 1.5/1.5  mmd_toy2d_200" in lines and " done " in lines  # progress
    one, two, killed = (torch.load(f"{out}/{t}.pt", weights_only=True)
                        for t in ("one", "two", "killed"))
    k = one["step"]
    assert k == two["step"] == killed["step"] == 24
    assert torch.equal(one["rng"], two["rng"])
    for part in ("generator", "ema", "aux"):
        assert _max_diff(one[part], two[part]) <= 0.02 * k * LR, part
    attempts = [json.loads(line) for line in open(f"{out}/killed.jsonl")]
    assert [a["world"] for a in attempts] == [2, 2]
    assert attempts[0]["resumed_at"] is None and attempts[1]["resumed_at"] > 0, attempts
    for part in ("generator", "ema", "aux", "opt_g", "opt_aux", "rng", "step"):
        assert _same(two[part], killed[part]), part
    rows = {t: results.load_rows(roots[t]) for t in roots}
    final = {t: df[(df.status == "done") & (df.metric == "mmd_toy2d_200")].value.item()
             for t, df in rows.items()}
    assert final["killed"] == final["two"]
    assert os.path.isdir(f"{roots['two']}/ray/train")  # Ray Train's run beside Tune's
