"""What runs in Ray workers for ``harness run`` (``harness.orchestrate.sweep`` plans and waits): the cell
trainable (``harness_cell``, one Tune function trainable per cell; ``cell_worker`` per rank of a
data-parallel cell through Ray Train) and the teacher tasks (``harness_teacher``, one Ray task per
teacher id, resumable from its own checkpoint). See ``harness.orchestrate.sweep`` for the whole design.
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import sys
import tempfile
from types import SimpleNamespace

from harness.base import plugins
from harness.core import data
from harness.declare.hashing import canonical_json, teacher_plan
from harness.orchestrate.progress import CKPT, TeacherProgress, checkpoint_files, error_summary
from harness.store import results as store

DIGEST_SUFFIX = ".sha256"  # beside each cell.pt (harness.core.io.save_checkpoint)


def torch_side() -> SimpleNamespace:
    """What a trial or task runs with torch (``run_cell``, ``prepare``, ``pick_device``,
    ``load_or_train``, ``Shard``), imported in the Ray worker that runs it: the driver of
    ``harness run`` plans and waits without ever loading torch."""
    from harness.core import parallel, perf  # torch: imported in Ray workers only
    from harness.orchestrate import cell, teacher  # torch: imported in Ray workers only

    plugins.load()  # the losses and inits of HARNESS_PLUGINS, as the driver has them
    return SimpleNamespace(Shard=parallel.Shard, run_cell=cell.run_cell, prepare=cell.prepare,
                           pick_device=perf.pick_device, load_or_train=teacher.load_or_train)


def storage_of(root: str) -> str:
    """Ray's storage for a results root: ``<root>/ray`` (a path or a URI)."""
    return root.rstrip("/") + "/ray"


# ---------------------------------------------------------------------------------------------
# The trainable (runs in a Ray worker)

def _resume_into(ckpt: str, storage: str, saved: str | None, previous=None):
    """Copy the newest good ``cell.pt`` of this trial's Ray checkpoint (``previous``, default
    ``tune.get_checkpoint()``) and of the cell's newest saved one (``saved``, relative to
    storage; found by the driver) into ``ckpt``, with its digest; a copy whose bytes do not
    match the ``cell.pt.sha256`` stored beside it is reported by its stored path and skipped."""
    import pyarrow.fs as pafs
    from ray import tune

    found = []
    previous = tune.get_checkpoint() if previous is None else previous
    if previous:
        found.append((previous.filesystem, posixpath.join(previous.path, CKPT)))
    if saved:
        fs, base = store.filesystem(storage)
        found.append((fs, posixpath.join(base, saved)))
    stored = []
    for fs, path in found:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            stored.append((info.mtime, fs, path))
    # newest first; one whose bytes do not match the digest stored beside it is reported by its
    # stored path and the previous one is tried (none left: the cell starts from step 0)
    for _, fs, path in sorted(stored, key=lambda s: s[0], reverse=True):
        digest = hashlib.sha256()
        with fs.open_input_stream(path) as src, open(ckpt, "wb") as dst:
            for block in iter(lambda: src.read(1 << 22), b""):
                digest.update(block)
                dst.write(block)
        recorded = _recorded_digests(fs, path + DIGEST_SUFFIX)
        if recorded and digest.hexdigest() not in recorded:
            os.unlink(ckpt)
            print(f"note: the stored checkpoint {path} does not match its recorded sha256 "
                  f"(damaged in storage); not used", file=sys.stderr)
            continue
        with open(ckpt + DIGEST_SUFFIX, "w") as f:
            json.dump({"sha256": [digest.hexdigest()]}, f)
        return


def _recorded_digests(fs, path: str) -> list[str]:
    try:
        with fs.open_input_stream(path) as f:
            doc = json.loads(f.read(4096))
        return [d for d in doc["sha256"] if isinstance(d, str)]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _metrics(cid: str, ev) -> dict:
    """What a cell reports to Tune at each evaluation (progress.Progress prints it)."""
    return {"cell": cid, "kimg": float(ev.kimg), "step": int(ev.step), "status": ev.status,
            "wall_s": float(ev.wall_s), "primary": next(iter(ev.metrics), ""),
            **{k: float(v) for k, v in ev.metrics.items()}}


def harness_cell(config, cells, root, cache, study, device, threads, cell_fn=None, storage=None,
                 tracking=None, workers=1, per_worker=None):
    """Ray Tune function trainable: run (or resume) one cell with ``cell_fn`` (run_cell); with
    ``workers`` > 1, as a data-parallel TorchTrainer of ``per_worker`` {cpu, gpu} each."""
    cid = config["cell"]
    cell = cells.get(cid)
    if cell is None:  # finished or orphaned since this experiment was made: nothing to do
        return
    if workers > 1:
        return _data_parallel(cid, cell, root, cache, study, cell_fn, storage, tracking, workers,
                              per_worker)
    import torch
    from ray import tune

    torch.set_num_threads(threads)
    if torch.cuda.is_available():  # a reused worker: peak_mem_mb must be this cell's own
        torch.cuda.reset_peak_memory_stats()

    cell_fn = cell_fn or torch_side().run_cell
    tmp = tempfile.mkdtemp(prefix=f"harness-{cid}-")
    ckpt = os.path.join(tmp, CKPT)
    try:
        _resume_into(ckpt, storage, cell.get("saved"))

        def on_eval(ev):
            keep = ev.status != "diverged" and os.path.exists(ckpt)
            tune.report(_metrics(cid, ev),
                        checkpoint=tune.Checkpoint.from_directory(tmp) if keep else None)

        cell_fn(cell["config"], root, cache, ckpt, study=study, axes=cell["axes"], device=device,
                log=print, on_eval=on_eval, tracking=tracking)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def train_storage(storage: str) -> str:
    """Where data-parallel cells' Ray Train runs live: ``<storage>/train/<cell id>``."""
    return storage.rstrip("/") + "/train"


def _data_parallel(cid, cell, root, cache, study, cell_fn, storage, tracking, workers, per_worker):
    """One data-parallel cell: a TorchTrainer of ``workers`` ranks inside this Tune trial."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    gpu = float(per_worker.get("gpu", 0))
    each = {"CPU": float(per_worker["cpu"]), **({"GPU": gpu} if gpu else {})}
    trainer = TorchTrainer(
        cell_worker,
        train_loop_config={"cid": cid, "cell": cell, "root": root, "cache": cache,
                           "study": study, "cell_fn": cell_fn, "storage": storage,
                           "tracking": tracking, "threads": max(1, int(per_worker["cpu"]))},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=gpu > 0,
                                               resources_per_worker=each),
        run_config=ray.train.RunConfig(
            name=cid, storage_path=train_storage(storage), callbacks=[TuneReportCallback()],
            failure_config=ray.train.FailureConfig(max_failures=0),  # Tune retries the trial
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1)))
    trainer.fit()


def cell_worker(config):
    """A Ray Train worker of a data-parallel cell: ``run_cell`` (``cell_fn``) on this rank,
    resumed from the newest of the Train run's checkpoint and the cell's older Tune ones."""
    import ray.train
    import ray.train.torch
    import torch

    context = ray.train.get_context()
    shard = torch_side().Shard(context.get_world_rank(), context.get_world_size())
    torch.set_num_threads(config["threads"])
    cell_fn = config["cell_fn"]
    cell_fn = cell_fn or torch_side().run_cell
    cid, cell = config["cid"], config["cell"]
    tmp = tempfile.mkdtemp(prefix=f"harness-{cid}-r{shard.rank}-")
    ckpt = os.path.join(tmp, CKPT)
    try:
        _resume_into(ckpt, config["storage"], cell.get("saved"),
                     previous=ray.train.get_checkpoint() or False)

        def on_eval(ev):  # every rank reports (Train's barrier); rank 0's checkpoint is kept
            keep = shard.lead and ev.status != "diverged" and os.path.exists(ckpt)
            ray.train.report(_metrics(cid, ev),
                             checkpoint=ray.train.Checkpoint.from_directory(tmp) if keep else None,
                             delete_local_checkpoint_after_upload=False)

        cell_fn(cell["config"], config["root"], config["cache"], ckpt, study=config["study"],
                axes=cell["axes"], device=str(ray.train.torch.get_device()), log=print,
                on_eval=on_eval, tracking=config["tracking"], shard=shard)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _trainable(study, cells: dict, todo, root, cache, device, cell_fn):
    from ray import tune

    storage = storage_of(root)
    saved = {}  # the newest cell.pt of each cell, whichever experiment and trial holds it
    for cid, path, _ in sorted(checkpoint_files(storage, study.name), key=lambda f: f[2]):
        saved[cid] = path
    payload = {cid: {"config": cells[cid].config, "axes": cells[cid].axes,
                     "saved": saved.get(cid)} for cid in todo}
    per = {"cpu": study.resources["cpu"], "gpu": study.resources["gpu"]}
    fn = tune.with_parameters(harness_cell, cells=payload, root=root, cache=cache,
                              study=study.name, device=device, storage=storage,
                              threads=max(1, int(study.resources["cpu"])), cell_fn=cell_fn,
                              tracking=study.tracking, workers=study.workers, per_worker=per)
    if study.workers > 1:  # the trial only waits on its TorchTrainer, whose workers hold `per`
        # (Tune refuses an empty request: one byte of memory is the smallest non-empty one)
        return tune.with_resources(fn, {"cpu": 0, "gpu": 0, "memory": 1})
    return tune.with_resources(fn, per)



def harness_teacher(entry: dict, root: str, cache: str, study: str, device: str,
                    threads: int | None, teacher_fn=None) -> dict:
    """Train, resume or load one teacher of a ``teacher_plan`` (``teacher_fn``, default
    ``teacher.load_or_train``) and write its reference rows; returns a little metadata. A Ray
    task of ``train_teachers``; ``threads``: torch's thread count (None: leave it)."""
    import torch

    side = torch_side()
    if threads is not None:
        torch.set_num_threads(threads)
    teacher_fn = teacher_fn or side.load_or_train
    dev = side.pick_device(device)
    dataset = data.from_config(entry["cfg"]["data"])
    _, meta = teacher_fn(entry["cfg"], dataset, cache, dev, print)
    for cfg in entry["refs"].values():  # the teacher is cached now: this loads it
        side.prepare(cfg, root, cache, dev, study=study, dataset=dataset)
    return {k: meta.get(k) for k in ("id", "steps", "wall_s")}


def _teachers(study, pin, pending, datasets, root, cache, device, teacher_fn=None):
    """The teachers the pending cells need, started as Ray tasks (``TeacherTasks``), and each
    pending cell's teacher ids (its own and its init source's)."""
    cells = dict(pin.current)
    keyed = {cid: (cells[cid].config,
                   datasets[canonical_json(cells[cid].config["data"])].fingerprint)
             for cid in pending}
    needs = {cid: set(teacher_plan([k])) for cid, k in keyed.items()}
    return TeacherTasks(study, teacher_plan(keyed.values()), root, cache, device,
                        teacher_fn), needs


def train_teachers(study, plan: dict, root: str, cache: str, device: str, teacher_fn=None):
    """Each teacher of a ``teacher_plan`` trained (or resumed, or loaded) and waited for
    (``TeacherTasks``); the first failure raised once all have ended. ``harness tune``."""
    if plan:
        TeacherTasks(study, plan, root, cache, device, teacher_fn).wait().check()


class TeacherTasks:
    """The teachers of a ``teacher_plan``, one Ray task each (``harness_teacher``) with the
    study's ``teacher_resources`` (its CPU count is the torch thread count, so a teacher's
    weights do not depend on which command trained it), all submitted at once. ``ready``: the
    ids trained and cached so far; ``poll`` prints their progress and collects the finished
    ones without blocking (``harness run`` calls it from its Tune callback while cells of
    cached teachers train beside the ones still training)."""

    def __init__(self, study, plan: dict, root: str, cache: str, device: str, teacher_fn=None):
        import ray

        res = study.teacher_resources
        print(f"teachers: {len(plan)} Ray task(s), {res['cpu']:g} CPU and {res['gpu']:g} GPU "
              f"each: {', '.join(plan)} (cache {cache})")
        self.watch = TeacherProgress({tid: os.path.join(cache, "teachers", tid) for tid in plan})
        task = ray.remote(harness_teacher)  # retried (resuming) when its worker or node dies
        self.running = {task.options(num_cpus=res["cpu"], num_gpus=res["gpu"],
                                     name=f"teacher {tid}", max_retries=3,
                                     retry_exceptions=False).remote(
            entry, root, cache, study.name, device, max(1, int(res["cpu"])), teacher_fn): tid
            for tid, entry in plan.items()}
        self.ready: set[str] = set()
        self.failed: dict[str, Exception] = {}

    def poll(self, timeout: float = 0.0) -> TeacherTasks:
        import ray

        if self.running:
            done, _ = ray.wait(list(self.running), num_returns=len(self.running),
                               timeout=timeout)
        else:
            done = []
        self.watch.poll()
        for ref in done:
            tid = self.running.pop(ref)
            try:
                self.watch.finished(tid, ray.get(ref))
                self.ready.add(tid)
            except Exception as e:  # noqa: BLE001 (raised by check, once all have ended)
                self.failed[tid] = e
                print(f"teacher {tid} FAILED: {error_summary(str(e))}", flush=True)
        return self

    def wait(self, until=None) -> TeacherTasks:
        """Block until ``until(ready)`` holds, a teacher failed, or none is left running (no
        ``until``: until all have ended)."""
        while self.running and not self.failed and not (until and until(self.ready)):
            self.poll(timeout=1.0)
        return self

    def check(self) -> TeacherTasks:
        """After a failure: wait for the others to end, then raise the first failure's cause,
        so a user error still gets its one paragraph (cli)."""
        if self.failed:
            while self.running:
                self.poll(timeout=1.0)
            error = next(iter(self.failed.values()))
            cause = getattr(error, "cause", None)
            raise cause if isinstance(cause, Exception) else error
        return self
