"""``harness rescore STUDY``: new metric rows from the stored final samples, without retraining.

Metrics change more often than training runs should. Every done cell that kept its final
evaluation's samples (``eval.final_samples``, on by default for images up to 32x32x3) is scored
again under the study's evaluation settings, optionally overridden (``--set eval.extractor=train``,
``--set eval.metric=fid --set eval.inception_weights=PATH``). The new rows carry the new protocol
string and sit beside the old ones (rows are keyed by cell, kimg, metric *and* protocol), so
nothing is overwritten; the data floor is measured again under the same protocol, and figures
use one protocol per metric (the newest floor's), noting the rows they leave out.

A protocol a cell was already scored under is skipped, so a rerun is a no-op. The teacher's
Heun-35 reference row is not rescored (no teacher samples are stored).
"""
from __future__ import annotations

import copy

from harness import __version__
from harness.core import metrics
from harness.core.perf import pick_device
from harness.declare.config import resolve_cell
from harness.declare.hashing import canonical_json
from harness.declare.study import load_study
from harness.orchestrate.cell import reference_rows
from harness.orchestrate.status import cell_states, fingerprints
from harness.orchestrate.ray_session import cache_root, results_root
from harness.store import pins
from harness.store import results as store
from harness.store.lock import acquire_lock
from harness.store.results import cell_columns
from harness.store.tuning import apply_pinned


def rescore_study(path: str, results: str | None = None, eval_overrides: dict | None = None,
                  cache: str | None = None, device: str = "auto", log=print) -> int:
    """Score every done cell's stored final samples again; 0 when every such cell is scored."""
    import torch

    study = load_study(path)
    root = results_root(results or study.results_root)
    study = apply_pinned(study, root)  # harness.store.tuning: the cells as run
    fp, datasets = fingerprints(study)
    dev = pick_device(device)
    with acquire_lock(root, command="harness rescore"):
        pin = pins.pin_study(study, root, fp, write=False)
        rows = store.load_rows(root)
        states = cell_states(rows, pin.ids)
        finals = store.load_samples(root, "final")
        have = set() if rows.empty else set(zip(rows.cell, rows.kimg, rows.metric, rows.protocol))
        cache = cache or cache_root(root)
        evaluators, floors, new, skipped, missing = {}, set(), [], 0, []
        for cid, cell in pin.current:
            if states[cid]["state"] != "done":
                continue
            mine = finals[finals.cell == cid] if len(finals) else finals
            if mine.empty:
                missing.append(cid)
                continue
            cfg = copy.deepcopy(cell.config)
            cfg["eval"].update(eval_overrides or {})
            cfg = resolve_cell(cfg)
            key = canonical_json([cfg["data"], cfg["eval"]])
            if key not in evaluators:
                ds = datasets[canonical_json(cell.config["data"])]
                ev = cfg["eval"]
                evaluators[key] = (ds, metrics.Evaluator(
                    ds, n=ev["n"], cache_dir=cache, metric=ev["metric"], device=dev,
                    inception_weights=ev["inception_weights"], extractor=ev["extractor"]))
            ds, evaluator = evaluators[key]
            final = mine.iloc[-1]
            done = rows[(rows.cell == cid) & (rows.status == "done")].iloc[-1]
            if all((cid, float(final.kimg), m, evaluator.protocol) in have
                   for m in evaluator.metric_names):
                skipped += 1
                continue
            samples = torch.from_numpy(store.decode_samples(final).copy())
            scores = evaluator(samples)
            base = {**cell_columns(cfg, study.name, cid, cell.axes), "kimg": float(final.kimg),
                    "step": int(done.step), "wall_s": float(done.wall_s), "status": "done",
                    "message": "rescored from the stored final samples", "version": __version__}
            new += [{**base, "metric": m, "value": float(v), "protocol": evaluator.protocol}
                    for m, v in scores.items()]
            log(f"rescored cell {cid} [{cell.label}]: " + ", ".join(
                f"{m} {v:.4g}" for m, v in scores.items()))
            tid = pin.teacher_of(cid)
            if (tid, key) not in floors:
                floors.add((tid, key))
                new += reference_rows(study.name, tid, cfg, "data_floor", evaluator.real_vs_real(),
                                      evaluator.floor_protocol(), evaluator.protocol)
        store.write_rows(root, new)
    scored = len({r["cell"] for r in new if r["status"] == "done"})
    log(f"study {study.name}: {scored} cells rescored, {skipped} already had these protocols"
        + (f", {len(missing)} done cells kept no final samples (eval.final_samples): run them "
           f"again to rescore them" if missing else "") + f"; results in {root}")
    return 0 if not missing else 1
