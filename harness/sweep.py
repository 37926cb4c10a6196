"""Ray Tune sweep of a study's unfinished cells (DESIGN "Ray Tune"): ``harness run`` / ``status``.

``run_study`` pins the study (``pin.json``), takes the study lock, trains each teacher once in the
driver and has Ray Tune run every cell that has no final row yet, one function trainable per cell
(``harness_cell``, which calls ``harness.cell.run_cell``, the code of ``harness cell``):

- ``tune.grid_search`` over the pending cell ids; ``tune.with_resources`` from the study's
  ``resources`` (fractions of a GPU allowed); ``FailureConfig(max_failures)`` from the study.
- every evaluation reports with ``tune.Checkpoint.from_directory`` holding the cell's complete
  training state (``cell.pt``); a retried or resumed trial starts from ``tune.get_checkpoint()``.
- Ray's storage is ``<results root>/ray``: experiments ``<study>-<k>``, each with a
  ``<study>-<k>.cells.json`` beside it naming its cells. A later ``harness run`` first restores
  (``Tuner.restore(..., resume_errored=True)``) the experiments that still own unfinished cells,
  so interrupted trials continue from their checkpoints, then starts ``<study>-<k+1>`` for the
  cells no experiment owns (new seeds, new axis values). The ``status=done`` rows are the truth
  about what finished, never Ray's ResultGrid.

Clusters: ``--address auto`` (or ``RAY_ADDRESS``) joins a running cluster; the results root (and
so Ray's storage) must then be a path every node sees or a pyarrow URI (``s3://...``), and the
cache folder (``HARNESS_CACHE``) a shared path too. The harness must be installed on every node.
Ray 2.60 turns on token authentication when ``ray.init()`` starts a local instance (token in
``~/.ray/auth_token``); every node of a cluster and every driver joining it needs the same
setting: export ``RAY_AUTH_MODE=token`` and the same ``RAY_AUTH_TOKEN`` (or a shared
``RAY_AUTH_TOKEN_PATH``) on all of them before ``ray start`` and ``harness run``, or set
``RAY_AUTH_MODE=disabled`` on all of them, only on a private network.

Safety: study files are parsed as data (``yaml.safe_load``), nothing in them is evaluated, and
checkpoints are read with ``torch.load(weights_only=True)`` (``io.load_torch``).
"""
from __future__ import annotations

import json
import logging
import math
import os
import posixpath
import shutil
import sys
import tempfile

from . import pin as pins, results as store, tracking
from .lock import acquire_lock
from .pin import canonical_json
from .status import FINAL, cell_states, dry_run_report, fingerprints
from .status import study_status as _study_status
from .study import load_study

REUSE_ACTORS = True  # a finished trial's worker runs the next cell: no process start per cell
EXIT_USAGE = 2


def study_status(path: str, results: str | None = None) -> str:
    """``harness status``: read-only counts, compute spent, ETA and a table (harness.status)."""
    return _study_status(path, results)


def _root(root: str) -> str:
    return root.rstrip("/") if "://" in root else os.path.abspath(os.path.expanduser(root))


def storage_of(root: str) -> str:
    """Ray's storage for a results root: ``<root>/ray`` (a path or a URI)."""
    return root.rstrip("/") + "/ray"


def _cache(root: str) -> str:
    return store.cache_for(root)


# ---------------------------------------------------------------------------------------------
# The trainable (runs in a Ray worker)

def _resume_into(ckpt: str, storage: str, saved: str | None):
    """Copy the newest ``cell.pt`` of this trial's Ray checkpoint and of the cell's newest saved
    one (``saved``, relative to storage; found by the driver) into ``ckpt``."""
    import pyarrow.fs as pafs
    from ray import tune

    from .progress import CKPT

    found = []
    previous = tune.get_checkpoint()
    if previous is not None:
        found.append((previous.filesystem, posixpath.join(previous.path, CKPT)))
    if saved:
        fs, base = store.filesystem(storage)
        found.append((fs, posixpath.join(base, saved)))
    best = None
    for fs, path in found:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File and (best is None or info.mtime > best[2]):
            best = (fs, path, info.mtime)
    if best is not None:
        with best[0].open_input_stream(best[1]) as src, open(ckpt, "wb") as dst:
            shutil.copyfileobj(src, dst)


def harness_cell(config, cells, root, cache, study, device, threads, cell_fn=None, storage=None,
                 tracking=None):
    """Ray Tune function trainable: run (or resume) one cell with ``cell_fn`` (run_cell)."""
    cid = config["cell"]
    cell = cells.get(cid)
    if cell is None:  # finished or orphaned since this experiment was made: nothing to do
        return
    import torch
    from ray import tune

    torch.set_num_threads(threads)
    if torch.cuda.is_available():  # a reused worker: peak_mem_mb must be this cell's own
        torch.cuda.reset_peak_memory_stats()
    from .progress import CKPT

    if cell_fn is None:
        from .cell import run_cell as cell_fn
    tmp = tempfile.mkdtemp(prefix=f"harness-{cid}-")
    ckpt = os.path.join(tmp, CKPT)
    try:
        _resume_into(ckpt, storage, cell.get("saved"))

        def on_eval(ev):
            metrics = {"cell": cid, "kimg": float(ev.kimg), "step": int(ev.step),
                       "status": ev.status, "wall_s": float(ev.wall_s),
                       "primary": next(iter(ev.metrics), ""),
                       **{k: float(v) for k, v in ev.metrics.items()}}
            keep = ev.status != "diverged" and os.path.exists(ckpt)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp) if keep else None)

        cell_fn(cell["config"], root, cache, ckpt, study=study, axes=cell["axes"], device=device,
                log=print, on_eval=on_eval, tracking=tracking)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _trainable(study, cells: dict, todo, root, cache, device, cell_fn):
    from ray import tune

    from .progress import checkpoint_files

    storage = storage_of(root)
    saved = {}  # the newest cell.pt of each cell, whichever experiment and trial holds it
    for cid, path, _ in sorted(checkpoint_files(storage, study.name), key=lambda f: f[2]):
        saved[cid] = path
    payload = {cid: {"config": cells[cid].config, "axes": cells[cid].axes,
                     "saved": saved.get(cid)} for cid in todo}
    fn = tune.with_parameters(harness_cell, cells=payload, root=root, cache=cache,
                              study=study.name, device=device, storage=storage,
                              threads=max(1, int(study.resources["cpu"])), cell_fn=cell_fn,
                              tracking=study.tracking)
    return tune.with_resources(fn, {"cpu": study.resources["cpu"], "gpu": study.resources["gpu"]})


# ---------------------------------------------------------------------------------------------
# Ray: connect, check resources, quiet logs, experiments

def _connect(address: str | None) -> bool:
    """Start or join Ray unless this process already did; True if this call started it."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the legacy reporter honours verbose=0
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Ctrl-C raises KeyboardInterrupt in the driver (exit 130 and the harness's own resume line)
    # instead of Tune's handler, which stops the sweep and prints its Tuner.restore hint
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    import ray

    if ray.is_initialized():
        return False
    quiet = logging.getLogger("ray")  # the token-auth notice is not the user's first line
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        ray.init(address=address or "local", log_to_driver=False, logging_level=logging.WARNING,
                 include_dashboard=False)
    finally:
        quiet.setLevel(level)
    return True


def _resource_problem(study) -> str | None:
    """Why no trial could ever be scheduled, or None (Ray would leave them pending forever)."""
    import ray

    need = study.resources
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    for kind, key, setting in (("GPU", "gpu", "resources: {gpu: 0}"),
                               ("CPU", "cpu", "a smaller resources.cpu")):
        biggest = max((n.get(kind, 0) for n in nodes), default=0)
        if need[key] > 0 and biggest < need[key]:
            total = ray.cluster_resources().get(kind, 0)
            return (f"study {study.name!r} ({study.path}) asks for {need[key]:g} {kind}(s) per "
                    f"cell (resources.{key}), but the Ray cluster has {total:g} {kind}(s) in all "
                    f"and at most {biggest:g} on one node, so Ray would leave every cell pending "
                    f"forever. Run it where such nodes exist (--address / RAY_ADDRESS to join a "
                    f"cluster) or set {setting} in the study file. Nothing was run.")
    return None


def _fit(tuner) -> dict[str, str]:
    """Run a Tuner; {cell id: error summary} for the trials that ended in error."""
    from .progress import error_summary

    grid = tuner.fit()
    errors = {}
    for i in range(len(grid)):
        result = grid[i]
        if result.error is not None and result.config:
            errors[result.config.get("cell")] = error_summary(str(result.error))
    return errors


# ---------------------------------------------------------------------------------------------
# run_study

def run_study(path: str, results: str | None = None, address: str | None = None,
              dry_run: bool = False, device: str = "auto", cell_fn=None) -> int:
    """Run (or resume) every unfinished cell of a study; 0 when all are done or diverged, 1 when
    some failed or remain, 2 when the study cannot run (locked, impossible resources).

    ``cell_fn`` replaces ``harness.cell.run_cell`` in the trainable (tests inject failures).
    """
    study = load_study(path)
    root = _root(results or study.results_root)
    store.check_root(root)
    cache = _cache(root)
    if dry_run:
        return dry_run_report(study, root, cache)
    fp, datasets = fingerprints(study)
    # Read-only first: what is pinned and done. Nothing is written before resources are checked.
    plan = pins.pin_study(study, root, fp, write=False)
    states = cell_states(store.load_rows(root), plan.ids)
    pending = [c for c in plan.ids if states[c]["state"] not in FINAL]
    if not pending:
        diverged = sum(s["state"] == "diverged" for s in states.values())
        print(f"all {len(plan.ids)} cells done"
              + (f" ({diverged} of them diverged)" if diverged else "")
              + f": their results are stored in {root}, so nothing was trained. To compute "
                f"them again, run with another --results folder (or move this one aside).")
        return 0
    started = _connect(address)
    try:
        problem = _resource_problem(study)
        if problem:
            print("error: " + problem, file=sys.stderr)
            return EXIT_USAGE
        study.tracking = tracking.preflight(study.tracking, study.name)
        with acquire_lock(root):
            pin = pins.pin_study(study, root, fp)
            for note in pin.notes:
                print(f"note: {note}")
            if pin.orphaned:
                print(f"{len(pin.orphaned)} orphaned cells (no longer in the study; their "
                      f"results are kept and left out of figures): {', '.join(pin.orphaned)}")
            states = cell_states(store.load_rows(root), pin.ids)
            pending = [c for c in pin.ids if states[c]["state"] not in FINAL]
            for line in tracking.describe(study.tracking, root):
                print(line)
            _teachers(study, pin, pending, datasets, root, cache, device)
            from .progress import quiet_tune

            with quiet_tune():
                return _sweep(study, pin, pending, root, cache, device, cell_fn)
    finally:
        if started:
            import ray

            ray.shutdown()


def _teachers(study, pin, pending, datasets, root, cache, device):
    """Train (or load) each teacher once in the driver and write its reference rows; also every
    teacher whose weights start a generator (``init: {name: teacher, source: ...}``)."""
    from .cell import pick_device, prepare
    from .config import source_teacher
    from .teacher import load_or_train

    dev = pick_device(device)
    cells, seen = dict(pin.current), set()
    for cid in pending:
        cfg = cells[cid].config
        dataset = datasets[canonical_json(cfg["data"])]
        key = (pin.teacher_of(cid), cfg["eval"]["n"], cfg["eval"]["metric"])
        if key not in seen:
            seen.add(key)
            prepare(cfg, root, cache, dev, study=study.name, dataset=dataset)
        source = source_teacher(cfg)
        if source is not None and canonical_json(source) not in seen:
            seen.add(canonical_json(source))
            load_or_train({**cfg, "teacher": source}, dataset, cache, dev)


def _sweep(study, pin, pending, root, cache, device, cell_fn) -> int:
    from ray import tune

    from .cell import cell_columns
    from .progress import Progress, error_summary, experiments, prune_finished

    storage, cells = storage_of(root), dict(pin.current)
    labels = {}
    for cid, c in cells.items():
        col = cell_columns(c.config, study.name, cid, c.axes)
        labels[cid] = f"[{col['loss']} | {col['init']} | seed {col['seed']}]"
    kimg = {cid: c.config["student"]["kimg"] for cid, c in cells.items()}

    def run_config(name, n):
        return tune.RunConfig(
            name=name, storage_path=storage, verbose=0,
            callbacks=[Progress(labels, {c: kimg[c] for c in pending}, n,
                                len(pin.ids) - len(pending), len(pin.ids))],
            failure_config=tune.FailureConfig(max_failures=study.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None))  # see progress.Progress

    def still_pending():
        states = cell_states(store.load_rows(root), pin.ids)
        return [c for c in pin.ids if states[c]["state"] not in FINAL]

    known = experiments(storage, study.name)
    owner = {cid: name for _, name, ids in known for cid in ids}  # the newest experiment wins
    todo, attempted, errors = list(pending), set(), {}
    for _, name, ids in known:
        mine = [c for c in ids if owner[c] == name and c in todo]
        where = f"{storage}/{name}"
        if not mine or not tune.Tuner.can_restore(where):
            continue
        print(f"resuming Ray experiment {name} ({len(mine)} unfinished cells): {where}")
        try:
            tuner = tune.Tuner.restore(where, trainable=_trainable(
                study, cells, todo, root, cache, device, cell_fn), resume_errored=True)
            local = getattr(tuner, "_local_tuner", None)  # fresh progress callback (not public API)
            if local is not None and getattr(local, "_run_config", None) is not None:
                local._run_config.callbacks = run_config(name, len(mine)).callbacks
            errors.update(_fit(tuner))
        except Exception as e:  # noqa: BLE001 (a damaged experiment: its cells start afresh)
            print(f"note: cannot resume {name} ({error_summary(str(e))}); its unfinished cells "
                  f"start from step 0 in a new experiment")
            continue
        attempted.update(mine)
        todo = still_pending()

    rest = [c for c in todo if c not in attempted]
    if rest:
        k = max((k for k, _, _ in known), default=0) + 1
        name = f"{study.name}-{k}"
        store.write_bytes_atomic(storage, f"{name}.cells.json", json.dumps(
            {"experiment": name, "study": study.name, "cells": rest}, indent=1).encode())
        print(f"Ray experiment {name}: {len(rest)} cells, {study.resources['cpu']:g} CPU and "
              f"{study.resources['gpu']:g} GPU each, max_failures {study.max_failures}; Ray's "
              f"logs in {storage}/{name}")
        tuner = tune.Tuner(_trainable(study, cells, rest, root, cache, device, cell_fn),
                           param_space={"cell": tune.grid_search(rest)},
                           tune_config=tune.TuneConfig(max_concurrent_trials=None,
                                                       reuse_actors=REUSE_ACTORS),
                           run_config=run_config(name, len(rest)))
        errors.update(_fit(tuner))
    prune_finished(storage, study.name, pin.ids, root)
    return _finish(study, pin, root, cells, errors)


def _finish(study, pin, root, cells, errors: dict) -> int:
    """Record failed cells (unless a final row exists), print the summary, choose the exit code."""
    from . import __version__
    from .cell import cell_columns

    states = cell_states(store.load_rows(root), pin.ids)
    rows = []
    for cid, message in errors.items():
        s = states.get(cid)
        if s is None or s["state"] in FINAL:
            continue
        rows.append({**cell_columns(cells[cid].config, study.name, cid, cells[cid].axes),
                     "kimg": s["kimg"], "step": s["step"], "metric": "failed", "value": math.nan,
                     "protocol": f"the cell raised; Ray tried it {study.max_failures + 1} times",
                     "wall_s": s["wall_s"], "status": "failed", "message": message,
                     "version": __version__})
        s["state"], s["message"] = "failed", message
    store.write_rows(root, rows)
    count = {k: sum(s["state"] == k for s in states.values())
             for k in ("done", "diverged", "failed", "unfinished", "pending")}
    print(f"study {study.name}: " + ", ".join(f"{k} {v}" for k, v in count.items())
          + f" of {len(pin.ids)} cells; results in {root}")
    for cid in pin.ids:
        if states[cid]["state"] == "failed":
            print(f"  failed: cell {cid} [{cells[cid].label}]: {states[cid]['message'] or ''}")
    left = len(pin.ids) - count["done"] - count["diverged"]
    if left:
        print(f"{left} cells not finished: run the same command again to retry or resume them")
    return 0 if not left else 1
