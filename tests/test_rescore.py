"""``harness rescore``: rows under a new protocol from the stored final samples, old rows kept."""
import numpy as np
import torch

from harness.core import data, metrics
from harness.store import pins as pin, results
from harness.orchestrate.cell import run_cell
from harness.orchestrate.rescore import rescore_study
from harness.declare.study import load_study

STUDY = """study: rs
data: {name: digits}
teacher: {arch: unet-xs, kimg: 1}
student: {kimg: 0.25, batch: 16}
eval: {n: 200, every_kimg: 1, extractor: train}
loss: sid
init: teacher
"""


def test_rescore_adds_rows_equal_to_a_fresh_evaluation_and_keeps_old_ones(tmp_path):
    torch.set_num_threads(1)
    path = tmp_path / "rs.yaml"
    path.write_text(STUDY)
    root, cache = str(tmp_path / "results"), str(tmp_path / "cache")
    study = load_study(str(path))
    ds = data.from_config(study.cells[0].config["data"])
    (cid, cell), = pin.pin_study(study, root, ds.fingerprint).current
    run_cell(cell.config, root, cache, str(tmp_path / "ckpt.pt"), study="rs", axes=cell.axes,
             log=lambda *_: None)
    before = results.load_rows(root)
    final = results.load_samples(root, "final")
    assert len(final) == 1 and tuple(final.iloc[0]["shape"]) == (200, 1, 8, 8)  # all n kept
    old_protocols = set(before.protocol[(before.cell == cid) & before.metric.str.startswith("fd_")])
    assert all("trained on this machine" in p for p in old_protocols)

    assert rescore_study(str(path), results=root, eval_overrides={"extractor": "shipped"},
                         cache=cache, log=lambda *_: None) == 0
    after = results.load_rows(root)
    fresh = metrics.Evaluator(ds, 200, cache, extractor="shipped")
    new = after[(after.cell == cid) & (after.protocol == fresh.protocol)]
    expect = fresh(torch.from_numpy(results.decode_samples(final.iloc[0]).copy()))
    assert dict(zip(new.metric, new.value)) == expect
    assert (new.kimg == before[before.cell == cid].kimg.max()).all()
    # the old rows are all still there, unchanged
    merged = before.merge(after, on=["cell", "kimg", "metric", "protocol"], suffixes=("", "_2"))
    assert len(merged) == len(before) and np.array_equal(merged.value, merged.value_2)
    floor = after[(after.init == "data_floor") & (after.protocol.str.contains("shipped"))]
    assert dict(zip(floor.metric, floor.value)) == fresh.real_vs_real()
    # a second rescore under the same protocol adds nothing
    n_files = len(list((tmp_path / "results" / "rows").iterdir()))
    rescore_study(str(path), results=root, eval_overrides={"extractor": "shipped"}, cache=cache,
                  log=lambda *_: None)
    assert len(list((tmp_path / "results" / "rows").iterdir())) == n_files
