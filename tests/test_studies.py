"""The shipped studies validate and dry-run; the cluster study dry-runs without its data."""
import subprocess
import sys
from pathlib import Path

import pytest

from harness.declare.study import load_study

STUDIES = Path(__file__).resolve().parents[1] / "studies"


ALL_LOSSES = {"di", "sid", "ratio_kl", "ratio_js", "ratio_rkl"}


@pytest.mark.parametrize("name,cells,losses", [("quick", 10, ALL_LOSSES), ("cifar10", 150, ALL_LOSSES),
                                               ("c3-digits", 72, {"sid", "ratio_js"}),
                                               ("c1-digits", 40, ALL_LOSSES)])
def test_shipped_studies_validate(name, cells, losses):
    study = load_study(str(STUDIES / f"{name}.yaml"))
    assert len(study.cells) == cells
    assert {c.axes["loss"] for c in study.cells} == losses


def test_cifar10_dry_run_without_data(tmp_path):
    out = subprocess.run([sys.executable, "-m", "harness.cli", "run", str(STUDIES / "cifar10.yaml"),
                          "--dry-run", "--results", str(tmp_path / "r")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr  # the data is missing: `run` could not start
    assert "150 cells would run once the data is there" in out.stdout and "data.path" in out.stderr
    assert not (tmp_path / "r").exists()


COMMITTED = sorted(p.parent.name for p in (STUDIES.parent / "results").glob("*/pin.json")
                   if (STUDIES / f"{p.parent.name}.yaml").exists())


@pytest.mark.parametrize("name", COMMITTED)
def test_committed_results_keep_their_cell_ids(name):
    """Settings added since the results were stored (execution-only ones, teacher.precision at
    fp32) must not orphan them: the study's ids today are exactly the pinned current ones."""
    from harness.core.data import from_config
    from harness.declare.hashing import compute_ids
    from harness.store.pins import read_pin

    from harness.orchestrate.rounds import with_cells
    from harness.store.tuning import apply_pinned

    root = str(STUDIES.parent / "results" / name)
    study = apply_pinned(load_study(str(STUDIES / f"{name}.yaml")), root)  # tuned values, if any
    fingerprint = from_config(study.cells[0].config["data"]).fingerprint
    pinned = read_pin(root)
    today = [cid for cid, *_ in compute_ids(study, fingerprint)]
    if study.claims.seeds is None:
        assert today == pinned["current"]
    else:  # seeds on demand: the first round's cells, then those later rounds added
        pool = {cid for cid, *_ in compute_ids(with_cells(study, study.seed_pool), fingerprint)}
        assert set(today) <= set(pinned["current"]) <= pool
