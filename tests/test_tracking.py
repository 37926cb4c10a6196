"""Trackers (harness.store.tracking): the study setting, TensorBoard event files, MLflow runs, and
that a failing tracker never fails a cell. Default tier; MLflow parts skip without mlflow.

    python -m pytest -q tests/test_tracking.py
"""
from __future__ import annotations

import glob
import os
import socket
import struct
import textwrap

import numpy as np
import pytest

from harness.declare import hashing
from harness.store import tracking
from harness.declare.study import StudyError, parse_study

from conftest import toy_cfg

STUDY = """\
    study: tr
    data: {name: toy2d}
    grid: {seed: [0, 1]}
    """


def read_events(folder) -> list:
    """Every Event in a TensorBoard run folder, file by file (TFRecord framing)."""
    from tensorboardX.proto.event_pb2 import Event

    out = []
    for path in sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*"))):
        data, i = open(path, "rb").read(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = Event()
            event.ParseFromString(data[i + 12:i + 12 + n])
            out.append(event)
            i += 12 + n + 4
    return out


def scalars(events) -> dict[str, list[tuple[int, float]]]:
    out: dict = {}
    for e in events:
        for v in e.summary.value:
            if v.WhichOneof("value") == "simple_value":
                out.setdefault(v.tag, []).append((e.step, v.simple_value))
    return out


def texts(events) -> dict[str, list[str]]:
    out: dict = {}
    for e in events:
        for v in e.summary.value:
            if v.tag.endswith("/text_summary"):
                out.setdefault(v.tag.split("/")[0], []).append(v.tensor.string_val[0].decode())
    return out


def row(metric, value, kimg, status="running", message=None):
    return {"metric": metric, "value": value, "kimg": kimg, "step": int(kimg * 1000 / 64),
            "status": status, "message": message}


# ---------------------------------------------------------------------------------------------
# the study setting

def test_tracking_setting_defaults_and_is_not_in_cell_ids():
    plain = parse_study(textwrap.dedent(STUDY))
    assert plain.tracking == {"tensorboard": True, "mlflow": None}
    tracked = parse_study(textwrap.dedent(STUDY) + "tracking: {tensorboard: false, mlflow: "
                          "{uri: 'http://127.0.0.1:5000', experiment: abl}}\n")
    assert tracked.tracking == {"tensorboard": False,
                                "mlflow": {"uri": "http://127.0.0.1:5000", "experiment": "abl"}}
    ids = lambda s: [hashing.cell_id(c.config, "fp") for c in s.cells]  # noqa: E731
    assert ids(plain) == ids(tracked)
    assert parse_study(textwrap.dedent(STUDY) + "tracking: {mlflow: {uri: databricks}}\n") \
        .tracking["mlflow"] == {"uri": "databricks", "experiment": None}


@pytest.mark.parametrize("body, expected", [
    ("tracking: [tensorboard]", "s.yaml:4: tracking: expected a mapping, got a list"),
    ("tracking: {tensorbord: true}", "s.yaml:4: tracking.tensorbord: unknown key 'tensorbord'; "
                                     "known: tensorboard, mlflow"),
    ("tracking: {tensorboard: 1}", "tracking.tensorboard: expected true or false"),
    ("tracking: {mlflow: {experiment: x}}", "tracking.mlflow.uri: the MLflow tracking URI is "
                                            "missing; write e.g. tracking: {mlflow: {uri: "),
    ("tracking: {mlflow: {uri: mlruns}}", "tracking.mlflow.uri: expected a URI, got 'mlruns'"),
    ("tracking: {mlflow: {uri: 'http://h', run: 1}}", "tracking.mlflow.run: unknown key 'run'; "
                                                       "known: uri, experiment"),
    ("tracking: {mlflow: true}", "tracking.mlflow: expected a mapping or null, got a boolean"),
])
def test_bad_tracking_settings(body, expected):
    with pytest.raises(StudyError) as e:
        parse_study(textwrap.dedent(STUDY) + body + "\n", source="s.yaml")
    assert expected in str(e.value)


# ---------------------------------------------------------------------------------------------
# TensorBoard

def test_tensorboard_scalars_samples_text_and_resume(tmp_path):
    root = str(tmp_path / "r")
    cfg = {"student": {"lr": 1e-4}, "loss": {"name": "sid"}}
    t = tracking.open_trackers({}, root, "st", "c0ffee", cfg, {"loss": "sid", "seed": 0})
    t.log_rows([row("mmd_toy2d_1k", 0.5, 0.0), row("generator_params", 1234.0, 0.0)])
    t.log_samples(0.0, np.arange(16 * 3 * 4 * 4, dtype=np.uint8).reshape(16, 3, 4, 4))
    t.log_rows([row("mmd_toy2d_1k", 0.25, 0.5), row("img_per_s", 900.0, 0.5),
                row("peak_mem_mb", float("nan"), 0.5)])
    t.log_samples(0.5, np.random.default_rng(0).normal(size=(64, 2)).astype(np.float32))
    t.close("running")  # interrupted after kimg 0.5
    folder = tmp_path / "r" / "tb" / "c0ffee"
    first = read_events(folder)
    assert scalars(first) == {"eval/mmd_toy2d_1k": [(0, 0.5), (500, 0.25)],
                              "run/generator_params": [(0, 1234.0)],
                              "run/img_per_s": [(500, 900.0)]}
    images = [(e.step, v.image.height, v.image.width) for e in first for v in e.summary.value
              if v.WhichOneof("value") == "image"]
    assert images[0] == (0, 8, 32) and images[1][0] == 500 and images[1][1] > 100  # grid, scatter
    text = texts(first)
    assert '"lr": 0.0001' in text["config"][0] and "`c0ffee`" in text["cell"][0]
    assert text["status"] == ["running at 500 images"]

    # the resumed attempt redoes kimg 0.5: a new file whose purge_step hides the old point
    t = tracking.open_trackers({"tensorboard": True}, root, "st", "c0ffee", cfg, {})
    t.log_rows([row("mmd_toy2d_1k", 0.375, 0.5)])
    t.log_rows([row("mmd_toy2d_1k", 0.125, 1.0, "diverged", "loss is non-finite"),
                row("diverged", 15.0, 1.0, "diverged", "loss is non-finite")])
    t.close("diverged")
    files = sorted(glob.glob(str(folder / "events.out.tfevents.*")))
    assert len(files) == 2
    second = read_events(folder)[len(first):]
    starts = [e.step for e in second if e.HasField("session_log") and e.session_log.status == 1]
    assert starts == [500]
    assert scalars(second) == {"eval/mmd_toy2d_1k": [(500, 0.375), (1000, 0.125)]}
    assert "diverged at 1000 images: loss is non-finite" in texts(second)["status"]


def test_tensorboard_off_and_nothing_logged(tmp_path):
    t = tracking.open_trackers({"tensorboard": False}, str(tmp_path), "st", "c1", {}, {})
    assert t.sinks == []
    t = tracking.open_trackers(None, str(tmp_path), "st", "c1", {}, {})
    assert t.sinks == []
    t = tracking.open_trackers({}, str(tmp_path), "st", "c1", {}, {})
    t.close("failed")  # failed before its first evaluation: no event file, no purge
    assert not glob.glob(str(tmp_path / "tb" / "c1" / "*"))


class Broken:
    name = "Broken"
    calls = 0

    def log_rows(self, rows):
        Broken.calls += 1
        raise ConnectionError("server went away")

    log_samples = close = log_rows

    def abandon(self):
        raise RuntimeError("even this")


def test_a_failing_tracker_logs_one_line_and_goes_quiet(tmp_path):
    lines = []
    Broken.calls = 0
    t = tracking.Tracker([Broken()], "c2", log=lines.append)
    for k in range(3):
        t.log_rows([row("mmd_toy2d_1k", 1.0, k)])
        t.log_samples(k, np.zeros((2, 2), np.float32))
    t.close("done")
    assert Broken.calls == 1 and len(lines) == 1
    assert "Broken tracking of cell c2 is off from here on" in lines[0]
    assert "server went away" in lines[0]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cell_with_trackers_and_an_unreachable_mlflow(toy_teacher, toy_cache, tmp_path,
                                                       monkeypatch):
    """run_cell feeds TensorBoard the stored rows; an MLflow server that is down costs one line
    (or the extra is missing: one line too) and the cell is done all the same."""
    from harness.store import results
    from harness.orchestrate.cell import run_cell

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    root, lines = str(tmp_path / "res"), []
    cfg = toy_cfg()
    settings = {"tensorboard": True, "mlflow": {"uri": f"http://127.0.0.1:{_closed_port()}",
                                                "experiment": None}}
    last = run_cell(cfg, root, toy_cache, str(tmp_path / "c.pt"), device="cpu", study="tr",
                    axes={"seed": 0}, log=lines.append, tracking=settings)
    assert last.status == "done"
    notes = [line for line in lines if "MLflow tracking" in line]
    assert len(notes) == 1, lines
    df = results.load_rows(root)
    cid = df[df.status == "done"].cell.iloc[0]
    metric = df[df.metric.str.startswith("mmd_")].metric.iloc[0]
    events = read_events(os.path.join(root, "tb", cid))
    stored = df[(df.cell == cid) & (df.metric == metric)].sort_values("kimg")
    assert scalars(events)[f"eval/{metric}"] == [
        (round(k * 1000), pytest.approx(v, rel=1e-6)) for k, v in zip(stored.kimg, stored.value)]
    assert texts(events)["status"][-1] == f"done at {round(stored.kimg.max() * 1000)} images"


def test_describe_and_preflight(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    assert tracking.describe({}, "/r/x") == ["TensorBoard: tensorboard --logdir /r/x/tb"]
    assert "copy them down" in tracking.describe({}, "s3://b/x")[0]
    lines = []
    settings = tracking.preflight({"mlflow": {"uri": f"http://127.0.0.1:{_closed_port()}",
                                              "experiment": None}}, "st", log=lines.append)
    assert settings["mlflow"] is None and settings["tensorboard"] is True
    assert len(lines) == 1 and "MLflow tracking is off for this run" in lines[0]


# ---------------------------------------------------------------------------------------------
# MLflow (mlflow-skinny, the `mlflow` extra; a local file store stands in for a server)

def test_mlflow_one_run_per_cell_across_resumes(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 prefers a database store
    uri = (tmp_path / "mlruns").as_uri()
    spec = {"uri": uri, "experiment": None}
    cfg = {"student": {"lr": 1e-4, "kimg": 1}, "loss": {"name": "sid"}, "grid": [1, 2]}
    settings = tracking.preflight({"tensorboard": False, "mlflow": spec}, "st")
    assert settings["mlflow"] == spec  # the experiment exists now
    t = tracking.open_trackers(settings, str(tmp_path), "st", "c0ffee", cfg, {"seed": 0})
    t.log_rows([row("mmd_toy2d_1k", 0.5, 0.0), row("peak_mem_mb", float("nan"), 0.0)])
    t.close("running")
    t = tracking.open_trackers(settings, str(tmp_path), "st", "c0ffee", cfg, {"seed": 0})
    t.log_rows([row("mmd_toy2d_1k", 0.25, 0.5, "done")])
    t.close("done")
    assert len(t.sinks) == 0

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("st")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["harness.cell"] == "c0ffee" and run.data.tags["harness.study"] == "st"
    assert run.data.tags["harness.status"] == "done"
    assert run.data.params["student.lr"] == "0.0001" and run.data.params["grid"] == "[1, 2]"
    history = client.get_metric_history(run.info.run_id, "mmd_toy2d_1k")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.5), (500, 0.25)]
    assert "peak_mem_mb" not in run.data.metrics
