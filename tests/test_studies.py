"""The shipped studies validate and dry-run; the cluster study dry-runs without its data."""
import subprocess
import sys
from pathlib import Path

import pytest

from harness.study import load_study

STUDIES = Path(__file__).resolve().parents[1] / "studies"


@pytest.mark.parametrize("name,cells", [("quick", 10), ("paper-digits", 150), ("cifar10", 150)])
def test_shipped_studies_validate(name, cells):
    study = load_study(str(STUDIES / f"{name}.yaml"))
    assert len(study.cells) == cells
    losses = {c.axes["loss"] for c in study.cells}
    assert losses == {"di", "sid", "ratio_kl", "ratio_js", "ratio_rkl"}


def test_cifar10_dry_run_without_data(tmp_path):
    out = subprocess.run([sys.executable, "-m", "harness.cli", "run", str(STUDIES / "cifar10.yaml"),
                          "--dry-run", "--results", str(tmp_path / "r")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "150 cells would run" in out.stdout and "data.path" in out.stdout
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("name", ["quick", "paper-digits"])
def test_committed_results_keep_their_cell_ids(name):
    """Settings added since the results were stored (execution-only ones, teacher.precision at
    fp32) must not orphan them: the study's ids today are exactly the pinned current ones."""
    from harness.data import from_config
    from harness.pin import compute_ids, read_pin

    study = load_study(str(STUDIES / f"{name}.yaml"))
    fingerprint = from_config(study.cells[0].config["data"]).fingerprint
    pinned = read_pin(str(STUDIES.parent / "results" / name))
    assert [cid for cid, *_ in compute_ids(study, fingerprint)] == pinned["current"]
