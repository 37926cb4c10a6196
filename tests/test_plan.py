"""``harness plan``: the work left x its kimg over a throughput (given or measured by a warm-up),
in core-/GPU-hours and wall time on N workers; ``harness status`` against the saved plan."""
from __future__ import annotations

import json
import math

import pytest
import torch

from harness.store import results
from harness.orchestrate import warmup
from harness.declare.config import resolve_cell
from harness.declare.hashing import teacher_id
from harness.orchestrate.plan import schedule
from harness.orchestrate.status import fingerprints
from harness.declare.study import load_study

from test_cli import cli, fake_rows, write_study

GRID = "grid: {seed: [0, 1, 2]}\nresources: {cpu: 1}\n"  # 3 cells of 2 kimg, a 4-kimg teacher


@pytest.fixture
def empty_cache(tmp_path):
    return {"HARNESS_CACHE": str(tmp_path / "cache")}


def test_plan_with_a_given_throughput(tmp_path, empty_cache):
    study = write_study(tmp_path, "p", GRID)
    root = tmp_path / "r"
    code, out, err = cli("plan", study, "--results", root, "--img-per-s", 100, "--workers", 2,
                         cwd=tmp_path, env=empty_cache)
    assert code == 0, err
    assert "3 cells, 3 still to run" in out
    # teacher: 4 kimg / 100 img/s = 40 s; cells: 3 x 2 kimg / 100 img/s = 60 s, one core each
    assert "teachers: 1 x teacher mlp on toy2d" in out and ": 4 kimg at 100 img/s (given, " \
        "--img-per-s) = 40s of training" in out, out
    assert ": 6 kimg at 100 img/s (given) = 1m00s of training" in out, out
    assert "cells compute: 0.01667 core-hours" in out
    assert "teachers compute: 0.01111 core-hours" in out
    assert "total compute: 0.02778 core-hours" in out
    # 2 at a time: the teacher (40 s), then cells of 20 s: 20 + 20 (two at once, then one)
    assert "wall on 2 workers (2 at a time): ~1m20s (teachers 40s, then cells 40s)" in out, out
    plan = json.loads((root / "plan.json").read_text())
    assert [e["img_per_s"] for e in plan["cells"].values()] == [100]
    # --teacher-img-per-s sets the teachers' rate alone; one worker runs everything in turn
    code, out, err = cli("plan", study, "--results", root, "--img-per-s", 100,
                         "--teacher-img-per-s", 400, "--workers", 1, cwd=tmp_path, env=empty_cache)
    assert "4 kimg at 400 img/s (given) = 10s" in out
    assert "~1m10s (teachers 10s, then cells 1m00s)" in out


def test_durations_stay_readable_at_absurd_rates(tmp_path, empty_cache):
    from harness.orchestrate.status import duration

    assert [duration(s) for s in (0, 59.6, 187, 5 * 3600 + 125, 999 * 86400)] == \
        ["0s", "1m00s", "3m07s", "5h02m", "23976h00m"]
    assert duration(1000 * 86400) == "2.7 years" and duration(float("inf")) == "inf years"
    assert duration(float("nan")) == "unknown"
    study = write_study(tmp_path, "absurd", GRID)
    code, out, err = cli("plan", study, "--results", tmp_path / "r", "--img-per-s", "1e-300",
                         cwd=tmp_path, env=empty_cache)
    assert code == 0, err
    assert "= 1.9e+296 years of training" in out and max(map(len, out.splitlines())) < 300, out


def test_plan_counts_only_what_is_left(tmp_path, empty_cache):
    study = write_study(tmp_path, "left", GRID)
    root = tmp_path / "r"
    fake_rows(study, root, {0: "done", 1: "running"})  # cell 1: 1 of its 2 kimg trained
    s = load_study(str(study))
    fp, _ = fingerprints(s)
    cfg = s.cells[0].config
    folder = tmp_path / "cache" / "teachers" / teacher_id(cfg, fp(cfg["data"]))
    folder.mkdir(parents=True)
    (folder / "status.json").write_text(json.dumps({"state": "stopped", "step": 25, "total": 100}))
    code, out, err = cli("plan", study, "--results", root, "--img-per-s", 100, "--workers", 2,
                         cwd=tmp_path, env=empty_cache)
    assert code == 0, err
    assert "3 cells, 2 still to run" in out
    assert ": 3 kimg at 100 img/s (given) = 30s" in out  # 1 kimg of cell 1, 2 of cell 2
    assert ": 3 kimg at 100 img/s (given, --img-per-s) = 30s" in out  # 75% of the teacher left
    assert "~50s (teachers 30s, then cells 20s)" in out, out
    (folder / "teacher.pt").write_bytes(b"")  # a cached teacher costs nothing
    code, out, err = cli("plan", study, "--results", root, "--img-per-s", 100, cwd=tmp_path,
                         env=empty_cache)
    assert "teachers: none to train" in out and "teachers 0s" in out


def test_a_finished_study_has_nothing_to_plan(tmp_path, empty_cache):
    study = write_study(tmp_path, "fin", GRID)
    root = tmp_path / "r"
    fake_rows(study, root, {0: "done", 1: "done", 2: "diverged"})
    code, out, err = cli("plan", study, "--results", root, cwd=tmp_path, env=empty_cache)
    assert code == 0 and "3 cells, 0 still to run" in out and "no plan saved" in out, out + err
    assert not (root / "plan.json").exists()


def test_schedule_is_longest_first_on_the_freest_worker():
    assert schedule([20, 20, 20], 2) == 40
    assert schedule([30, 20, 20, 10], 2) == 40
    assert schedule([5], 4) == 5


@pytest.mark.parametrize("args", [["--img-per-s", "0"], ["--img-per-s", "-3"],
                                  ["--img-per-s", "nan"], ["--img-per-s", "fast"],
                                  ["--workers", "0"], ["--workers", "2.5"],
                                  ["--teacher-img-per-s", "inf"], ["--warm-up-s", "-1"]])
def test_plan_bad_numbers_exit_2(tmp_path, args):
    study = write_study(tmp_path, "bad", GRID)
    code, out, err = cli("plan", study, "--results", tmp_path / "r", *args, cwd=tmp_path)
    assert code == 2 and args[0] in err, err
    assert not (tmp_path / "r").exists()


def test_plan_of_a_missing_study_exits_2(tmp_path):
    code, out, err = cli("plan", tmp_path / "none.yaml", "--img-per-s", 10, cwd=tmp_path)
    assert code == 2 and "none.yaml" in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="measures on the GPU when there is one")
def test_plan_of_a_gpu_study_without_a_gpu_asks_for_the_throughput(tmp_path):
    study = write_study(tmp_path, "gpu", "grid: {seed: [0]}\nresources: {cpu: 1, gpu: 1}\n")
    code, out, err = cli("plan", study, "--results", tmp_path / "r", cwd=tmp_path)
    assert code == 2 and "no CUDA device" in err and "--img-per-s" in err, err
    assert not (tmp_path / "r").exists()
    code, out, err = cli("plan", study, "--results", tmp_path / "r", "--img-per-s", 500,
                         cwd=tmp_path)
    assert code == 0 and "GPU-hours" in out, err


def test_plan_measures_by_a_warm_up_and_status_compares(tmp_path, empty_cache):
    study = write_study(tmp_path, "warm", "grid: {seed: [0, 1]}\nresources: {cpu: 1}\n")
    root = tmp_path / "r"
    code, out, err = cli("plan", study, "--results", root, "--warm-up-s", 0.3, cwd=tmp_path,
                         env=empty_cache, timeout=300)
    assert code == 0, err
    assert "(measured: " in out and "steps on cpu, 1 thread)" in out, out
    plan = json.loads((root / "plan.json").read_text())
    (cell_rate,) = [e["img_per_s"] for e in plan["cells"].values()]
    assert cell_rate > 0 and len(plan["teachers"]) == 1
    # two cells report their throughput: status puts the median beside the plan
    ids = fake_rows(study, root, {0: "running", 1: "running"})
    results.write_rows(str(root), [
        {"study": "warm", "cell": cid, "kimg": 1.0, "step": 16, "metric": "img_per_s",
         "value": cell_rate * f, "status": "running"} for cid, f in zip(ids, (0.5, 1.5))])
    code, out, err = cli("status", study, "--results", root, cwd=tmp_path, env=empty_cache)
    assert code == 0, err
    assert f"planned {cell_rate:.4g} img/s (measured: " in out, out
    assert f"2 cells measure {cell_rate:.4g} img/s (median), 1.00x the plan" in out, out


def test_time_cell_runs_the_real_step_on_digits():
    cfg = resolve_cell({"data": {"name": "digits"}, "loss": "sid",
                        "init": {"name": "mapping_match"},  # replaced: a warm-up never regresses
                        "student": {"batch": 16}})
    m = warmup.time_cell(cfg, (1, 8, 8), 0.5, "cpu", threads=1, warm=1, budget_s=0.2,
                         min_steps=2, max_steps=4)
    assert 2 <= m["steps"] <= 4 and math.isfinite(m["img_per_s"]) and m["img_per_s"] > 0


@pytest.mark.parametrize("plan", ['{"cells": {KEY: 5}, "teachers": {}}', "not json",
                                  '{"cells": {KEY: {"img_per_s": "fast"}}, "teachers": {}}',
                                  '{"cells": {KEY: {"img_per_s": -1}}, "teachers": []}',
                                  '{"cells": {KEY: {"img_per_s": 100}}, "teachers": {}}'])
def test_status_ignores_a_plan_it_cannot_read(tmp_path, plan):
    from harness.orchestrate.throughput import cell_key

    study = write_study(tmp_path, "junk", "grid: {seed: [0]}\n")
    root = tmp_path / "r"
    (cid,) = fake_rows(study, root, {0: "running"})
    results.write_rows(str(root), [{"study": "junk", "cell": cid, "kimg": 1.0, "step": 16,
                                    "metric": "img_per_s", "value": 50.0, "status": "running"}])
    key = json.dumps(cell_key(load_study(str(study)).cells[0].config))
    (root / "plan.json").write_text(plan.replace("KEY", key))
    code, out, err = cli("status", study, "--results", root, cwd=tmp_path)
    assert code == 0 and "Traceback" not in err, err
    valid = '"img_per_s": 100' in plan  # the same key with a readable rate is compared
    assert ("planned 100 img/s (?); 1 cell measures 50 img/s (median), 0.50x the plan" in out) \
        == valid, out
