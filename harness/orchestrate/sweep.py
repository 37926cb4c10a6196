"""Ray Tune sweep of a study's unfinished cells: ``harness run`` / ``status``.

``run_study`` pins the study (``pin.json``), takes the study lock, has each teacher trained once
as a Ray task, and has Ray Tune run every cell that has no final row yet, one function trainable
per cell (``harness_cell``, which calls ``harness.orchestrate.cell.run_cell``, the code of
``harness cell``), as soon as the teachers that cell needs are cached: the cells whose teachers
are ready start in one Ray experiment while the other teachers keep training beside it, and the
rest make the next experiment (``_waves``). The driver only plans, prints progress and waits.

Teachers (``harness_teacher``): one Ray task per teacher id the pending cells need (their own
and generator-init sources), with the study's ``teacher_resources`` (default: one cell's), all
submitted at once, so they train in parallel as far as resources allow. A task trains or resumes
with ``teacher.load_or_train`` (a complete checkpoint every 5% in the cache folder, so a killed
task, driver or node resumes bit-identically; Ray retries a task whose worker or node died) and
writes the teacher's reference rows (``cell.write_references``) itself, so the driver never
loads a teacher. Its ``status.json`` beside the checkpoint is what the driver prints progress
from and what ``harness status`` shows. A task, not a Tune trial: a teacher is one function with
one result and its own resume (the cache), so a Tune experiment would only add state to restore.

Cells:

- ``tune.grid_search`` over the pending cell ids; ``tune.with_resources`` from the study's
  ``resources`` (fractions of a GPU allowed); ``FailureConfig(max_failures)`` from the study.
- every evaluation reports with ``tune.Checkpoint.from_directory`` holding the cell's complete
  training state (``cell.pt``); a retried or resumed trial starts from ``tune.get_checkpoint()``.
- ``resources: {workers: W}`` with W > 1 (data parallel, ``harness.core.parallel``): the trial
  reserves nothing itself and runs a ``ray.train.torch.TorchTrainer`` with
  ``ScalingConfig(num_workers=W, use_gpu=gpu > 0)``, ``cpu``/``gpu`` per worker, calling
  ``.fit()`` (Ray Train V2's way to run Train inside Tune; ``Tuner(trainer)`` is deprecated).
  Each worker runs ``run_cell`` on its rank (``cell_worker``); rank 0 reports each evaluation
  with its ``cell.pt`` as a Train checkpoint (``<results root>/ray/train/<cell id>``, the newest
  kept; Train's run snapshot survives a kill), ``TuneReportCallback`` hands the metrics to the
  trial, so the same progress lines print. A failed worker fails the fit; Tune retries the trial
  (``max_failures``) and its new TorchTrainer of the same name resumes from the newest
  checkpoint. ``max_concurrent_trials`` keeps the fits within the cluster's resources.
- Ray's storage is ``<results root>/ray``: experiments ``<study>-<k>``, each with a
  ``<study>-<k>.cells.json`` beside it naming its cells. A later ``harness run`` starts
  ``<study>-<k+1>`` over every cell without a final row; an interrupted cell continues from the
  newest ``cell.pt`` any experiment stored for it. Ray's ``Tuner.restore`` is never called: it
  would unpickle Ray's experiment state from the results root, which is not trusted to hold
  code. The ``status=done`` rows are the truth about what finished, never Ray's ResultGrid.

Rounds: a study with a ``seeds:`` plan runs the cells ``harness.orchestrate.rounds.plan`` names (its first
seeds, the cells already stored, and the next seeds of the groups of open claims), then plans
again from the stored rows, one Ray experiment per round, until no open claim needs a new cell.

Clusters: ``--address auto`` (or ``RAY_ADDRESS``) joins a running cluster; the results root (and
so Ray's storage) must then be a path every node sees or a pyarrow URI (``s3://...``), and the
cache folder (``HARNESS_CACHE``, else ``<results root>/cache``) a shared path too: teachers are
trained on any node and read by every cell. On a cluster of several nodes, a cache on a local
filesystem gets one printed note. The harness must be installed on every node.
Ray 2.60 turns on token authentication when ``ray.init()`` starts a local instance (token in
``~/.ray/auth_token``); every node of a cluster and every driver joining it needs the same
setting: export ``RAY_AUTH_MODE=token`` and the same ``RAY_AUTH_TOKEN`` (or a shared
``RAY_AUTH_TOKEN_PATH``) on all of them before ``ray start`` and ``harness run``, or set
``RAY_AUTH_MODE=disabled`` on all of them, only on a private network.

Safety: study files are parsed as data (``yaml.safe_load``), nothing in them is evaluated, and
checkpoints are read with ``torch.load(weights_only=True)`` (``io.load_torch``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys

from harness import __version__
from harness.declare.study import load_study
from harness.orchestrate import rounds
from harness.orchestrate.progress import (
    Progress,
    checkpoint_files,
    error_summary,
    experiments,
    prune_finished,
    quiet_tune,
)
from harness.orchestrate.status import (
    FINAL,
    cell_states,
    dry_run_report,
    fingerprints,
)
from harness.orchestrate.ray_session import (
    cache_note,
    cache_root,
    cluster_problem,
    cluster_totals,
    concurrency,
    connect,
    results_root,
)
from harness.orchestrate.status import study_status as _study_status
from harness.orchestrate.trainables import _teachers, _trainable, storage_of
from harness.store import pins, tracking
from harness.store import results as store
from harness.store.lock import acquire_lock
from harness.store.results import cell_columns
from harness.store.tuning import apply_pinned

REUSE_ACTORS = True  # a finished trial's worker runs the next cell: no process start per cell
EXIT_USAGE = 2


def study_status(path: str, results: str | None = None, overrides: dict | None = None) -> str:
    """``harness status``: read-only counts, compute spent, ETA and a table (harness.orchestrate.status)."""
    return _study_status(path, results, overrides)


# ---------------------------------------------------------------------------------------------
# Ray Tune: one experiment's results

def _fit(tuner) -> dict[str, str]:
    """Run a Tuner; {cell id: error summary} for the trials that ended in error."""

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
              dry_run: bool = False, device: str = "auto", cell_fn=None, teacher_fn=None,
              overrides: dict | None = None) -> int:
    """Run (or resume) every unfinished cell of a study; 0 when all are done or diverged, 1 when
    some failed or remain, 2 when the study cannot run (locked, impossible resources).

    ``cell_fn`` replaces ``harness.orchestrate.cell.run_cell`` in the trainable, ``teacher_fn``
    ``harness.orchestrate.teacher.load_or_train`` in the teacher tasks (tests inject failures).
    ``overrides``: ``--set`` settings ({section: {key: value}}, ``harness.declare.overrides``).
    """
    study = load_study(path, overrides)
    root = results_root(results or study.results_root)
    store.check_root(root)
    study = apply_pinned(study, root, strict=not dry_run)  # harness.store.tuning: tuned values
    cache = cache_root(root)
    if dry_run:
        return dry_run_report(study, root, cache)
    fp, datasets = fingerprints(study)
    # Read-only first: what is pinned and done (the rows read once). Nothing is written before
    # resources are checked; under the lock, _rounds reads both again (another run may have
    # written since).
    rows = store.load_rows(root)
    first = rounds.plan(study, root, fp, rows)
    study = rounds.with_cells(study, first.cells)
    plan = pins.pin_study(study, root, fp, write=False, computed=first.computed)
    states = cell_states(rows, plan.ids)
    pending = [c for c in plan.ids if states[c]["state"] not in FINAL]
    if not pending:
        diverged = sum(s["state"] == "diverged" for s in states.values())
        print(f"all {len(plan.ids)} cells done"
              + (f" ({diverged} of them diverged)" if diverged else "")
              + f": their results are stored in {root}, so nothing was trained. To compute "
                f"them again, run with another --results folder (or move this one aside).")
        return 0
    started = connect(address)
    try:
        problem = cluster_problem(study)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return EXIT_USAGE
        import ray

        note = cache_note(cache, sum(1 for n in ray.nodes() if n.get("Alive")))
        if note:
            print(note)
        study = dataclasses.replace(study, tracking=tracking.preflight(study.tracking,
                                                                        study.name))
        with acquire_lock(root, cache, cluster_totals(), "harness run"):
            return _rounds(study, root, cache, fp, datasets, device, cell_fn, teacher_fn,
                           plan.computed)
    finally:
        if started:
            import ray

            ray.shutdown()


def _rounds(study, root, cache, fp, datasets, device, cell_fn, teacher_fn, computed) -> int:
    """Run the study's pending cells; with a seeds plan, round after round until no claim is
    open (each round re-planned from the stored rows: ``harness.orchestrate.rounds``).
    ``computed``: the cells' ids as computed before the lock; each round's ids are computed
    once (by ``rounds.plan``) and pinned from there."""

    n, rows = 0, store.load_rows(root)  # the rows are read once per round
    while True:
        n += 1
        pin = pins.pin_study(study, root, fp, computed=computed)
        for note in pin.notes:
            print(f"note: {note}")
        if pin.orphaned and n == 1:
            print(f"{len(pin.orphaned)} orphaned cells (no longer in the study; their "
                  f"results are kept and left out of figures): {', '.join(pin.orphaned)}")
        states = cell_states(rows, pin.ids)
        pending = [c for c in pin.ids if states[c]["state"] not in FINAL]
        if n == 1:
            for line in tracking.describe(study.tracking, root):
                print(line)
        code = 0
        if pending:
            code = _waves(study, pin, pending, datasets, root, cache, device, cell_fn,
                          teacher_fn)
        if study.claims.seeds is None or code != 0:
            return code
        rows = store.load_rows(root)
        nxt = rounds.plan(study, root, fp, rows)
        for line in rounds.describe_round(nxt):
            print(line)
        if not nxt.adds:
            return 0
        print(f"round {nxt.round}: {len(nxt.adds)} cells added for the open claims")
        study, computed = rounds.with_cells(study, nxt.cells), nxt.computed


MEMORY_RETRIES = 3  # experiments started again after Ray's memory monitor killed a worker


def _waves(study, pin, pending, datasets, root, cache, device, cell_fn, teacher_fn) -> int:
    """The pending cells in waves: every teacher they need starts at once (Ray tasks), and a
    Ray experiment starts as soon as some cells have all their teachers cached, while the
    other teachers keep training beside it (so a core is not left idle while a band-limited
    teacher trains); the cells whose teachers were still training make the next wave, unless
    those teachers are due within ``WAVE_START_S`` (then the cells wait and run together). A
    failed teacher is raised at the next wave's start, after the others end."""
    tasks, needs = _teachers(study, pin, pending, datasets, root, cache, device, teacher_fn)
    left, code = list(pending), 0
    while left:
        tasks.wait(lambda ready: start_wave(left, needs, ready, tasks.watch.left_s)).check()
        now = [c for c in left if needs[c] <= tasks.ready]
        if not now:  # every teacher ended and none failed, so every cell's are cached
            raise RuntimeError(f"no cell's teachers are ready after all ended: {left[:3]}")
        left = [c for c in left if not needs[c] <= tasks.ready]
        if left:
            wait = sorted(set().union(*(needs[c] for c in left)) - tasks.ready)
            print(f"{len(now)} cells start now; {len(left)} wait for teacher"
                  f"{'s' * (len(wait) != 1)} {', '.join(wait)} (still training) and start in "
                  f"the next Ray experiment", flush=True)
        code = _sweep_retrying(study, pin, now, root, cache, device, cell_fn,
                               last=not left, poll=tasks.poll, t0=tasks.watch.t0)
    return code


WAVE_START_S = 15.0
"""About what a Ray experiment takes to start here: a wave that would leave cells waiting only
for teachers due sooner than this waits for them instead, and the cells run together."""


def start_wave(left, needs: dict, ready: set, due_s) -> bool:
    """Whether the cells of ``left`` whose teachers (``needs[cell]``) are all ``ready`` start an
    experiment now: some are, and every other teacher still training is due (``due_s(id)``:
    seconds at its mean rate, None without a rate yet) later than ``WAVE_START_S`` or not known."""
    if not any(needs[c] <= ready for c in left):
        return False
    rest = set().union(*(needs[c] for c in left)) - ready
    return all((s := due_s(t)) is None or s > WAVE_START_S for t in rest)


def _sweep_retrying(study, pin, pending, root, cache, device, cell_fn, last, poll, t0) -> int:
    """``_sweep``, started again (up to ``MEMORY_RETRIES`` times) over the cells left when
    Ray's memory monitor stopped the experiment."""
    code = 0
    for attempt in range(1 + MEMORY_RETRIES):
        try:
            with quiet_tune():
                return _sweep(study, pin, pending, root, cache, device, cell_fn, last, poll,
                              t0)
        except RuntimeError as e:  # Tune's controller raises, not fails the trial
            if "low on memory" not in str(e) or attempt == MEMORY_RETRIES:
                raise
            print(f"note: Ray's memory monitor killed a worker and Tune stopped the "
                  f"experiment ({error_summary(str(e))}); its cells go on from their last "
                  f"checkpoints (retry {attempt + 1} of {MEMORY_RETRIES})", flush=True)
            states = cell_states(store.load_rows(root), pending)
            pending = [c for c in pending if states[c]["state"] not in FINAL]
            if not pending:
                break
    return code


def _sweep(study, pin, pending, root, cache, device, cell_fn, last=True, poll=None,
           t0=None) -> int:
    """One Ray experiment over ``pending``; ``last``: no later wave follows (``_waves``);
    ``poll``: called from the driver's loop (teachers still training print progress); ``t0``:
    the run's clock for the progress lines (the teachers' lines count from it too)."""
    from ray import tune

    storage, cells = storage_of(root), dict(pin.current)
    # cells already final (a wave's cells are not all the study's unfinished ones)
    done_before = sum(s["state"] in FINAL
                      for s in cell_states(store.load_rows(root), pin.ids).values())
    labels = {}
    for cid, c in cells.items():
        col = cell_columns(c.config, study.name, cid, c.axes)
        labels[cid] = f"[{col['loss']} | {col['init']} | seed {col['seed']}]"
    kimg = {cid: c.config["student"]["kimg"] for cid, c in cells.items()}

    def run_config(name, n):
        return tune.RunConfig(
            name=name, storage_path=storage, verbose=0,
            callbacks=[Progress(labels, {c: kimg[c] for c in pending}, n, done_before,
                                len(pin.ids), on_step=poll, t0=t0)],
            failure_config=tune.FailureConfig(max_failures=study.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None))  # see progress.Progress

    # Ray's own restore (Tuner.restore) unpickles tuner.pkl and the experiment state from the
    # results root, which anyone who can write there (or the author of a copied folder) controls.
    # It is never called: every run is a new experiment over the cells without a final row, and
    # each cell resumes from its newest stored cell.pt (read as data, digest checked), which is
    # all a restore would have given back. The harness's own rows say what is finished.
    known = experiments(storage, study.name)
    errors = {}
    rest = list(pending)
    resuming = {cid for cid, _, _ in checkpoint_files(storage, study.name)} & set(rest)
    if resuming:
        print(f"{len(resuming)} unfinished cells resume from their last checkpoint")
    if rest:
        k = max((k for k, _, _ in known), default=0) + 1
        name = f"{study.name}-{k}"
        store.write_bytes_atomic(storage, f"{name}.cells.json", json.dumps(
            {"experiment": name, "study": study.name, "cells": rest}, indent=1).encode())
        each = (f"{study.resources['cpu']:g} CPU and {study.resources['gpu']:g} GPU each"
                if study.workers == 1 else f"{study.workers} Ray Train workers each (data "
                f"parallel), {study.resources['cpu']:g} CPU and {study.resources['gpu']:g} GPU "
                f"per worker")
        print(f"Ray experiment {name}: {len(rest)} cells, {each}, max_failures "
              f"{study.max_failures}; Ray's logs in {storage}/{name}")
        tuner = tune.Tuner(_trainable(study, cells, rest, root, cache, device, cell_fn),
                           param_space={"cell": tune.grid_search(rest)},
                           tune_config=tune.TuneConfig(max_concurrent_trials=concurrency(study),
                                                       reuse_actors=REUSE_ACTORS),
                           run_config=run_config(name, len(rest)))
        errors.update(_fit(tuner))
    prune_finished(storage, study.name, pin.ids, root)
    return _finish(study, pin, root, cells, errors, last)


def _finish(study, pin, root, cells, errors: dict, last: bool = True) -> int:
    """Record failed cells (unless a final row exists), print the summary, choose the exit code."""

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
    if left and last:
        print(f"{left} cells not finished: run the same command again to retry or resume them")
    return 0 if not left else 1
