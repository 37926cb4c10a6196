"""``harness plan STUDY``: what a study still costs, before anything runs.

The work left is every cell that is not done or diverged (a resumed one: the kimg it has not
trained yet) and every teacher those cells need that is not cached (a partly trained one: its
remaining steps; an imported teacher costs nothing). Time = images / throughput, one throughput
per kind of step (``harness.orchestrate.throughput``: cells with the same network, loss family, batch and
execution settings train at the same speed), either given (``--img-per-s``) or measured here by
a short warm-up of the real training step (``harness.orchestrate.warmup``) on the device the study asks for,
with its CPU threads. Compute is in GPU-hours (studies that ask for GPUs) or core-hours: time x
the GPUs or CPUs a cell (teacher) holds. Wall time on N workers (N cells or teachers at a time):
teachers first, then cells, each list scheduled longest first, an upper bound where some cells'
teachers are cached sooner than others' (``harness run`` starts those cells while the other
teachers train). Evaluations, init-scheme
preparation (mapping_match's regression), a ``harness tune`` search and Ray's start are not
counted. The plan goes to ``<results root>/plan.json``, which ``harness status`` compares the
cells' measured throughput with.
"""
from __future__ import annotations

import argparse
import heapq
import math
import os
import socket

from harness.core.data import DataError, from_config
from harness.declare.config import source_teacher
from harness.declare.hashing import canonical_json, teacher_id
from harness.declare.study import load_study
from harness.orchestrate import throughput
from harness.orchestrate.status import (
    FINAL,
    cell_states,
    concurrent_cells,
    duration,
    fingerprints,
    machine_cpus,
    read_teacher_status,
)
from harness.store import pins, results
from harness.store.cache import cache_for
from harness.store.tuning import apply_pinned

SHAPES = {"toy2d": ((2,), None), "digits": ((1, 8, 8), 0.5), "mnist5k": ((1, 32, 32), 0.5),
          "mnist": ((1, 32, 32), 0.5), "cifar10": ((3, 32, 32), 0.5)}
"""Shapes of the built-in datasets, to measure a study whose files are not on this machine."""


class PlanError(ValueError):
    """A plan that cannot be made as asked (user error: exit 2)."""


def positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value
    return parse


def add_parser(sub) -> None:
    sp = sub.add_parser("plan", help="what the study still costs (GPU- or core-hours, wall "
                        "time), before anything runs; measures throughput unless given")
    sp.add_argument("study", help="study YAML file")
    sp.add_argument("--results", default=None, help="results root (default: the study's)")
    sp.add_argument("--img-per-s", type=positive(float), default=None, metavar="N",
                    help="training images per second of one cell (default: measured here by a "
                         "few real steps of each kind of cell)")
    sp.add_argument("--teacher-img-per-s", type=positive(float), default=None, metavar="N",
                    help="the same for teachers (default: --img-per-s if given, else measured)")
    sp.add_argument("--workers", type=positive(int), default=None, metavar="N",
                    help="cells (and teachers) running at the same time, e.g. the GPUs of a "
                         "cluster for a one-GPU-per-cell study (default: what this machine holds "
                         "by the study's resources)")
    sp.add_argument("--warm-up-s", type=positive(float), default=3.0, metavar="S",
                    help="training seconds timed per kind of step when measuring, after two "
                         "untimed steps (default: 3)")
    sp.set_defaults(func=cmd_plan)


def cmd_plan(args) -> int:
    for line in plan_study(args.study, args.results, args.img_per_s, args.teacher_img_per_s,
                           args.workers, args.warm_up_s):
        print(line)
    return 0


def _units(res: dict, workers: int = 1) -> tuple[float, str]:
    """(devices one cell or teacher holds, their unit)."""
    if res.get("gpu", 0) > 0:
        return res["gpu"] * workers, "GPU-hours"
    return res.get("cpu", 1) * workers, "core-hours"


def _default_workers(study) -> int:
    gpus = 0
    if study.resources["gpu"] > 0:
        import torch  # only to count this machine's GPUs

        gpus = torch.cuda.device_count()
    return concurrent_cells(study, machine_cpus(), gpus)


def schedule(seconds: list[float], slots: int) -> float:
    """Wall time of ``seconds`` jobs on ``slots`` workers, longest first to the freest worker."""
    free = [0.0] * slots
    for s in sorted(seconds, reverse=True):
        heapq.heapreplace(free, free[0] + s)
    return max(free)


def _work(study, root: str) -> tuple[list, list, list[str]]:
    """(cells to run [(config, kimg left)], teachers to train [(data, teacher section,
    kimg left)], notes)."""
    notes = []
    try:
        fp, _ = fingerprints(study)
    except DataError as e:
        notes.append(f"the dataset is not on this machine ({e}); every cell and teacher is "
                     f"counted as still to run (their ids hash the data)")
        teachers = {}
        for cell in study.cells:
            for section in (cell.config["teacher"], source_teacher(cell.config)):
                if section is not None and not section.get("import"):
                    teachers.setdefault(canonical_json(section),
                                        (cell.config["data"], section, section["kimg"]))
        return ([(c.config, c.config["student"]["kimg"]) for c in study.cells],
                list(teachers.values()), notes)
    pin = pins.pin_study(study, root, fp, write=False)
    states = cell_states(results.load_rows(root), pin.ids)
    cells, teachers = [], {}
    cache = cache_for(root, log=lambda *a: None)
    for cid, cell in pin.current:
        cfg, s = cell.config, states[cid]
        if s["state"] in FINAL:
            continue
        cells.append((cfg, max(0.0, cfg["student"]["kimg"] - s["kimg"])))
        for section in (cfg["teacher"], source_teacher(cfg)):
            if section is None or section.get("import"):
                continue
            tid = teacher_id({**cfg, "teacher": section}, fp(cfg["data"]))
            folder = os.path.join(cache, "teachers", tid)
            if tid in teachers or os.path.exists(os.path.join(folder, "teacher.pt")):
                continue
            st = read_teacher_status(folder) or {}
            done = st.get("step", 0) / st["total"] if st.get("total") else 0.0
            teachers[tid] = (cfg["data"], section, section["kimg"] * (1 - min(done, 1.0)))
    return cells, list(teachers.values()), notes


def _measure(study, cells, teachers, img_per_s, teacher_img_per_s, budget_s) -> dict:
    """{("cells"|"teachers", key): {img_per_s, source}}: given, or measured here."""
    rates = {}
    kinds = [("cells", throughput.cell_key(cfg), cfg) for cfg, _ in cells]
    kinds += [("teachers", throughput.teacher_key(data, t), {"data": data, "teacher": t})
              for data, t, _ in teachers]
    given = {"cells": img_per_s, "teachers": teacher_img_per_s or img_per_s}
    for kind, key, cfg in kinds:
        if (kind, key) in rates:
            continue
        if given[kind] is not None:
            source = "given" if kind == "cells" or teacher_img_per_s else "given, --img-per-s"
            rates[(kind, key)] = {"img_per_s": given[kind], "source": source}
            continue
        res = study.resources if kind == "cells" else study.teacher_resources
        rates[(kind, key)] = _warm_up(study, kind, cfg, res, budget_s)
    return rates


def _warm_up(study, kind: str, cfg: dict, res: dict, budget_s: float) -> dict:
    import torch  # measuring needs torch; a plan with given throughputs does not

    from harness.orchestrate import warmup  # torch: only when the throughput is measured here

    device = "cuda" if res.get("gpu", 0) > 0 else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise PlanError(f"study {study.name} runs its {kind} on GPUs ({kind[:-1]} resources "
                        f"{res}) and this machine has no CUDA device, so their throughput cannot "
                        f"be measured here. Give it with --img-per-s N (images per second of one "
                        f"cell; --teacher-img-per-s for teachers), or run `harness plan` on a "
                        f"GPU node.")
    shape, sigma = _shape(cfg["data"])
    threads = int(res.get("cpu", 1)) if device == "cpu" else None
    if kind == "cells":
        per_worker = cfg["student"]["batch"] // study.workers
        m = warmup.time_cell(cfg, shape, sigma, device, threads=threads, batch=per_worker,
                             budget_s=budget_s)
        rate = m["img_per_s"] * study.workers
        scaled = f" x {study.workers} data-parallel workers (ideal scaling)" \
            if study.workers > 1 else ""
    else:
        m = warmup.time_teacher(cfg, shape, sigma, device, threads=threads, budget_s=budget_s)
        rate, scaled = m["img_per_s"], ""
    where = torch.cuda.get_device_name() if device == "cuda" else \
        f"cpu, {threads} thread{'s' if threads != 1 else ''}"
    return {"img_per_s": rate, "source": f"measured: {m['steps']} steps on {where}{scaled}"}


def _shape(data: dict) -> tuple[tuple, float]:

    try:
        ds = from_config(data)
        return tuple(ds.x.shape[1:]), ds.sigma_data
    except DataError:
        if data["name"] in SHAPES and data["name"] != "toy2d":
            return SHAPES[data["name"]]
        raise


def _kimg(kimg: float) -> str:
    return f"{kimg:,.0f}" if kimg >= 1000 else f"{kimg:g}"


def plan_study(path: str, results_root: str | None = None, img_per_s: float | None = None,
               teacher_img_per_s: float | None = None, workers: int | None = None,
               warm_up_s: float = 3.0) -> list[str]:
    """The plan's lines; writes ``<root>/plan.json`` (nothing else) once they are computed, if
    anything is left to run."""
    study = load_study(path)
    root = results_root or study.results_root
    results.check_root(root)
    study = apply_pinned(study, root, strict=False)  # harness.store.tuning: tuned values
    cells, teachers, notes = _work(study, root)
    out = [f"plan for study {study.name} ({path}): {len(study.cells)} cells, {len(cells)} still "
           f"to run; results {root}"]
    out += [f"note: {n}" for n in notes]
    if not cells and not teachers:
        return out + ["nothing left to run (every cell is done or diverged): no plan saved"]
    rates = _measure(study, cells, teachers, img_per_s, teacher_img_per_s, warm_up_s)
    slots = workers or _default_workers(study)
    walls, totals = {}, {}
    for kind, items in (("teachers", [(throughput.teacher_key(d, t), kimg,
                                       throughput.describe_teacher(d, t))
                                      for d, t, kimg in teachers]),
                        ("cells", [(throughput.cell_key(c), kimg, throughput.describe_cell(c))
                                   for c, kimg in cells])):
        res = study.resources if kind == "cells" else study.teacher_resources
        held, unit = _units(res, study.workers if kind == "cells" else 1)
        seconds, groups = [], {}
        for key, kimg, what in items:
            s = kimg * 1000 / rates[(kind, key)]["img_per_s"]
            seconds.append(s)
            g = groups.setdefault(key, [what, 0, 0.0, 0.0])
            g[1:] = [g[1] + 1, g[2] + kimg, g[3] + s]
        for key, (what, n, kimg, s) in groups.items():
            r = rates[(kind, key)]
            out.append(f"{kind}: {n} x {what}: {_kimg(kimg)} kimg at {r['img_per_s']:.4g} img/s "
                       f"({r['source']}) = {duration(s)} of training")
        if not items:
            out.append(f"{kind}: none to {'train' if kind == 'teachers' else 'run'}")
        hours = sum(seconds) * held / 3600
        totals[unit] = totals.get(unit, 0.0) + hours
        walls[kind] = schedule(seconds, slots) if seconds else 0.0
        if items:
            device = "GPU" if unit == "GPU-hours" else "core"
            out.append(f"{kind} compute: {hours:.4g} {unit} ({duration(sum(seconds))} of "
                       f"training x {held:g} {device}{'s' if held != 1 else ''} each)")
    out.append("total compute: " + " + ".join(f"{h:.4g} {u}" for u, h in totals.items()))
    out.append(f"wall on {slots} worker{'s' if slots != 1 else ''} ({slots} at a time): "
               f"~{duration(walls['teachers'] + walls['cells'])} (teachers "
               f"{duration(walls['teachers'])}, then cells {duration(walls['cells'])}); "
               f"evaluations, init preparation (mapping_match), a tune search and Ray's start "
               f"come on top")
    doc = {"study": study.name, "written_at": pins.utc_now(), "host": socket.gethostname(),
           "workers": slots, "cells": {}, "teachers": {}}
    for (kind, key), r in rates.items():
        doc[kind][key] = r
    results.write_bytes_atomic(root, throughput.PLAN, pins.dumps(doc))
    out.append(f"plan saved to {pins.location(root, throughput.PLAN)}: `harness status` compares "
               f"the cells' measured throughput with it")
    return out
