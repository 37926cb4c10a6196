"""Golden tests for analysis/ (figures, tables, claims) on a small synthetic results store.

How the inputs are made:

- Fixture: ``tests/fixtures/results_small/`` is written by
  ``python tests/fixtures/make_results_fixture.py`` (deterministic: fixed file names and fixed
  ``written_at``; see that script's docstring for what it contains). ``test_fixture_reproducible``
  checks the committed store still matches the script.
- Goldens: ``tests/fixtures/golden/`` holds every ``*.data.csv`` plus ``table.md``, ``table.tex``,
  ``claims.md`` and ``claims.tex`` written by ``make_all(fixture, seed=0)``. After an intended
  change, regenerate them with

      UPDATE_GOLDEN=1 python -m pytest tests/test_analysis.py -q

  and review the diff before committing.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest

from harness.results import cell_status, load_rows, write_rows

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "fixtures", "results_small")
GOLDEN = os.path.join(HERE, "fixtures", "golden")
ROOT = os.path.dirname(HERE)
FIGURES = ("heatmap", "curves", "reset", "transplant", "samples")
EXCLUDED = {"c-sid-teacher-s2": "failed", "c-ratio_js-random-s2": "diverged",
            "c-di-random-s3": "unfinished", "c-di-teacher-s7": "orphaned"}


def _read(*parts) -> str:
    with open(os.path.join(*parts)) as f:
        return f.read()


def _golden_names(out_dir: str) -> list[str]:
    return sorted(f for f in os.listdir(out_dir)
                  if f.endswith(".data.csv") or f in ("table.md", "table.tex", "claims.md",
                                                      "claims.tex"))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    from analysis.figures import make_all

    out = str(tmp_path_factory.mktemp("figures"))
    paths = make_all(FIXTURE, out, seed=0)
    return out, paths


def test_golden(full_run):
    out, paths = full_run
    names = _golden_names(out)
    if os.environ.get("UPDATE_GOLDEN") == "1":
        shutil.rmtree(GOLDEN, ignore_errors=True)
        os.makedirs(GOLDEN)
        for n in names:
            shutil.copy(os.path.join(out, n), os.path.join(GOLDEN, n))
    assert names == sorted(os.listdir(GOLDEN)), "set of outputs changed (UPDATE_GOLDEN=1?)"
    for n in names:
        assert _read(out, n) == _read(GOLDEN, n), f"{n} differs from golden (UPDATE_GOLDEN=1?)"


def test_every_figure_written(full_run):
    out, paths = full_run
    for name in FIGURES:
        for ext in ("png", "pdf", "data.csv"):
            p = os.path.join(out, f"{name}.{ext}")
            assert p in paths and os.path.getsize(p) > 0
    for name in ("table.md", "table.tex", "claims.md", "claims.tex"):
        assert os.path.join(out, name) in paths


def test_excluded_cells_in_footers(full_run):
    out, _ = full_run
    for doc in ("table.md", "claims.md"):
        text = _read(out, doc)
        for cell, reason in EXCLUDED.items():
            line = next((ln for ln in text.splitlines() if f"| {cell} |" in ln), None)
            assert line is not None and f"| {reason} |" in line, (doc, cell)
    assert "c-sid-teacher-s2" in _read(out, "table.tex").replace("\\_", "_")
    # excluded cells never enter the figure data
    for name in FIGURES:
        data = _read(out, f"{name}.data.csv")
        assert not any(c in data for c in EXCLUDED)


def test_study_note_and_status():
    from analysis.data import load_study

    study = load_study(FIXTURE)
    assert study.metric == "fd_digits_1k"
    assert dict(zip(study.excluded.cell, study.excluded.reason)) == EXCLUDED
    note = study.note()
    for reason in EXCLUDED.values():
        assert f"1 {reason}" in note
    # the fast status path agrees with harness.results.cell_status on the full rows
    full = cell_status(load_rows(FIXTURE))
    assert dict(zip(study.cells.cell, study.cells.status)) == full
    # the orphan's value (5.0) would otherwise be di/teacher's best
    assert study.final["value"].min() > 10


def test_only_heatmap(tmp_path):
    from analysis.figures import make_all

    paths = make_all(FIXTURE, str(tmp_path), only="heatmap")
    expected = {"heatmap.png", "heatmap.pdf", "heatmap.data.csv"}
    assert {os.path.basename(p) for p in paths} == expected
    assert set(os.listdir(tmp_path)) == expected


def test_unknown_only_and_metric(tmp_path):
    from analysis.figures import OUTPUTS, make_all

    with pytest.raises(ValueError) as e:
        make_all(FIXTURE, str(tmp_path), only="histogram")
    for name in OUTPUTS:
        assert name in str(e.value)
    with pytest.raises(ValueError, match="fd_digits_1k"):
        make_all(FIXTURE, str(tmp_path), metric="fid_inception_50k")
    assert os.listdir(tmp_path) == []


def test_no_torch_or_ray_import():
    code = ("import analysis.figures, analysis.claims, analysis.tables, sys; "
            "assert 'torch' not in sys.modules and 'ray' not in sys.modules, "
            "[m for m in sys.modules if m.split('.')[0] in ('torch', 'ray')]")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_missing_inputs_are_skipped(tmp_path):
    """No feature_transplant / reset cells: those figures are skipped, claims say not tested."""
    from analysis.figures import make_all

    rows = load_rows(FIXTURE)
    keep = ~rows["init"].astype(str).str.startswith(("feature_transplant", "reset_layers"))
    root = str(tmp_path / "store")
    write_rows(root, [{k: (None if pd.isna(v) else v) for k, v in r.items()}
                      for r in rows[keep].to_dict("records")])
    with open(os.path.join(root, "pin.json"), "w") as f:
        f.write(_read(FIXTURE, "pin.json"))
    out = str(tmp_path / "out")
    assert make_all(root, out, only="transplant") == []
    assert make_all(root, out, only="reset") == []
    make_all(root, out, only="claims")
    claims = pd.read_csv(os.path.join(out, "claims.data.csv")).set_index("claim")
    for c in ("C3", "C3a", "C3b", "C3c"):
        assert claims.loc[c, "verdict"] == "not tested by this study"
    assert claims.loc["C2", "verdict"] == "holds"
    assert make_all(root, out, only="samples") == []  # no samples in this store


def test_claims_deterministic_and_seeded(tmp_path):
    from analysis.figures import make_all

    a, b, c = (str(tmp_path / x) for x in "abc")
    make_all(FIXTURE, a, only="claims", seed=0)
    make_all(FIXTURE, b, only="claims", seed=0)
    make_all(FIXTURE, c, only="claims", seed=1)
    read = lambda d: _read(d, "claims.md")  # noqa: E731
    assert read(a) == read(b) == read(GOLDEN)
    assert read(a) != read(c)


def test_extra_axes_become_loss_labels():
    from analysis.data import extra_axis_labels

    cells = pd.DataFrame({
        "loss": ["sid", "sid", "di"],
        "axes": [json.dumps({"loss": "sid", "seed": 0, "student.lr": 1e-4, "eval.n": 1000}),
                 json.dumps({"loss": "sid", "seed": 1, "student.lr": 1e-3, "eval.n": 1000}),
                 None]})
    assert list(extra_axis_labels(cells)) == ["sid (student.lr=0.0001)", "sid (student.lr=0.001)",
                                              "di"]


def test_fixture_reproducible(tmp_path):
    script = os.path.join(HERE, "fixtures", "make_results_fixture.py")
    subprocess.run([sys.executable, script, str(tmp_path / "fx")], check=True, cwd=ROOT,
                   capture_output=True)
    a = load_rows(FIXTURE).sort_values(["cell", "kimg", "metric"]).reset_index(drop=True)
    b = load_rows(str(tmp_path / "fx")).sort_values(["cell", "kimg", "metric"]).reset_index(
        drop=True)
    pd.testing.assert_frame_equal(a, b)
    assert _read(FIXTURE, "pin.json") == _read(str(tmp_path), "fx", "pin.json")


def test_claim_rules_change_with_the_numbers():
    """Verdicts follow the numbers: worse ratio losses break C1, one seed is inconclusive."""
    import numpy as np

    from analysis.claims import decide, judge
    from analysis.data import load_study

    assert decide(-0.1, 0.05, 0.10, "below", 3) == "holds"
    assert decide(0.2, 0.3, 0.10, "below", 3) == "does not hold"
    assert decide(0.0, 0.3, 0.10, "below", 3) == "inconclusive (3 seeds)"
    assert decide(0.3, 0.4, 0.25, "above", 3) == "holds"
    assert decide(0.1, 0.2, 0.25, "above", 3) == "does not hold"
    assert decide(float("nan"), float("nan"), 0.25, "above", 1) == "inconclusive (1 seed)"

    study = load_study(FIXTURE)
    f = study.final
    ratio = f["loss"].str.startswith("ratio_")
    study.final = f.assign(value=np.where(ratio, f["value"] * 1.5, f["value"]))
    v = {x.claim: x for x in judge(study, np.random.default_rng(0))}
    assert v["C1"].verdict == "does not hold" and v["C1"].effect > 0.4
    # transplant as good as teacher everywhere: no spread over sigma_feat
    ft = study.final["init"].str.startswith("feature_transplant")
    teach = study.final[study.final["init"] == "teacher"].set_index(["loss", "seed"])["value"]
    key = pd.MultiIndex.from_frame(study.final[["loss", "seed"]])
    study.final = study.final.assign(value=np.where(ft, teach.reindex(key).to_numpy(),
                                                    study.final["value"]))
    v = {x.claim: x for x in judge(study, np.random.default_rng(0))}
    assert v["C3c"].verdict == "does not hold" and v["C3"].verdict == "does not hold"
    study.final = study.final[study.final["seed"] == 0]
    v = {x.claim: x for x in judge(study, np.random.default_rng(0))}
    assert v["C2"].verdict == "inconclusive (1 seed)"


def test_toy2d_store(tmp_path):
    """A toy2d store (mmd metric, (N, 2) float32 samples, no pin.json) goes through end to end."""
    import numpy as np

    from analysis.figures import make_all
    from harness.results import write_samples

    root = str(tmp_path / "toy")
    rows = []
    for loss in ("sid", "ratio_kl"):
        for init in ("teacher", "random"):
            for seed in (0, 1, 2):
                cell = f"{loss}-{init}-{seed}"
                for kimg in (0.0, 5.0):
                    rows.append({"cell": cell, "loss": loss, "init": init, "init_scheme": init,
                                 "seed": seed, "kimg": kimg, "metric": "mmd_toy2d_1k",
                                 "value": (0.5 if kimg == 0 else 0.05) * (3 if init == "random"
                                                                         else 1) + 0.01 * seed,
                                 "status": "done" if kimg else "running",
                                 "axes": json.dumps({"loss": loss, "init": init, "seed": seed})})
                rng = np.random.default_rng(seed)
                write_samples(root, {"cell": cell, "loss": loss, "init": init, "seed": seed,
                                     "kimg": 5.0}, rng.normal(size=(128, 2)).astype(np.float32))
    write_rows(root, rows)
    out = str(tmp_path / "out")
    paths = make_all(root, out)
    names = {os.path.basename(p) for p in paths}
    assert {"samples.png", "curves.png", "heatmap.png", "claims.md"} <= names
    assert "reset.png" not in names and "transplant.png" not in names
    claims = pd.read_csv(os.path.join(out, "claims.data.csv")).set_index("claim")
    assert claims.loc["C2", "verdict"] == "holds"
    assert "mmd_toy2d_1k" in _read(out, "table.md")
