"""Live progress of a sweep: one compact line per cell evaluation, printed by the driver, and
one per teacher checkpoint (``TeacherProgress``, from the teachers' ``status.json`` files).

``Progress`` is a ``tune.Callback``; Ray's own output is turned down (``verbose=0``, no worker log
forwarding) and its result logs stay in the experiment's storage folder. A line reads::

    [+1m05s] cell 231c86a3e3d3 [sid | teacher | seed 0]  kimg 1.5/2  mmd_toy2d_200 0.172  running
    (10s; 1/4 finished)

The callback is pickled into Ray's experiment state (``tuner.pkl``), so it holds only plain data.

It also keeps Ray's storage small without ever breaking a restore: Ray deletes no checkpoint
(``num_to_keep=None``: with Ray's own deletion, a driver killed between a deletion and the next
sync of the experiment state leaves a state pointing at a deleted checkpoint, and such a trial can
never be restored). Instead, at each new checkpoint of a trial the ``cell.pt`` of its older ones is
deleted and their (empty) directories stay; the trainable resumes from the newest ``cell.pt`` of
its cell that exists (``trainables._resume_into``).
"""
from __future__ import annotations

import contextlib
import json
import logging
import posixpath
import re
import time

import pyarrow.fs as pafs
from ray import tune

from harness.orchestrate.status import (
    FINAL,
    cell_states,
    duration,
    left_at_rate,
    read_teacher_status,
)
from harness.store import results as store

CKPT = "cell.pt"  # the file trainables.harness_cell checkpoints to

def error_summary(text: str | None, limit: int = 300) -> str:
    """The last meaningful line of an error text (a Ray traceback ends with the exception)."""
    lines = [ln.strip() for ln in str(text or "").splitlines() if ln.strip()]
    for line in reversed(lines):
        if not line.startswith(("^", "File ", "~")):
            return line[:limit]
    return "unknown error"


def read_text(path: str | None) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except (OSError, TypeError):
        return ""


def drop_older(fs, trial_dir: str, keep: str | None, name: str = "cell.pt"):
    """Delete ``name`` in every ``checkpoint_*`` folder of a trial except ``keep`` (a path)."""
    for item in fs.get_file_info(pafs.FileSelector(trial_dir, allow_not_found=True)):
        if posixpath.basename(item.path).startswith("checkpoint_") and item.path != keep:
            path = posixpath.join(item.path, name)
            if fs.get_file_info(path).type == pafs.FileType.File:
                fs.delete_file(path)


class Progress(tune.Callback):
    """Print one line per cell report, retry and failure; remember the failures."""

    def __init__(self, labels: dict[str, str], kimg: dict[str, float], n_cells: int,
                 done_before: int = 0, study_cells: int | None = None, on_step=None,
                 t0: float | None = None):
        self.labels, self.kimg, self.n_cells = labels, kimg, n_cells
        self.on_step, self.t_step = on_step, 0.0  # called at most once a second
        self.clock = t0  # the run's clock (the teachers' lines share it); None: Tune's start
        self.done_before = done_before  # cells of the study already final before this run
        self.study_cells = study_cells or n_cells
        self.t0, self.finished, self.errors = time.time(), set(), {}
        self.seen, self.first = {}, {}  # cell -> latest / first reported kimg (for the ETA)
        self.t_first = time.time()

    def setup(self, **info):
        self.t0 = self.clock or time.time()

    def on_step_begin(self, iteration, trials, **info):
        if self.on_step is not None and time.time() - self.t_step >= 1.0:
            self.t_step = time.time()
            self.on_step()

    def _eta(self) -> str:
        """Study-wide ETA from the kimg trained in this run so far (all cells together)."""
        gained = sum(self.seen[c] - self.first[c] for c in self.seen)
        elapsed = time.time() - self.t_first  # from the first report: Ray's start excluded
        if gained <= 0 or elapsed < 1:
            return ""
        left = sum(max(0.0, total - self.seen.get(c, 0.0)) for c, total in self.kimg.items()
                   if c not in self.finished)
        return f", study ETA {duration(left * elapsed / gained)}"

    def _head(self, trial) -> tuple[str, str]:
        cid = trial.config.get("cell", "?")
        return cid, f"[+{duration(time.time() - self.t0)}] cell {cid} {self.labels.get(cid, '')}"

    def on_trial_result(self, iteration, trials, trial, result, **info):
        cid, head = self._head(trial)
        metric = result.get("primary")
        value = f"  {metric} {result[metric]:.4g}" if metric in result else ""
        status = result.get("status", "?")
        kimg = float(result.get("kimg", 0))
        if not self.first:
            self.t_first = time.time()
        self.first.setdefault(cid, kimg)
        self.seen[cid] = kimg
        if status in ("done", "diverged"):
            self.finished.add(cid)
        done = self.done_before + len(self.finished)
        print(f"{head}  kimg {kimg:.1f}/{self.kimg.get(cid, 0):g}{value}  {status}"
              f"  ({duration(result.get('wall_s', 0))}; {done}/{self.study_cells} cells "
              f"finished{self._eta()})", flush=True)

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        drop_older(checkpoint.filesystem, posixpath.dirname(checkpoint.path.rstrip("/")),
                   checkpoint.path.rstrip("/"))

    def on_trial_complete(self, iteration, trials, trial, **info):
        if (trial.last_result or {}).get("status") in ("done", "diverged"):  # rows are final
            try:
                drop_older(trial.storage.storage_filesystem, trial.storage.trial_fs_path, None)
            except (AttributeError, RuntimeError, OSError):
                pass  # prune_finished (below) removes what is left after the run

    def on_trial_recover(self, iteration, trials, trial, **info):
        _, head = self._head(trial)
        print(f"{head}  attempt {trial.num_failures} failed: "
              f"{error_summary(read_text(trial.error_file))}; retrying from its last checkpoint",
              flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        cid, head = self._head(trial)
        self.errors[cid] = error_summary(read_text(trial.error_file))
        print(f"{head}  FAILED after {trial.num_failures} attempt(s): {self.errors[cid]} "
              f"(Ray's log: {trial.error_file})", flush=True)

    def __getstate__(self):
        return {**self.__dict__, "finished": set(), "errors": {}, "on_step": None}


class TeacherProgress:
    """The driver's lines for teachers that train as Ray tasks (possibly on other nodes): one
    per change of a teacher's ``status.json`` (written at every 5% checkpoint), e.g.::

        [+0m41s] teacher t-5d0c51ac2f5e (mlp on toy2d)  step 94/313  loss 0.2153  (38s of
        training, ETA 1m28s)
    """

    def __init__(self, folders: dict[str, str]):
        self.folders, self.t0, self.done = folders, time.time(), set()
        self.last = {tid: read_teacher_status(f) for tid, f in folders.items()}
        self.seen = {tid: self._key(st) for tid, st in self.last.items()}
        self.attempt = {tid: (key or ())[:3] for tid, key in self.seen.items()}

    @staticmethod
    def _key(st):
        return None if not st else (st.get("host"), st.get("pid"), st.get("started_at"),
                                    st.get("state"), st.get("step"))

    def _head(self, tid, st=None) -> str:
        what = f" ({st['arch']} on {st['data']})" if st and "arch" in st else ""
        return f"[+{duration(time.time() - self.t0)}] teacher {tid}{what}"

    def poll(self):
        for tid, folder in self.folders.items():
            st = self.last[tid] = read_teacher_status(folder)
            key = self._key(st)
            if key is None or key == self.seen[tid]:
                continue  # nothing new since the last line (or since before this run)
            self.seen[tid] = key
            step, total, wall = st.get("step", 0), st.get("total", 0), st.get("wall_s", 0.0)
            start = st.get("resumed_at") or 0
            if key[:3] != self.attempt[tid]:  # this run's attempt: say how it starts, once
                self.attempt[tid] = key[:3]
                print(f"{self._head(tid, st)}  " + (
                    f"resuming at step {start:,}/{total:,} from its checkpoint" if start else
                    f"training: {total:,} steps"), flush=True)
                if st["state"] == "training" and step == start:
                    continue
            if st["state"] == "done":
                self.done.add(tid)
                what = f"done: {total:,} steps, {duration(wall)} of training"
            else:
                loss = f"  loss {st['loss']:.4g}" if st.get("loss") is not None else ""
                eta = left_at_rate(st) or 0
                what = (f"step {step:,}/{total:,}{loss}  ({duration(wall)} of training, ETA "
                        f"{duration(eta)})" + ("" if st["state"] == "training" else
                                               f"  {st['state']}"))
            print(f"{self._head(tid, st)}  {what}", flush=True)

    def left_s(self, tid: str) -> float | None:
        """Training the teacher still needs at its mean rate, from the status the last poll
        read: 0 once done, None without a rate to go by."""
        st = self.last[tid] or {}
        return 0.0 if st.get("state") == "done" else left_at_rate(st)

    def finished(self, tid: str, meta: dict):
        """The task returned: a last line, unless ``poll`` already printed it done."""
        self.poll()
        if tid not in self.done:
            what = (f"imported from {meta['imported']}" if meta.get("imported")
                    else f"cached, reused ({meta.get('steps')} steps)")
            print(f"{self._head(tid)}  {what}", flush=True)
            self.done.add(tid)


# ---------------------------------------------------------------------------------------------
# Ray's log noise and Ray's storage (experiments, checkpoints)

class _DropNoise(logging.Filter):
    NOISE = ("Trial task failed", "Trials did not complete", "Experiment state snapshotting",
             "Failed to fetch metrics")

    def filter(self, record):
        return not record.getMessage().startswith(self.NOISE)


@contextlib.contextmanager
def quiet_tune():
    """Tracebacks of failed trials stay in Ray's storage (error.txt); the driver prints one line."""
    names = ("ray.tune.execution.tune_controller", "ray.tune.tune",
             "ray.tune.execution.experiment_state", "ray.tune.analysis.experiment_analysis")
    drop = _DropNoise()
    for name in names:
        logging.getLogger(name).addFilter(drop)
    try:
        yield
    finally:
        for name in names:
            logging.getLogger(name).removeFilter(drop)


def experiments(storage: str, study: str) -> list[tuple[int, str, list[str]]]:
    """[(k, name, cell ids)] of the study's Ray experiments, oldest first."""
    import pyarrow.fs as pafs

    fs, base = store.filesystem(storage)
    pattern = re.compile(re.escape(study) + r"-(\d+)\.cells\.json\Z")
    out = []
    for info in fs.get_file_info(pafs.FileSelector(base, allow_not_found=True)):
        match = pattern.match(posixpath.basename(info.path))
        if not match or info.type != pafs.FileType.File:
            continue
        try:
            cells = json.loads(store.read_bytes(storage, posixpath.basename(info.path)))["cells"]
        except (ValueError, KeyError, TypeError):
            print(f"note: ignoring the unreadable {info.path}")
            continue
        out.append((int(match.group(1)), f"{study}-{match.group(1)}", [str(c) for c in cells]))
    return sorted(out)


def checkpoint_files(storage: str, study: str) -> list[tuple[str, str, float]]:
    """[(cell id, path relative to storage, mtime)] of every stored ``cell.pt`` of the study:
    in its Tune experiments and in the Ray Train runs of its data-parallel cells
    (``train/<cell id>/checkpoint_*/cell.pt``)."""
    import pyarrow.fs as pafs

    fs, base = store.filesystem(storage)
    pattern = re.compile(r"[^/]*_cell=([0-9a-f]+)_[^/]*/checkpoint_\d+/" + re.escape(CKPT) + r"\Z")
    trained = re.compile(r"([0-9a-f]+)/checkpoint_[^/]+/" + re.escape(CKPT) + r"\Z")
    out = []
    for name, where in [(name, pattern) for _, name, _ in experiments(storage, study)] + \
            [("train", trained)]:
        for info in fs.get_file_info(pafs.FileSelector(posixpath.join(base, name),
                                                       allow_not_found=True, recursive=True)):
            rel = posixpath.relpath(info.path, base)
            match = where.match(posixpath.relpath(info.path, posixpath.join(base, name)))
            if match and info.type == pafs.FileType.File:
                out.append((match.group(1), rel, info.mtime.timestamp()))
    return out


def prune_finished(storage: str, study: str, ids, root: str):
    """Delete the ``cell.pt`` of finished cells (their rows are final; the trainable returns at
    once for them). Directories stay, so Ray's experiment state never points at a missing one."""
    states = cell_states(store.load_rows(root), ids)
    fs, base = store.filesystem(storage)
    for cid, path, _ in checkpoint_files(storage, study):
        if states.get(cid, {}).get("state") in FINAL:
            fs.delete_file(posixpath.join(base, path))
