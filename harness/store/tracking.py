"""TensorBoard and MLflow views of a study. The Parquet store (``harness.store.results``) is the truth.

A study-level setting, like ``resources`` never part of a cell id::

    tracking:
      tensorboard: true         # the default: event files under <results root>/tb/<cell id>
      mlflow: {uri: http://127.0.0.1:5000, experiment: paper-digits}   # default: null (off)

``harness run`` hands these settings to every cell; ``harness.orchestrate.cell.run_cell`` opens a ``Tracker``
with ``open_trackers`` and feeds it, from its ``report``, the very rows (and samples) it has just
written to the Parquet store, then closes it with the cell's last status. ``harness cell`` tracks
nothing. A tracker never fails a cell: the first error of a sink (TensorBoard or MLflow) prints
one line and that sink goes quiet for the rest of the cell; the rows are in Parquet anyway.

TensorBoard (``tensorboard --logdir results/NAME/tb``): written with tensorboardX (a dependency
of ``ray[tune]``, declared in pyproject), so neither TensorFlow nor the ``tensorboard`` package is
needed to write. One run per cell, ``tb/<cell id>``:

- the x axis ("step" in TensorBoard) is **training images**, ``round(kimg * 1000)``, not generator
  steps, so cells with different ``student.batch`` line up;
- scalars ``eval/<metric>`` for the quality metrics (``fd_digits_1k``, ``mmd_toy2d_1k``, ...)
  and ``run/<metric>`` for the bookkeeping rows (``img_per_s``, ``peak_mem_mb``, parameter
  counts); non-finite values are left out (the ``diverged`` row's message goes to text);
- ``samples``: the stored uint8 samples as an image grid (toy2d points: a scatter plot);
- text ``cell`` (study, cell id, axes), ``config`` (the resolved config) and ``status``.

A resumed cell writes a new event file into the same folder with ``purge_step`` at its first
evaluation, so TensorBoard hides the points of the interrupted attempt that the resume redoes.
For a results root that is a URI (``s3://...``), event files are written to a local temporary
folder and copied through ``pyarrow.fs`` to ``<root>/tb/<cell id>`` after every evaluation and at
close (a killed cell loses at most its last evaluation there, never in Parquet). To view them,
copy them down (``aws s3 sync s3://BUCKET/NAME/tb tb``) and run ``tensorboard --logdir tb``.

MLflow: the optional extra ``pip install 'harness[mlflow]'`` (``mlflow-skinny``: the client
only). One MLflow run per cell, found again by its ``harness.study`` and ``harness.cell`` tags
when the cell resumes or is retried (in another Ray experiment, on another node). Params: the
flattened resolved config (``student.lr``, ``loss.name`` ...); metrics: the rows (step = training
images, as above); tags ``harness.study``, ``harness.cell``, ``harness.axes``, ``harness.status``.
The run ends FINISHED (done, diverged), FAILED (failed) or KILLED (stopped while running). The
experiment is ``tracking.mlflow.experiment``, default the study's name. The URI is meant to be a
tracking server every Ray node reaches; MLflow 3 refuses a ``file://`` store unless
``MLFLOW_ALLOW_FILE_STORE=true`` is exported (the tests do that).

This is a thin writer of our own over ``mlflow.MlflowClient``, not Ray Tune's
``MLflowLoggerCallback`` / ``setup_mlflow``: those make one MLflow run per Tune *trial* (a resumed
or re-queued cell would get a new run), log the trial's ``config`` (here only ``{"cell": id}``)
over ``training_iteration``, and exist only under Ray, while these rows come from ``run_cell``
with or without Ray. ``harness run`` checks the server once in the driver (``preflight``) and
switches MLflow off for the run if it cannot be reached; HTTP retries are capped
(``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` 2, ``MLFLOW_HTTP_REQUEST_TIMEOUT`` 20 s, unless set), so a
server lost mid-run costs each cell seconds, once.

This module imports no torch, no Ray and no tracker library at import time: ``harness.declare.study``
validates the ``tracking:`` section with ``check`` instantly.
"""
from __future__ import annotations

import json
import math
import os
import posixpath
import shutil
import tempfile
import time
from typing import Callable

from harness.declare.tracking_spec import DEFAULT
from harness.store import results
from harness.store.results import BOOKKEEPING


def describe(settings: dict | None, root: str) -> list[str]:
    """Where a study's trackers write, one line each (printed by ``harness run``)."""
    settings = {**DEFAULT, **(settings or {})}
    out = []
    if settings["tensorboard"]:
        where = root.rstrip("/") + "/tb"
        if "://" in where and not where.startswith("file://"):
            out.append(f"TensorBoard event files: {where} (copy them down, then "
                       f"`tensorboard --logdir` on the copy)")
        else:
            out.append(f"TensorBoard: tensorboard --logdir {where.removeprefix('file://')}")
    if settings["mlflow"]:
        m = settings["mlflow"]
        out.append(f"MLflow: experiment {m['experiment'] or '(the study name)'} at {m['uri']}")
    return out


def preflight(settings: dict | None, study: str, log: Callable = print) -> dict:
    """Check once, in the driver, that the configured trackers can work; the settings the cells
    get (a tracker that cannot work is switched off with one line, instead of once per cell)."""
    settings = {**DEFAULT, **(settings or {})}
    if settings["tensorboard"]:
        try:
            import tensorboardX  # noqa: F401
        except ImportError as e:
            log(f"note: TensorBoard tracking is off: {e} (pip install tensorboardX)")
            settings["tensorboard"] = False
    if settings["mlflow"]:
        try:
            _MLflow.experiment_id(settings["mlflow"], study)
        except Exception as e:  # noqa: BLE001 (any failure only turns the view off)
            hint = " (pip install 'harness[mlflow]')" if isinstance(e, ImportError) else ""
            log(f"note: MLflow tracking is off for this run: {_short(e)}{hint}")
            settings["mlflow"] = None
    return settings


# ---------------------------------------------------------------------------------------------
# The tracker a cell talks to

def images(kimg) -> int:
    """The x axis of every tracker: training images."""
    return int(round(float(kimg) * 1000))


def _short(e: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _finite(row: dict) -> bool:
    value = row.get("value")
    return isinstance(value, (int, float)) and math.isfinite(value)


class Tracker:
    """Fans a cell's rows and samples out to its sinks; a sink that raises is dropped after one
    line, so a tracker never fails a cell."""

    def __init__(self, sinks: list, cell_id: str, log: Callable = print):
        self.sinks, self.cell_id, self.log = list(sinks), cell_id, log

    def _each(self, method: str, *args):
        for sink in list(self.sinks):
            try:
                getattr(sink, method)(*args)
            except Exception as e:  # noqa: BLE001
                self.sinks.remove(sink)
                self.log(f"note: {sink.name} tracking of cell {self.cell_id} is off from here on "
                         f"({method}: {_short(e)}); its results are in the Parquet store")
                try:
                    sink.abandon()
                except Exception:  # noqa: BLE001
                    pass

    def log_rows(self, rows: list[dict]):
        """The dicts just written to the Parquet store (keys of ``results.ROWS``)."""
        self._each("log_rows", rows)

    def log_samples(self, kimg: float, array):
        """One evaluation's stored samples: uint8 NCHW images, or float32 (N, 2) toy points."""
        self._each("log_samples", kimg, array)

    def close(self, status: str):
        """The cell's last status: done, diverged, failed, or running (stopped early)."""
        self._each("close", status)
        self.sinks = []


def open_trackers(settings: dict | None, root: str, study: str, cell_id: str, config: dict,
                  axes: dict, log: Callable = print) -> Tracker:
    """The trackers a study's ``tracking:`` settings ask for (None: none). Never raises."""
    tracker = Tracker([], cell_id, log)
    if settings is None:
        return tracker
    settings = {**DEFAULT, **settings}
    makers = []
    if settings["tensorboard"]:
        makers.append(("TensorBoard", lambda: _TensorBoard(root, study, cell_id, config, axes)))
    if settings["mlflow"]:
        makers.append(("MLflow", lambda: _MLflow(settings["mlflow"], study, cell_id, config, axes)))
    for name, make in makers:
        try:
            tracker.sinks.append(make())
        except Exception as e:  # noqa: BLE001
            hint = " (pip install 'harness[mlflow]')" if isinstance(e, ImportError) and \
                name == "MLflow" else ""
            log(f"note: {name} tracking of cell {cell_id} is off: {_short(e)}{hint}")
    return tracker


# ---------------------------------------------------------------------------------------------
# TensorBoard (tensorboardX)

def _markdown_block(text: str) -> str:
    """Text shown verbatim by TensorBoard's markdown renderer (an indented code block)."""
    return "\n".join("    " + line for line in text.splitlines())


def _scatter(points) -> "object":
    """An RGB (H, W, 3) uint8 picture of toy2d points (matplotlib's Agg canvas, no pyplot)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3, 3), dpi=100)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_axes((0.12, 0.1, 0.85, 0.85))
    ax.scatter(points[:, 0], points[:, 1], s=3, alpha=0.6)
    lim = float(np.nanmax(np.abs(points))) * 1.1 if np.isfinite(points).any() else 1.0
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


class _TensorBoard:
    name = "TensorBoard"

    def __init__(self, root: str, study: str, cell_id: str, config: dict, axes: dict):
        from tensorboardX import SummaryWriter  # noqa: F401 (fail at open, not at first row)

        fs, base = results.filesystem(root)
        folder = posixpath.join(base, "tb", cell_id)
        import pyarrow.fs as pafs

        if isinstance(fs, pafs.LocalFileSystem):
            self.dir, self.remote = folder, None
        else:
            self.dir = tempfile.mkdtemp(prefix=f"harness-tb-{cell_id}-")
            self.remote = (fs, folder)
        self.header = {"study": study, "cell": cell_id, "axes": axes, "config": config}
        self.writer, self.last_step, self.uploaded = None, 0, {}

    def _open(self, step: int):
        if self.writer is None:
            from tensorboardX import SummaryWriter

            os.makedirs(self.dir, exist_ok=True)
            # purge_step: TensorBoard hides what an interrupted attempt logged at >= step;
            # a unique suffix: one file per attempt, even two in the same second
            self.writer = SummaryWriter(logdir=self.dir, purge_step=step, flush_secs=30,
                                        # ordered by creation within one second too:
                                        # TensorBoard reads a run's files in name order
                                        filename_suffix=f".{time.time_ns():020d}")
            h = self.header
            axes = "\n".join(f"- {k}: `{v}`" for k, v in h["axes"].items()) or "- (single cell)"
            config = json.dumps(h["config"], indent=1, sort_keys=True, default=str)
            self.writer.add_text("cell", f"study `{h['study']}`, cell `{h['cell']}`\n\n{axes}",
                                 step)
            self.writer.add_text("config", _markdown_block(config), step)
        self.last_step = max(self.last_step, step)
        return self.writer

    def log_rows(self, rows: list[dict]):

        if not rows:
            return
        step = images(rows[0]["kimg"])
        writer = self._open(step)
        for row in rows:
            if row.get("message"):
                writer.add_text("status", f"{row['status']} at {step} images: {row['message']}",
                                step)
            if not _finite(row) or row["metric"] in ("diverged", "failed"):
                continue
            group = "run" if row["metric"] in BOOKKEEPING else "eval"
            writer.add_scalar(f"{group}/{row['metric']}", float(row["value"]), step)
        self._sync()

    def log_samples(self, kimg: float, array):
        step = images(kimg)
        writer = self._open(step)
        if array.dtype.name == "uint8" and array.ndim == 4:
            writer.add_images("samples", array, step, dataformats="NCHW")
        elif array.ndim == 2 and array.shape[1] == 2:
            writer.add_image("samples", _scatter(array), step, dataformats="HWC")
        self._sync()

    def close(self, status: str):
        if self.writer is None:  # nothing logged by this attempt: leave earlier ones as they are
            self._sync(final=True)
            return
        writer = self.writer
        writer.add_text("status", f"{status} at {self.last_step} images", self.last_step)
        writer.close()
        self.writer = None
        self._sync(final=True)

    def abandon(self):
        if self.writer is not None:
            self.writer.close()
        if self.remote is not None:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _sync(self, final: bool = False):
        """Flush; for a URI root, copy the event files that changed to ``<root>/tb/<cell>``."""
        if self.writer is not None:
            self.writer.flush()
        if self.remote is None:
            return
        fs, folder = self.remote
        for name in sorted(os.listdir(self.dir)):
            path = os.path.join(self.dir, name)
            size = os.path.getsize(path)
            if self.uploaded.get(name) == size:
                continue
            if not self.uploaded:
                fs.create_dir(folder, recursive=True)
            target = posixpath.join(folder, name)
            with open(path, "rb") as src, fs.open_output_stream(target) as dst:
                shutil.copyfileobj(src, dst)
            self.uploaded[name] = size
        if final:
            shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# MLflow (a thin writer over MlflowClient)

def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    """``{"student": {"lr": 1e-4}}`` -> ``{"student.lr": "0.0001"}``; lists as JSON."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(value, default=str)
        else:
            out[name] = str(value)
    return out


class _MLflow:
    name = "MLflow"
    STATUS = {"done": "FINISHED", "diverged": "FINISHED", "failed": "FAILED", "running": "KILLED"}

    @staticmethod
    def _client(spec: dict):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=spec["uri"])

    @classmethod
    def experiment_id(cls, spec: dict, study: str, client=None) -> str:
        """The experiment's id, created if missing (two cells may race to create it)."""
        client = client or cls._client(spec)
        name = spec.get("experiment") or study
        found = client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return client.create_experiment(name)
        except Exception:  # noqa: BLE001 (created meanwhile by another cell)
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def __init__(self, spec: dict, study: str, cell_id: str, config: dict, axes: dict):
        from mlflow.entities import Param

        client = self.client = self._client(spec)
        experiment = self.experiment_id(spec, study, client)
        runs = client.search_runs([experiment], f"tags.`harness.cell` = '{cell_id}' and "
                                                f"tags.`harness.study` = '{study}'", max_results=1)
        if runs:
            self.run_id = runs[0].info.run_id
            client.update_run(self.run_id, status="RUNNING")
        else:
            label = " ".join(f"{k}={v}" for k, v in axes.items())
            run = client.create_run(experiment, run_name=f"{label} {cell_id}".strip(), tags={
                "harness.study": study, "harness.cell": cell_id, "harness.status": "running",
                "harness.axes": json.dumps(axes, sort_keys=True, default=str)})
            self.run_id = run.info.run_id
            params = [Param(k, v) for k, v in sorted(flatten(config).items())]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                client.log_batch(self.run_id, params=params[i:i + 100])

    def log_rows(self, rows: list[dict]):
        from mlflow.entities import Metric, RunTag

        stamp = int(time.time() * 1000)
        metrics = [Metric(r["metric"], float(r["value"]), stamp, images(r["kimg"]))
                   for r in rows if _finite(r) and r["metric"] not in ("diverged", "failed")]
        tags = [RunTag("harness.status", rows[-1]["status"])] if rows else []
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000], tags=tags)
        if not metrics and tags:
            self.client.log_batch(self.run_id, tags=tags)

    def log_samples(self, kimg: float, array):
        pass  # samples stay in the Parquet store and TensorBoard (no artifact store assumed)

    def close(self, status: str):
        self.client.set_tag(self.run_id, "harness.status", status)
        self.client.set_terminated(self.run_id, status=self.STATUS.get(status, "KILLED"))

    def abandon(self):
        pass
