"""Recorded versions (``versions/*.json`` beside the rows), the warning ``harness status`` gives
when this machine's versions can change numbers, and the tested dependency set
(``harness env --write-constraints``, ``.ci/constraints.txt``)."""
from __future__ import annotations

import importlib.metadata as md
import json
import pathlib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from harness.store import environment, results

from test_cli import cli, fake_rows, write_study

REPO = pathlib.Path(__file__).resolve().parents[1]
BASE = {"python": "3.11.7", "harness": "0.1.0", "torch": "2.14.1", "numpy": "2.4.6",
        "torch-fidelity": "0.4.0", "ray": "2.60.0", "cuda": "13.0", "cudnn": "9.24.0.43",
        "device": "cpu"}


def doc(at="2026-01-01T00:00:00+00:00", **versions):
    return {"versions": {**BASE, **versions}, "recorded_at": at, "host": "h"}


def test_same_minor_versions_do_not_warn():
    running = {**BASE, "torch": "2.14.3+cu130", "numpy": "2.4.0", "ray": "2.70.0",
               "python": "3.12.1"}
    assert environment.drift([doc()], running) == []
    assert environment.drift([], running) == []  # nothing recorded: nothing to compare


def test_a_minor_version_change_warns_naming_each_package_and_the_fix():
    (line,) = environment.drift([doc()], {**BASE, "torch": "2.15.0", "numpy": "2.5.1"})
    assert line.startswith("warning: this machine runs torch 2.15 (the study's rows: 2.14), "
                           "numpy 2.5 (the study's rows: 2.4)")
    assert 'pip install "torch==2.14.*" "numpy==2.4.*"' in line
    assert "torch-fidelity" not in line  # unchanged


def test_cuda_and_cudnn_count_only_for_rows_computed_on_a_gpu():
    running = {**BASE, "cuda": None, "cudnn": None}  # a CPU build of torch
    assert environment.drift([doc()], running) == []
    (line,) = environment.drift([doc(device="NVIDIA H200")], running)
    assert "cuda none (the study's rows: 13.0)" in line and "cudnn none" in line
    (line,) = environment.drift([doc(device="NVIDIA H200")], {**BASE, "cudnn": "9.30.1"})
    assert "cudnn 9.30 (the study's rows: 9.24)" in line and "cuda " not in line


def test_rows_from_two_sets_of_versions_warn_once_and_compare_with_the_newest():
    old, new = doc("2026-01-01T00:00:00+00:00", torch="2.13.0"), doc("2026-02-01T00:00:00+00:00")
    lines = environment.drift([new, old], BASE)
    assert len(lines) == 1 and "computed with different versions (torch 2.13 / 2.14)" in lines[0]
    lines = environment.drift([old, new], {**BASE, "torch": "2.13.1"})
    assert len(lines) == 2 and "torch 2.13 (the study's rows: 2.14)" in lines[1]


def test_a_driver_without_a_gpu_beside_gpu_workers_is_not_a_second_set():
    """The driver records its CPU process when it writes a failed cell's row; CUDA and cuDNN
    are compared among the rows computed on a GPU only, with the newest of those."""
    worker = doc("2026-01-01T00:00:00+00:00", device="NVIDIA H200")
    driver = doc("2026-01-02T00:00:00+00:00", cuda=None, cudnn=None)
    assert environment.drift([worker, driver], BASE) == []
    (line,) = environment.drift([worker, driver], {**BASE, "cuda": "12.8"})
    assert line.startswith("warning: this machine runs cuda 12.8 (the study's rows: 13.0)")


def test_written_rows_record_this_process_versions_once(tmp_path):
    root = str(tmp_path / "r")
    row = {"study": "s", "cell": "c", "kimg": 0.0, "step": 0, "metric": "m", "value": 1.0,
           "status": "running"}
    results.write_rows(root, [row])
    results.write_rows(root, [row])
    files = list((tmp_path / "r" / "versions").iterdir())
    assert len(files) == 1
    (recorded,) = results.load_versions(root)
    assert recorded["versions"] == {**environment.current(), "device": "cpu"}
    assert recorded["versions"]["torch"] == md.version("torch")
    # the file name is a hash of the versions: another process with the same set rewrites nothing
    assert files[0].name == environment.record()[0]


def test_status_warns_when_this_machine_runs_other_versions(tmp_path):
    study = write_study(tmp_path, "envs", "grid: {seed: [0, 1]}\n")
    root = tmp_path / "r"
    fake_rows(study, root, {0: "done"})
    code, out, err = cli("status", study, "--results", root, cwd=tmp_path)
    assert code == 0, err
    assert "warning:" not in out and "no versions recorded" not in out  # recorded just now
    for f in (root / "versions").iterdir():  # as if the rows came from an older torch
        f.unlink()
    (root / "versions" / "old.json").write_text(json.dumps(doc(torch="1.13.1")))
    code, out, err = cli("status", study, "--results", root, cwd=tmp_path)
    assert code == 0, err
    running = environment.minor(md.version("torch"))
    assert f"warning: this machine runs torch {running} (the study's rows: 1.13)" in out, out
    code, out, err = cli("run", study, "--results", root, "--dry-run", cwd=tmp_path)
    assert code == 0 and "warning: this machine runs torch" in out, out + err
    (root / "versions" / "old.json").unlink()
    for name, text in (("a.json", "{not json"), ("b.json", '{"versions": {"torch": 2}}'),
                       ("c.json", '{"versions": {}, "recorded_at": 5}'), ("d.json", "[]")):
        (root / "versions" / name).write_text(text)  # not ours: left out, never a crash
    code, out, err = cli("status", study, "--results", root, cwd=tmp_path)
    assert code == 0 and "note: no versions recorded with these rows" in out, out + err


def test_write_constraints_pins_the_installed_closure(tmp_path):
    path = tmp_path / "c.txt"
    code, out, err = cli("env", "--write-constraints", path, cwd=tmp_path)
    assert code == 0, err
    pins = dict(line.split("==") for line in path.read_text().splitlines()
                if line and not line.startswith("#"))
    assert pins["torch"] == md.version("torch").split("+")[0]
    assert pins["pytest"] == md.version("pytest")  # the test extra is in the set
    assert "harness" not in pins
    assert f"{len(pins)} pinned distributions" in out


@pytest.mark.parametrize("where", ["folder", "missing/c.txt"])
def test_write_constraints_to_a_bad_path_exits_2(tmp_path, where):
    (tmp_path / "folder").mkdir()
    code, out, err = cli("env", "--write-constraints", tmp_path / where, cwd=tmp_path)
    assert code == 2 and f"--write-constraints {tmp_path / where}" in err, err
    assert "Traceback" not in err and not (tmp_path / "missing").exists()


def test_committed_constraints_satisfy_every_declared_requirement():
    """Adding or tightening a dependency in pyproject.toml without regenerating
    .ci/constraints.txt fails here."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + [r for reqs in project["optional-dependencies"].values()
                                          for r in reqs]
    lines = (REPO / ".ci" / "constraints.txt").read_text().splitlines()
    pins = {canonicalize_name(n): v for n, v in (line.split("==") for line in lines
                                                 if line and not line.startswith("#"))}
    for text in declared:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not pinned in .ci/constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), (text, pins[name])
