"""Read-only views of a study's progress: per-cell state, ``harness status``, dry-run notes.

No torch and no Ray: everything comes from the study file, ``pin.json``, the lock file, the
stored rows (``harness.store.results``) and the teachers' ``status.json`` files in the cache, so
``harness status`` is quick and safe while a sweep runs. The rows are the truth: a cell is done
when its ``status=done`` row exists, whatever Ray says.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import time

from harness.core import data
from harness.core.data import DataError
from harness.declare.config import steps
from harness.declare.hashing import canonical_json, teacher_plan
from harness.declare.study import describe, load_study
from harness.orchestrate import rounds, throughput
from harness.store import environment, lock, pins, results
from harness.store.cache import cache_for
from harness.store.tune_views import tune_progress
from harness.store.tuning import apply_pinned

# the state of one cell, from its rows: done / diverged are final; failed and unfinished (rows
# but no final one) and pending (no rows) are run by the next `harness run`
FINAL = ("done", "diverged")


def machine_cpus() -> int:
    """CPUs a Ray instance started on this machine offers: every core, or the ``CPU`` that
    ``RAY_OVERRIDE_RESOURCES`` (Ray's own setting; README: two studies side by side) gives."""
    try:
        cpus = json.loads(os.environ.get("RAY_OVERRIDE_RESOURCES") or "{}").get("CPU")
    except (ValueError, AttributeError):
        cpus = None
    ok = isinstance(cpus, (int, float)) and not isinstance(cpus, bool) and cpus > 0
    return int(cpus) if ok else (os.cpu_count() or 1)


def concurrent_cells(study, cpus: float, gpus: float = 0) -> int:
    """How many of the study's cells run at once on ``cpus`` CPUs and ``gpus`` GPUs (a cell holds
    its ``resources`` once per data-parallel worker)."""
    gpu, cpu = study.resources["gpu"] * study.workers, study.resources["cpu"] * study.workers
    if gpu > 0:
        return max(1, math.floor(gpus / gpu))
    return max(1, math.floor(cpus / max(cpu, 1e-9)))


def resource_problem(study, nodes: list[dict], where: str = "the Ray cluster",
                     kinds: tuple[str, ...] = ("GPU", "CPU")) -> str | None:
    """Why no cell (or teacher task) of the study could ever be scheduled on ``nodes`` (each a
    ``{"CPU": n, "GPU": m}`` of one node, as Ray reports them), or None. ``harness run`` asks
    with the Ray cluster's live nodes (Ray would leave such a trial pending forever), the dry
    run with this machine's CPUs."""
    w = study.workers
    for what, key, need, count in (("cell" if w == 1 else "worker of a cell", "resources",
                                    study.resources, w),
                                   ("teacher", "teacher_resources", study.teacher_resources, 1)):
        for kind in kinds:
            res = kind.lower()
            biggest = max((n.get(kind, 0) for n in nodes), default=0)
            total = sum(n.get(kind, 0) for n in nodes)
            if need[res] > 0 and (biggest < need[res] or total < count * need[res]):
                setting = "resources: {gpu: 0}" if res == "gpu" else f"a smaller {key}.cpu"
                if count > 1:
                    setting += " or fewer resources.workers"
                has = (f"{total:g} {kind}(s)" if len(nodes) == 1 else
                       f"{total:g} {kind}(s) in all and at most {biggest:g} on one node")
                return (f"study {study.name!r} ({study.path}) asks for {need[res]:g} {kind}(s) "
                        f"per {what} ({key}.{res}"
                        + (f", {count} workers: {count * need[res]:g} in all" if count > 1 else "")
                        + f"), but {where} has {has}, so Ray would leave it pending forever. Run "
                        f"it where such nodes exist (--address / RAY_ADDRESS to join a cluster) "
                        f"or set {setting} in the study file.")
    return None


def fingerprints(study):
    """``(data config) -> fingerprint`` for every distinct data config of the study, and the
    datasets by the same key (``canonical_json(data config)``). DataError propagates."""

    sets = {}
    for cell in study.cells:
        key = canonical_json(cell.config["data"])
        if key not in sets:
            sets[key] = data.from_config(cell.config["data"])
        ds = sets[key]
        problem = data.labels_problem(ds, cell.config["eval"]["metric"])
        if problem:
            raise DataError(f"{problem}. Nothing was run.")
    return (lambda d: sets[canonical_json(d)].fingerprint), sets


def cell_states(df, ids) -> dict[str, dict]:
    """{cell id: {state, kimg, step, wall_s, metric, value, message}} for ``ids``."""
    out = {cid: {"state": "pending", "kimg": 0.0, "step": 0, "wall_s": 0.0, "metric": None,
                 "value": math.nan, "message": None} for cid in ids}
    if df.empty:
        return out
    rows = df[df.cell.isin(list(ids)) & (df.status != "reference")].sort_values(
        "written_at", kind="stable")
    for cid, g in rows.groupby("cell", sort=False):
        statuses = set(g.status)
        last = g.iloc[-1]
        state = ("done" if "done" in statuses else "diverged" if "diverged" in statuses
                 else "failed" if last.status == "failed" else "unfinished")
        # the primary metric: the first one written at the latest evaluation
        scored = g[(g.kimg == g.kimg.max())
                   & ~g.metric.isin(results.BOOKKEEPING)]
        best = scored.iloc[0] if len(scored) else last
        out[cid] = {"state": state, "kimg": float(g.kimg.max()), "step": int(g.step.max()),
                    "wall_s": float(g.wall_s.max()) if g.wall_s.notna().any() else 0.0,
                    "metric": best.metric, "value": float(best.value),
                    "message": next((m for m in g.message[::-1] if isinstance(m, str) and m),
                                    None)}
    return out


TEACHER_STATUS = "status.json"  # beside a teacher's ckpt.pt / teacher.pt (teacher.load_or_train)


def read_teacher_status(folder: str) -> dict | None:
    """A teacher folder's ``status.json`` (state, step, total, loss, times), or None."""
    try:
        with open(os.path.join(folder, TEACHER_STATUS)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


STALE_S = 600
"""A training teacher writes its status every few seconds; one silent this long is not running."""


def teacher_state(folder: str, live: bool | None = None) -> str:
    """What a teacher folder says: cached, training (``live``: a run holds the study lock),
    interrupted or failed at a step, or not trained yet. ``live=None``: a dry run's words."""
    st = read_teacher_status(folder) or {}
    at = f"step {st.get('step', 0):,}/{st.get('total', 0):,}" if st else ""
    if os.path.exists(os.path.join(folder, "teacher.pt")):
        return "cached, reused" if live is None else "done (cached)"
    if st.get("state") == "failed":
        return f"failed at {at}: {st.get('message', '')}"
    if os.path.exists(os.path.join(folder, "ckpt.pt")) or st:
        ago_s = time.time() - st.get("updated_at", time.time())
        if live and st.get("state") == "training" and ago_s < STALE_S:
            loss = f", loss {st['loss']:.4g}" if st.get("loss") is not None else ""
            wall, left = st.get("wall_s", 0), left_at_rate(st)
            eta = f", ETA ~{duration(left)} at its mean rate" if left else ""
            return (f"training: {at}{loss}, {duration(wall)} of training{eta} "
                    f"(updated {duration(ago_s)} ago on {st.get('host', '?')})")
        if live and st.get("state") == "training":  # its task is not running: queued or lost
            return (f"waiting at {at} (no progress for {duration(ago_s)}): its task resumes it "
                    f"from its checkpoint when Ray gives it a CPU")
        return (f"partly trained ({at}): resumes from its checkpoint" if live is None else
                f"interrupted at {at}: the next `harness run` resumes it from its checkpoint")
    return ("not cached: trained before the cells that need it" if live is None else
            "not trained yet")


def teacher_left_s(folder: str) -> float | None:
    """Training time a teacher still needs at its mean rate so far: 0 once cached, None while
    there is no rate to go by (not started, or its status gives no step or wall yet)."""
    if os.path.exists(os.path.join(folder, "teacher.pt")):
        return 0.0
    return left_at_rate(read_teacher_status(folder) or {})


def left_at_rate(st: dict) -> float | None:
    """Training left at the mean rate of a teacher status (None: no rate to go by yet, or
    nothing left)."""
    wall, step, total = st.get("wall_s", 0), st.get("step", 0), st.get("total", 0)
    return (total - step) * wall / step if step > 0 and wall > 0 and total > step else None


def teachers_first(pin, cache: str, todo: set) -> str:
    """What the cells left to run (``todo``: their ids) wait for: the teachers of theirs not
    cached yet and, where each has a rate, the training they still need. A cell starts as soon
    as its own teachers are cached (``harness run`` starts one Ray experiment per such wave),
    so only the cells that need one of them wait. Empty when none waits."""
    keyed = {cid: (cell.config, pin.document["cells"][cid]["data_fingerprint"])
             for cid, cell in pin.current if cid in todo}
    left = {tid: teacher_left_s(os.path.join(cache, "teachers", tid))
            for tid in teacher_plan(keyed.values())}
    left = {tid: s for tid, s in left.items() if s != 0.0}
    if not left:
        return ""
    waiting = sum(1 for k in keyed.values() if set(teacher_plan([k])) & set(left))
    known = [s for s in left.values() if s is not None]
    time_left = (f"~{duration(sum(known))} of teacher training left at their mean rates"
                 + (f", {len(left) - len(known)} not started" if len(known) < len(left) else "")
                 if known else "time unknown until they start")
    return (f"; {waiting} of the {len(keyed)} cells left wait{'s' * (waiting == 1)} for "
            f"{len(left)} teacher{'s' * (len(left) != 1)} still to train ({time_left}; their "
            f"lines below)")


def teacher_lines(study, pin, cache: str, live: bool | None = None,
                  only: set | None = None) -> list[str]:
    """One line per teacher the study needs (its own and generator-init sources): cached,
    partly trained, or to be trained (steps), so a dry run says what the first minutes do;
    ``harness status`` (``live``: whether a run holds the lock) adds training progress.
    ``only``: the teachers of these cells (a dry run: the cells it would run)."""

    plan = teacher_plan((cell.config, pin.document["cells"][cid]["data_fingerprint"])
                        for cid, cell in pin.current if only is None or cid in only)
    if only is not None and not plan:
        return ["teachers: none needed (no cell left to run)"]
    lines = []
    for tid, entry in plan.items():
        role, t = entry["role"], entry["cfg"]["teacher"]
        folder = os.path.join(cache, "teachers", tid)
        n = steps(t["kimg"], t["batch"])
        what = f"{t['arch']}, {t['kimg']:g} kimg = {n:,} steps of {t['batch']}" + (
            f", noise band {t['noise']['band']}" if "band" in t["noise"] else "")
        state = teacher_state(folder, live)
        lines.append(f"{role} {tid} ({what}): {state} [{folder}]")
    return lines


def dry_run_report(study, root: str, cache: str | None = None) -> int:
    """``harness run --dry-run``: the cells, what happens to each, the teachers, a summary.
    Writes nothing. Data that is not on this machine (a cluster study checked on a laptop) is
    an error (exit 2) after the cells are listed without ids (ids hash the data)."""

    study = dataclasses.replace(study, results_root=root)
    try:
        fp, _ = fingerprints(study)
    except DataError:
        print(describe(study))
        print(f"{len(study.cells)} cells would run once the data is there and readable (dry run: "
              f"nothing written). Cell ids hash the data's fingerprint, so they are listed then.")
        raise
    rows = results.load_rows(root)
    now = rounds.plan(study, root, fp, rows)
    study = rounds.with_cells(study, now.cells)
    pin = pins.pin_study(study, root, fp, write=False)
    states = cell_states(rows, pin.ids)
    todo = {c for c in pin.ids if states[c]["state"] not in FINAL}
    teachers = teacher_lines(study, pin, cache, only=todo) if cache else []
    words = {"done": "done", "diverged": "diverged (final, not re-run)", "pending": "would run",
             "failed": "failed: would retry", "unfinished": "unfinished: would resume"}
    print(describe(study, pin.ids, [words[states[c]["state"]] for c in pin.ids]))
    for line in teachers:
        print(line)
    for note in pin.notes:
        print(f"note: {note}")
    problem = resource_problem(study, [{"CPU": machine_cpus()}], "this machine", ("CPU",))
    if problem:
        print(f"note: {problem} (`harness run` here would refuse to start; on a Ray cluster it "
              f"is the cluster's nodes that count)")
    for line in environment.drift(results.load_versions(root), environment.current()):
        print(line)
    count = lambda *s: sum(states[c]["state"] in s for c in pin.ids)  # noqa: E731
    print(f"{count('pending', 'failed', 'unfinished')} to run, {count('done')} done, "
          f"{count('diverged')} diverged, {len(pin.orphaned)} orphaned (dry run: nothing written)")
    for line in rounds.cap_lines(study) + (rounds.describe_round(now) if study.claims.seeds else []):
        print(line)
    return 0


def planned_throughput(root: str, df, current, pin, cache: str) -> list[str]:
    """``harness plan``'s throughputs (``plan.json``) against the latest ``img_per_s`` row of
    each cell and each teacher's steps x batch / training seconds (``harness.orchestrate.throughput``)."""
    plan = throughput.read_plan(results.read_bytes(root, throughput.PLAN))
    if plan is None:
        return []
    ips = df[(df.metric == "img_per_s") & df.cell.isin([c for c, _ in current])] \
        if not df.empty else df
    latest = ips.sort_values("kimg").groupby("cell").value.last() if len(ips) else {}
    cells = [(cell.config, float(latest[cid])) for cid, cell in current
             if cell is not None and cid in latest]
    teachers = {}
    for cid, cell in current:
        tid = pin.teacher_of(cid)
        st = read_teacher_status(os.path.join(cache, "teachers", tid)) or {}
        if cell is not None and tid not in teachers and st.get("step") and st.get("wall_s"):
            section = cell.config["teacher"]
            teachers[tid] = (cell.config["data"], section,
                             st["step"] * section["batch"] / st["wall_s"])
    return throughput.compare(plan, cells, list(teachers.values()))


def duration(seconds: float) -> str:
    """``42s``, ``3m07s``, ``5h02m``; from 1,000 days on in years (``1.1e+04 years``), so that
    an absurd rate (``harness plan --img-per-s 1e-300``) still gives a line one can read."""
    if math.isnan(seconds):
        return "unknown"
    if seconds >= 1000 * 86400:
        return f"{seconds / (365.25 * 86400):.2g} years"
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s" if rest >= 60 \
        else f"{rest}s"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[j]) for r in [head] + rows) for j in range(len(head))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head] + rows]


def study_status(path: str, results_root: str | None = None, overrides: dict | None = None) -> str:
    """Counts (done / running / failed / diverged / pending / orphaned), compute spent, ETA and a
    compact table per cell. Writes nothing and takes no lock. ``overrides``: the run's ``--set``."""

    study = load_study(path, overrides)
    root = results_root or study.results_root
    results.check_root(root)
    study = apply_pinned(study, root, strict=False)  # harness.store.tuning: tuned values
    notes, pin = [], None
    try:
        fp, _ = fingerprints(study)
        now = rounds.plan(study, root, fp)
        study = rounds.with_cells(study, now.cells)
        pin = pins.pin_study(study, root, fp, write=False)
        current, orphaned = pin.current, pin.orphaned
        notes += pin.notes
    except DataError as e:  # the data is not on this machine: fall back to pin.json
        doc = pins.read_pin(root) or {"current": [], "cells": {}}
        notes.append(f"dataset unavailable here ({e}); cells as pinned in pin.json")
        current = [(cid, None) for cid in doc["current"]]
        orphaned = [c for c in doc["cells"] if c not in set(doc["current"])]
    df = results.load_rows(root)
    states = cell_states(df, [cid for cid, _ in current])
    holder = lock.holder(root)
    live = "running" if holder else "interrupted"
    counts = {k: 0 for k in ("done", live, "failed", "diverged", "pending")}
    for s in states.values():
        counts[live if s["state"] == "unfinished" else s["state"]] += 1

    done_walls = [s["wall_s"] for s in states.values() if s["state"] == "done"]
    spent = sum(s["wall_s"] for s in states.values())
    # the running process's Ray cluster when a run is live (recorded in the lock), else what a
    # run started here would get
    cluster = (holder or {}).get("cluster")
    if cluster:
        concurrency = concurrent_cells(study, cluster.get("CPU", 0), cluster.get("GPU", 0))
        where = "on the running cluster"
    else:
        concurrency, where = concurrent_cells(study, machine_cpus()), "on this machine"
    out = [f"study {study.name} ({path}): {len(current)} cells; results {root}"]
    if holder:
        what = f"`{holder['command']}`" if holder.get("command") else "a run"
        out.append(f"{what} is in progress: process {holder.get('pid')} on "
                   f"{holder.get('host', socket.gethostname())} since {holder.get('started_at')}")
    if getattr(study, "tune", None) is not None:
        out += tune_progress(study, root)
    out.append(", ".join(f"{k} {v}" for k, v in counts.items()) + f", orphaned {len(orphaned)}")
    eta = "unknown (no cell done yet)"
    if done_walls:
        mean = sum(done_walls) / len(done_walls)
        left = 0.0
        for cid, cell in current:
            s = states[cid]
            if s["state"] in FINAL:
                continue
            total = cell.config["student"]["kimg"] if cell is not None else 0
            frac = min(1.0, s["kimg"] / total) if total else 0.0
            left += mean * (1 - frac)
        cells = f"{concurrency} cell{'s' * (concurrency != 1)}"
        eta = (f"~{duration(left / concurrency)} at {cells} at a time {where} (mean "
               f"{duration(mean)} of training per done cell; evaluations, the verifier and "
               f"Ray's start come on top)") if left else "none: nothing left"
    if pin is not None and current:
        cache = (holder or {}).get("cache") or cache_for(root, log=lambda *a: None)
        todo = {c for c, s in states.items() if s["state"] not in FINAL}
        eta += teachers_first(pin, cache, todo)
    out.append(f"training compute spent: {duration(spent)} (sum of each cell's latest wall_s); "
               f"ETA {eta}")
    if pin is not None and current:
        out += teacher_lines(study, pin, cache, live=holder is not None)
        out += planned_throughput(root, df, current, pin, cache)
    if pin is not None and study.claims.seeds is not None:
        out += rounds.cap_lines(study) + rounds.describe_round(now)
    recorded = results.load_versions(root)
    out += environment.drift(recorded, environment.current())
    if not recorded and not df.empty:
        notes.append("no versions recorded with these rows (written before the harness "
                     "recorded them in versions/)")
    out += [f"note: {n}" for n in notes]
    rows = []
    for cid, cell in current:
        s = states[cid]
        label = cell.label if cell is not None else ""
        total = f"/{cell.config['student']['kimg']:g}" if cell is not None else ""
        state = live if s["state"] == "unfinished" else s["state"]
        value = "" if s["metric"] is None or math.isnan(s["value"]) else \
            f"{s['metric']} {s['value']:.4g}"
        rows.append([cid, label, state, f"{s['kimg']:g}{total}", value, duration(s["wall_s"]),
                     (s["message"] or "")[:60] if state in ("failed", "diverged") else ""])
    out += _table(["cell", "axes", "state", "kimg", "last metric", "wall", "message"], rows)
    if orphaned:
        out.append(f"orphaned (no longer in the study; kept, left out of figures): "
                   f"{', '.join(orphaned)}")
    return "\n".join(out)
