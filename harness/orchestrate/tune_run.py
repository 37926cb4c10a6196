"""``harness tune``: the Ray Tune part of ``harness.store.tuning`` (one experiment per loss family).

``tune_study`` loads the study, trains each trial teacher once in the driver (as ``harness run``
does), and runs or resumes (``Tuner.can_restore`` / ``Tuner.restore(..., resume_errored=True)``,
only when Ray's state verifies against the harness's signed ledger, ``harness.store.signed``)
one experiment per family that has no choice pinned under its current hash, in
``<results root>/tune/<study>-<family>-<hash8>``. The search is Ray's: ``tune.loguniform`` &c.
from ``tune_spec.Dist.ray``, ``BasicVariantGenerator(random_state=tune_spec.SEARCH_SEED)``, and
``ASHAScheduler(time_attr="kimg")`` or FIFO. After each experiment the rows decide
(``tuning.select``, never Ray's ResultGrid) and the choice is pinned (``tuning.record_choice``).
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import tempfile
import time

import pyarrow.fs as pafs
from ray import tune

from harness import __version__
from harness.declare import config as C
from harness.declare.hashing import canonical_json, teacher_plan
from harness.declare.schema import higher_is_better
from harness.declare.study import load_study
from harness.declare.tune_spec import (
    ASHA_GRACE,
    ASHA_REDUCTION,
    SEARCH_SEED,
    TRIAL_PROTOCOL,
    TuneError,
)
from harness.orchestrate.cell import run_cell
from harness.orchestrate.progress import drop_older, error_summary, quiet_tune, read_text
from harness.orchestrate.status import fingerprints
from harness.orchestrate.ray_session import (
    cache_root,
    cluster_problem,
    cluster_totals,
    connect,
    results_root,
)
from harness.orchestrate.trainables import train_teachers
from harness.store import results as store
from harness.store import signed
from harness.store.lock import acquire_lock
from harness.store.results import cell_columns, filesystem
from harness.store.tune_views import asha_note, describe
from harness.store.tuning import (
    experiment_name,
    family_hash,
    family_states,
    final_kimg,
    fmt_value,
    read_trial_rows,
    record_choice,
    scratch_root,
    select,
    stored_final,
    trial_config,
    trial_table,
    with_values,
)

# ---------------------------------------------------------------------------------------------
# The trainable (runs in a Ray worker)

def harness_trial(config, family, tune_hash, fam_hash, seeds, metric, root, scratch, cache,
                  study, device, threads, cell_fn=None):
    """One trial: the family's config with this trial's values, trained on each selection seed
    in turn (``cell_fn``, default ``harness.orchestrate.cell.run_cell``, into the scratch root); every
    evaluation becomes ``tuning`` rows in the study's store and a Tune report (``kimg`` summed
    over the seeds, ``score`` the metric). Its checkpoint holds the current seed's training state
    and the seeds already finished, so a resumed trial never trains a finished seed again."""
    import torch

    cell_fn = cell_fn or run_cell
    torch.set_num_threads(threads)
    values = {k: config[k] for k in family.space}
    cfgs = [trial_config(family, values, s) for s in seeds]  # the schema, before anything runs
    trial = tune.get_context().get_trial_id()
    per_seed = final_kimg(cfgs[0])
    tmp = tempfile.mkdtemp(prefix="harness-tune-")
    done_file = os.path.join(tmp, "finished.json")
    try:
        previous = tune.get_checkpoint()
        if previous is not None:
            previous.to_directory(tmp)
        finished = {}
        if os.path.exists(done_file):
            with open(done_file) as f:
                finished = json.load(f)
        for i, (seed, cfg) in enumerate(zip(seeds, cfgs)):
            if str(seed) in finished:
                continue
            ckpt = os.path.join(tmp, f"seed-{seed}.pt")
            cid = f"tune-{trial}-s{seed}"
            stored = stored_final(root, cid, seed, per_seed)
            if stored is not None:  # finished before an interruption Ray's state did not see
                finished[str(seed)] = stored[1]
                with open(done_file, "w") as f:
                    json.dump(finished, f)
                if os.path.exists(ckpt):
                    os.remove(ckpt)
                tune.report({"kimg": (i + 1) * per_seed, "score": stored[1], "seed": seed,
                             "status": "done", "metric": stored[0]},
                            checkpoint=tune.Checkpoint.from_directory(tmp))
                continue
            state = {"columns": None}

            def on_eval(ev, i=i, seed=seed, cfg=cfg, ckpt=ckpt, cid=cid, state=state):
                name = metric if metric != "auto" else next(iter(ev.metrics), None)
                if state["columns"] is None:
                    axes = {"tune.family": family.label, "tune.hash": fam_hash,
                            "tune.section": tune_hash, "tune.trial": trial, "tune.metric": name,
                            "tune.values": values}
                    state["columns"] = cell_columns(cfg, study, cid, axes)
                base = {**state["columns"], "kimg": float(ev.kimg), "step": int(ev.step),
                        "wall_s": float(ev.wall_s), "status": "tuning", "message": ev.message,
                        "version": __version__, "protocol": TRIAL_PROTOCOL}
                rows = [{**base, "metric": m, "value": float(v)} for m, v in ev.metrics.items()]
                if ev.status == "diverged":
                    rows.append({**base, "metric": "diverged", "value": float(ev.step)})
                store.write_rows(root, rows)
                if ev.status == "diverged":
                    return  # nothing to report: the trial ends here, its rows say why
                if name not in ev.metrics:
                    raise RuntimeError(f"tune.metric {name!r} is not among the metrics a cell "
                                       f"reports ({', '.join(ev.metrics)}); set tune.metric to "
                                       f"one of them or auto")
                if ev.status == "done":
                    finished[str(seed)] = float(ev.metrics[name])
                    with open(done_file, "w") as f:
                        json.dump(finished, f)
                    if os.path.exists(ckpt):
                        os.remove(ckpt)
                tune.report({"kimg": i * per_seed + float(ev.kimg),
                             "score": float(ev.metrics[name]), "seed": seed,
                             "status": ev.status, "metric": name},
                            checkpoint=tune.Checkpoint.from_directory(tmp))

            run = copy.deepcopy(cfg)
            run["eval"]["final_samples"] = "none"  # not in ids: a trial keeps no final samples
            last = cell_fn(run, scratch, cache, ckpt, study=study, axes={}, device=device,
                           log=lambda *a, **k: None, on_eval=on_eval)
            if last is not None and getattr(last, "status", None) == "diverged":
                return
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


ENDED = ("TERMINATED", "ERROR")  # Tune's Trial.status of a trial that will not run again


class TrialLines(tune.Callback):
    """One line per finished, stopped or failed trial; at each checkpoint the weights of the
    trial's older checkpoints are dropped (their folders stay: see ``harness.orchestrate.progress``)."""

    def __init__(self, label: str, n: int, max_t: float, seeds: list):
        self.label, self.n, self.max_t, self.seeds, self.count = label, n, max_t, seeds, 0

    def on_trial_complete(self, iteration, trials, trial, **info):
        # counted from Tune's own list, so that a resumed experiment goes on from the trials
        # its earlier drivers finished (this callback's state is not restored)
        self.count = 1 + sum(1 for t in trials if t is not trial and t.status in ENDED)
        r = trial.last_result or {}
        values = " ".join(f"{k}={fmt_value(v)}" for k, v in sorted(trial.config.items()))
        what = ("done" if r.get("kimg", 0) >= self.max_t - 1e-9 else
                f"stopped at kimg {r.get('kimg', 0):g} (scheduler, or diverged)")
        score = (f" {r.get('metric')} {r['score']:.4g} (seed {r.get('seed')})"
                 if "score" in r else "")
        print(f"tune {self.label}: trial {trial.trial_id} ({self.count}/{self.n}) {values}:"
              f"{score} {what}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"tune {self.label}: trial {trial.trial_id} FAILED: "
              f"{error_summary(read_text(trial.error_file))}", flush=True)

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        path = checkpoint.path.rstrip("/")
        for seed in self.seeds:
            drop_older(checkpoint.filesystem, os.path.dirname(path), path, f"seed-{seed}.pt")

class SignState(tune.Callback):
    """Records Ray's experiment state in the harness's ledger (``harness.store.signed``) every few
    half second (less often where a look costs more: at most 5% of the driver's time) and at the
    end, so the next ``harness tune`` can verify it before restoring. A driver killed between
    Ray's write and the next look leaves a version the ledger lacks: not restored, started again."""

    def __init__(self, where: str):
        self.where, self._ledger, self._next = where, None, 0.0

    def record(self):
        if self._ledger is None:
            self._ledger = signed.Ledger(self.where)
        t0 = time.monotonic()
        self._ledger.record()
        self._next = time.monotonic() + max(0.5, 20 * (time.monotonic() - t0))

    def on_step_end(self, iteration, trials, **info):
        if time.monotonic() >= self._next:
            self.record()

    def on_experiment_end(self, trials, **info):
        self.record()

    def __getstate__(self):  # pickled into tuner.pkl: never the key
        return {"where": self.where, "_ledger": None, "_next": 0.0}


# ---------------------------------------------------------------------------------------------
# harness tune

def tune_study(path: str, results: str | None = None, address: str | None = None,
               dry_run: bool = False, device: str = "auto", cell_fn=None) -> int:
    """Search each loss family's hyperparameters and pin the choice; 0 when every family has
    one, 1 when some has none (all its trials failed or diverged); user errors raise (exit 2).
    ``cell_fn`` replaces ``harness.orchestrate.cell.run_cell`` in the trainable (tests)."""

    study = load_study(path)
    if study.tune is None:
        raise TuneError(f"{path} has no tune: section, so there is nothing to tune. Add one "
                        f"(README, Tuning) or run `harness run {path}`.")
    root = results_root(results or study.results_root)
    store.check_root(root)
    cache = cache_root(root)
    if dry_run:
        print(describe(study, root))
        return 0
    todo = [f for f, (s, _) in family_states(study, root).items() if s != "tuned"]
    if not todo:
        print(f"every loss family of {study.name} is tuned under this tune: section (pinned in "
              f"{root}/pin.json); nothing was run. `harness run {path}` uses the choice.")
        return 0
    _, datasets = fingerprints(study)
    started = connect(address)
    chosen = {}
    try:
        problem = cluster_problem(study)
        if problem:
            print("error: " + problem, file=sys.stderr)
            return 2
        with acquire_lock(root, cache, cluster_totals(), "harness tune"):
            _teachers(study, todo, datasets, root, cache, device)
            with quiet_tune():
                for label in todo:
                    chosen[label] = _tune_family(study, label, root, cache, device, cell_fn)
    finally:
        if started:
            import ray

            ray.shutdown()
    missing = [f for f, c in chosen.items() if c is None]
    print(f"tune {study.name}: " + "; ".join(
        f"{f} " + (" ".join(f"{k}={fmt_value(v)}" for k, v in c["choice"].items()) +
                   f" ({c['metric']} {c['score']:.4g}, best of {c['candidates']} complete "
                   f"trials)" if c else "NO CHOICE")
        for f, c in chosen.items()) + f"; pinned in {root}/pin.json")
    if missing:
        print(f"{len(missing)} families have no complete trial ({', '.join(missing)}): every "
              f"trial failed or diverged. See the rows with status tuning, change the search "
              f"space, and run `harness tune {path}` again.")
        return 1
    print(f"next: harness run {path}")
    return 0


def _teachers(study, todo, datasets, root, cache, device):
    """Train (or load) each teacher the trials need once, as ``harness run`` does (Ray tasks
    with the study's teacher_resources), from the plan ``harness run`` makes (reference rows go
    to the scratch store)."""
    bases = [study.tune.families[label].base for label in todo]
    plan = teacher_plan((cfg, datasets[canonical_json(cfg["data"])].fingerprint) for cfg in bases)
    train_teachers(study, plan, scratch_root(root), cache, device)


def _tune_family(study, label: str, root: str, cache: str, device: str, cell_fn) -> dict | None:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    t = study.tune
    fam = t.families[label]
    fh = family_hash(t, fam)
    storage = root.rstrip("/") + "/tune"
    name = experiment_name(study, label, fh)
    where = f"{storage}/{name}"
    per_trial = final_kimg(fam.base) * len(t.seeds)
    trainable = tune.with_resources(
        tune.with_parameters(harness_trial, family=fam, tune_hash=t.hash, fam_hash=fh,
                             seeds=list(t.seeds), metric=t.metric, root=root,
                             scratch=scratch_root(root), cache=cache, study=study.name,
                             device=device, threads=max(1, int(study.resources["cpu"])),
                             cell_fn=cell_fn),
        {"cpu": study.resources["cpu"], "gpu": study.resources["gpu"]})
    signer = SignState(where)
    callbacks = [TrialLines(label, t.trials, per_trial, list(t.seeds)), signer]
    tuner = None
    restorable = tune.Tuner.can_restore(where)
    bad = signed.unverified(where) if restorable else []
    if bad:
        signed.set_aside(where, bad)
        print(f"note: Ray's state of {name} does not match what the harness recorded ("
              f"{len(bad)} files, e.g. {bad[0]}: a driver killed before it could record them, "
              f"or written by someone else), so it is not restored: its trials start again. The "
              f"files are kept as *.unverified in {where}")
    elif restorable:
        print(f"tune {label}: resuming Ray experiment {name} ({where})")
        try:
            tuner = tune.Tuner.restore(where, trainable=trainable, resume_errored=True)
            local = getattr(tuner, "_local_tuner", None)  # fresh callbacks (not public API)
            if local is not None and getattr(local, "_run_config", None) is not None:
                local._run_config.callbacks = callbacks
        except Exception as e:  # noqa: BLE001 (a damaged experiment: its trials start afresh)
            print(f"note: cannot resume {name} ({error_summary(str(e))}); starting it again")
            tuner = None
    if tuner is None:
        mode = "max" if t.metric != "auto" and higher_is_better(t.metric) else "min"
        scheduler = (ASHAScheduler(time_attr="kimg", max_t=per_trial,
                                   grace_period=per_trial * ASHA_GRACE,
                                   reduction_factor=ASHA_REDUCTION)
                     if t.scheduler == "asha" else FIFOScheduler())
        note = asha_note(t, fam)
        if note:
            print(f"note: {note}")
        print(f"tune {label}: Ray experiment {name}: {t.trials} trials of "
              f"{', '.join(f'{k} ~ {d.text}' for k, d in fam.space.items())}, "
              f"{t.kimg:g} kimg x {len(t.seeds)} seed(s) each, scheduler {t.scheduler}; "
              f"Ray's logs in {where}", flush=True)
        tuner = tune.Tuner(
            trainable, param_space={k: d.ray() for k, d in fam.space.items()},
            tune_config=tune.TuneConfig(
                metric="score", mode=mode, num_samples=t.trials, scheduler=scheduler,
                search_alg=BasicVariantGenerator(random_state=SEARCH_SEED), reuse_actors=True),
            run_config=tune.RunConfig(
                name=name, storage_path=storage, verbose=0, callbacks=callbacks,
                failure_config=tune.FailureConfig(max_failures=study.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=None)))
    try:
        tuner.fit()
    finally:
        signer.record()
    table = trial_table(read_trial_rows(root, t.seeds), fh, t.seeds, final_kimg(fam.base))
    best = select(table)
    if best is None:
        return None
    values = {k: best["values"][k] for k in fam.space}
    with_values(fam.base, values)  # the chosen values pass the schema once more
    entry = {"hash": fh, "choice": values, "space": {k: d.text for k, d in fam.space.items()},
             "log": [k for k, d in fam.space.items() if d.log],
             "trial": best["trial"], "metric": best["metric"], "score": best["score"],
             "candidates": best["candidates"], "trials": int(len(table)),
             "final_kimg": final_kimg(fam.base), "experiment": name,
             "init": C.init_label(fam.base["init"])}
    record_choice(root, study, label, entry)
    _drop_trial_weights(where, t.seeds)
    return entry


def _drop_trial_weights(where: str, seeds) -> None:
    """Once a family's choice is pinned its trials are never resumed (a changed ``tune:``
    section is a new experiment), so their checkpointed weights (``seed-<s>.pt``, about 15 MB a
    trial on digits) are deleted; Ray's experiment state, the trials' results and the rows
    stay."""

    fs, base = filesystem(where)
    for item in fs.get_file_info(pafs.FileSelector(base, allow_not_found=True)):
        if item.type == pafs.FileType.Directory:
            for seed in seeds:
                drop_older(fs, item.path, None, f"seed-{seed}.pt")
