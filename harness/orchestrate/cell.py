"""One cell end to end: data -> teacher -> init -> train -> evaluate -> result rows.

``run_cell`` is what ``harness cell`` calls directly and what the Ray trainable calls per cell,
so a cell computes the same numbers with or without Ray. Reference rows (the data floor and the
teacher's Heun-35 quality) are written beside the cell's rows; they are memoised per teacher.
"""
from __future__ import annotations

import math
import os
import time
from typing import Callable

import numpy as np
import torch

from harness import __version__
from harness.core import data as datasets
from harness.core import losses, metrics, nets
from harness.core.parallel import SINGLE, Shard
from harness.core.perf import pick_device
from harness.core.train import Evaluation, train_student
from harness.declare.config import init_label, source_teacher
from harness.declare.hashing import cell_id
from harness.orchestrate import teacher as teachers
from harness.store import results
from harness.store.tracking import open_trackers


def _stored(x: torch.Tensor) -> np.ndarray:
    return x.numpy().astype(np.float32) if x.ndim == 2 else metrics.to_uint8(x).numpy()


def reference_rows(study: str, teacher_id: str, cfg: dict, name: str, values: dict, what: str,
                   protocol: str, step: int = 0, wall_s: float | None = None) -> list[dict]:
    """Result rows of one reference (``data_floor``, ``teacher_heun35``) of a teacher."""
    return [{"study": study, "cell": f"ref-{teacher_id}-{name}", "loss": "reference",
             "init": name, "init_scheme": name, "seed": int(cfg["teacher"]["seed"]),
             "kimg": float(cfg["teacher"]["kimg"]), "step": step, "metric": metric,
             "value": float(value), "status": "reference", "protocol": f"{what}; {protocol}",
             "wall_s": wall_s, "version": __version__} for metric, value in values.items()]


def write_references(root: str, study: str, cfg: dict, dataset, teacher, meta, evaluator,
                     folder: str, device: str, log=print):
    """Rows for the data floor (``Evaluator.real_vs_real``) and the teacher's Heun-35 samples."""
    key = f"{evaluator.metric_name}|{evaluator.protocol}"
    floor = teachers.cached_quality(folder, "floor|" + key, evaluator.real_vs_real)
    heun = teachers.cached_quality(folder, "heun35|" + key, lambda: teachers.heun_quality(
        teacher, evaluator, dataset.x.shape[1:], evaluator.n, cfg["teacher"]["seed"], device))
    rows = (reference_rows(study, meta["id"], cfg, "data_floor", floor, evaluator.floor_protocol(),
                           evaluator.protocol, meta.get("steps", 0), meta.get("wall_s"))
            + reference_rows(study, meta["id"], cfg, "teacher_heun35", heun,
                             "teacher, Heun sampler, 35 evaluations", evaluator.protocol,
                             meta.get("steps", 0), meta.get("wall_s")))
    results.write_rows(root, rows)
    log(f"references: data floor {floor.get(evaluator.metric_name, float('nan')):.4g}, "
        f"teacher Heun-35 {heun.get(evaluator.metric_name, float('nan')):.4g} "
        f"({evaluator.metric_name})")


def prepare(cfg: dict, root: str, cache: str, device: str, *, study: str = "adhoc",
            log: Callable = print, dataset=None, evaluate: bool = True):
    """Data, teacher (trained or reused), evaluator, and the reference rows under ``root``
    (``evaluate=False``: no evaluator and no rows, for ranks > 0 of a data-parallel cell).
    ``device``: as ``pick_device`` takes it."""
    device = pick_device(device)
    dataset = dataset if dataset is not None else datasets.from_config(cfg["data"])
    teacher, meta = teachers.load_or_train(cfg, dataset, cache, device, log)
    if not evaluate:
        return dataset, teacher, meta, None
    evaluator = metrics.Evaluator(dataset, n=cfg["eval"]["n"], cache_dir=cache,
                                  metric=cfg["eval"]["metric"], device=device,
                                  inception_weights=cfg["eval"].get("inception_weights"),
                                  extractor=cfg["eval"]["extractor"])
    _, folder = teachers.teacher_dir(cache, cfg, dataset)
    write_references(root, study, cfg, dataset, teacher, meta, evaluator, folder, device, log)
    return dataset, teacher, meta, evaluator


def network_sizes(cfg: dict, shape: tuple) -> dict:
    """Parameter counts of the generator and the auxiliary net (fake score or ratio net)."""
    arch, width = cfg["teacher"]["arch"], cfg["teacher"].get("channels")
    ratio = losses.family_class(cfg["loss"]).aux_kind == "ratio"
    aux = nets.build_ratio(arch, shape, width) if ratio else nets.build(arch, shape, width)
    return {"generator_params": nets.count_parameters(nets.build(arch, shape, width)),
            "aux_params": nets.count_parameters(aux),
            "aux_net": "ratio net (encoder half)" if ratio else "fake score"}


def run_cell(cfg: dict, root: str, cache: str, ckpt_path: str, *, study: str = "adhoc",
             axes: dict | None = None, device: str = "auto", log: Callable = print,
             on_eval: Callable[[Evaluation], None] | None = None,
             max_steps: int | None = None, teacher_guard: Callable | None = None,
             tracking: dict | None = None, shard: Shard = SINGLE) -> Evaluation:
    """Run (or resume) one cell and append its rows and samples under ``root``.

    Args:
        cfg: resolved cell config. root: results root (path or URI). cache: local folder for
        teachers and extractors. ckpt_path: this cell's checkpoint file.
        on_eval: called after each evaluation's rows are written (Ray reports from here).
        teacher_guard: wraps the teacher before training (tests use it to forbid calls).
        tracking: the study's ``tracking:`` settings (harness.store.tracking); None: no trackers.
        shard: this worker's rank of a data-parallel cell (``harness.core.parallel``): rank 0 alone
            evaluates, writes rows and samples, tracks and checkpoints; every rank calls
            ``on_eval`` at every evaluation, so Ray Train's reports stay in step.
    """
    device = pick_device(device)
    dataset, teacher, meta, evaluator = prepare(cfg, root, cache, device, study=study, log=log,
                                                evaluate=shard.lead)
    init_extra = {"cache": cache, "teacher_id": meta["id"]}
    source = source_teacher(cfg)
    if source is not None:  # the generator starts from another teacher's weights
        other, other_meta = teachers.load_or_train({**cfg, "teacher": source}, dataset, cache,
                                                   device, log)
        init_extra["source_state"] = {k: v.detach().cpu() for k, v in other.net.state_dict().items()}
        log(f"cell: generator initialized from teacher {other_meta['id']} ({init_label(cfg['init'])})")
    cid = cell_id(cfg, dataset.fingerprint)
    columns = results.cell_columns(cfg, study, cid, axes or {})
    sizes = network_sizes(cfg, dataset.x.shape[1:])
    log(f"cell {cid}: generator {sizes['generator_params']:,} parameters, auxiliary "
        f"{sizes['aux_net']} {sizes['aux_params']:,}")
    start = time.perf_counter()
    tracker = open_trackers(tracking if shard.lead else None, root, study, cid, cfg, axes or {},
                            log=log)

    def report(ev: Evaluation):
        if not shard.lead:
            if on_eval is not None:
                on_eval(ev)
            return
        base = {**columns, "kimg": ev.kimg, "step": ev.step, "wall_s": ev.wall_s,
                "status": ev.status, "message": ev.message, "version": __version__}
        rows = [{**base, "metric": m, "value": float(v), "protocol": evaluator.protocol}
                for m, v in ev.metrics.items()]
        rows += [{**base, **r} for r in ev.extra_rows]  # after the plain score (status reads it)
        rows += [{**base, "metric": m, "value": v, "protocol": "generator optimiser, the step "
                  "before this evaluation"} for m, v in ev.optim.items()]
        if ev.step == 0:
            rows += [{**base, "metric": k, "value": float(sizes[k]), "protocol": f"parameter "
                      f"count ({sizes['aux_net'] if k == 'aux_params' else 'generator'})"}
                     for k in ("generator_params", "aux_params")]
        if ev.step and ev.wall_s > 0:
            rows.append({**base, "metric": "img_per_s", "protocol": "training images per second",
                         "value": ev.step * cfg["student"]["batch"] / ev.wall_s})
        if torch.device(device).type == "cuda":
            rows.append({**base, "metric": "peak_mem_mb", "protocol": "torch.cuda.max_memory_allocated",
                         "value": torch.cuda.max_memory_allocated() / 2**20})
        if ev.status == "diverged":
            rows.append({**base, "metric": "diverged", "value": float(ev.step),
                         "protocol": "step at which a loss went non-finite"})
        meta = {k: columns[k] for k in ("study", "cell", "loss", "init", "seed")} | {"kimg": ev.kimg}
        if ev.samples is not None and ev.status != "diverged":
            results.write_samples(root, meta, _stored(ev.samples[:cfg["eval"]["samples"]]))
            if ev.status == "done" and keep_final(cfg, ev.samples.shape[1:]):
                results.write_samples(root, meta, _stored(ev.samples), kind="final")
        results.write_rows(root, rows)
        tracker.log_rows(rows)  # views of what was just stored; a tracker never raises
        if ev.samples is not None and ev.status != "diverged":
            tracker.log_samples(ev.kimg, _stored(ev.samples[:cfg["eval"]["samples"]]))
        score = ev.metrics.get(evaluator.metric_name)
        log(f"cell {cid} [{columns['loss']} | {columns['init']} | seed {columns['seed']}] "
            f"kimg {ev.kimg:.1f}/{cfg['student']['kimg']} {evaluator.metric_name} "
            f"{'-' if score is None else f'{score:.4g}'} {ev.status} "
            f"({time.perf_counter() - start:.0f} s)" + (f": {ev.message}" if ev.message else ""))
        if on_eval is not None:
            on_eval(ev)

    guarded = teacher_guard(teacher) if teacher_guard else teacher
    os.makedirs(os.path.dirname(os.path.abspath(ckpt_path)), exist_ok=True)
    status = "failed"  # unless training returns
    try:
        last = train_student(cfg, guarded, torch.from_numpy(dataset.x).to(device),
                             dataset.sigma_data, evaluator, ckpt_path, report, device=device,
                             max_steps=max_steps, init_extra=init_extra, shard=shard)
        status = last.status
        return last
    finally:
        tracker.close(status)


FINAL_AUTO_MAX = 3 * 32 * 32  # eval.final_samples: auto keeps images up to 32x32x3 (3 KB each)


def keep_final(cfg: dict, shape: tuple) -> bool:
    """Whether all ``eval.n`` final samples are stored (``eval.final_samples``)."""
    mode = cfg["eval"]["final_samples"]
    return mode == "all" or (mode == "auto" and len(shape) == 3 and math.prod(shape) <= FINAL_AUTO_MAX)
