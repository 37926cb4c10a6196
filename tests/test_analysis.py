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
import time

import pandas as pd
import pytest

from harness.store.results import cell_status, load_rows, write_rows

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "fixtures", "results_small")
GOLDEN = os.path.join(HERE, "fixtures", "golden")
ROOT = os.path.dirname(HERE)
FIGURES = ("heatmap", "curves", "reset", "transplant", "mapping", "samples", "claims_kimg")
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


def test_figures_fit_a_two_column_page(full_run):
    """Every PNG is at most 7 in wide at its 150 dpi (a two-column page width: nothing is shrunk
    below readable type when placed), and the single-panel ones fit 5 in."""
    from PIL import Image

    out, paths = full_run
    widths = {}
    for p in paths:
        if p.endswith(".png"):
            with Image.open(p) as im:
                widths[os.path.basename(p)[:-4]] = im.size[0] / 150
    assert set(FIGURES) <= set(widths)
    assert max(widths.values()) <= 7.0, widths
    for name in ("forest", "transplant", "kimg0"):
        assert widths[name] <= 5.0, (name, widths[name])


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
    # the fast status path agrees with harness.store.results.cell_status on the full rows
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
    from analysis.figures import make_all, outputs
    from harness.cli import main

    with pytest.raises(ValueError) as e:
        make_all(FIXTURE, str(tmp_path), only="histogram")
    for name in outputs():
        assert name in str(e.value)
    # the CLI reports it in one line with exit code 2 (a ConfigError), not a traceback
    study = os.path.join(ROOT, "studies", "quick.yaml")
    assert main(["figures", study, "--results", FIXTURE, "--only", "histogram"]) == 2
    with pytest.raises(ValueError, match="fd_digits_1k"):
        make_all(FIXTURE, str(tmp_path), metric="fid_inception_50k")
    assert os.listdir(tmp_path) == []


def test_no_torch_or_ray_import(tmp_path):
    code = ("import analysis.figures, analysis.claims, analysis.tables, sys; "
            "assert 'torch' not in sys.modules and 'ray' not in sys.modules, "
            "[m for m in sys.modules if m.split('.')[0] in ('torch', 'ray')]")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    # nor does the CLI on its way to `harness figures` (its parser names every command)
    root = shutil.copytree(FIXTURE, tmp_path / "r")
    code = ("import sys; from harness import cli; "
            f"assert cli.main(['figures', 'studies/quick.yaml', '--results', {str(root)!r}, "
            "'--only', 'table']) == 0; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'ray')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    assert (root / "figures" / "table.md").exists()


def test_figures_and_report_read_only_this_studys_results(tmp_path, capsys, monkeypatch):
    """figures and report refuse (exit 2, nothing written) a results root that another study
    pinned, one that does not exist, one that is a file, an address pyarrow cannot open and one
    it cannot reach."""
    from harness.cli import main

    other = shutil.copytree(os.path.join(ROOT, "results", "c1-digits"), tmp_path / "c1",
                            ignore=shutil.ignore_patterns("figures", "report.html"))
    quick = os.path.join(ROOT, "studies", "quick.yaml")
    before = sorted(p.relative_to(other) for p in other.rglob("*"))
    afile = tmp_path / "a-file"
    afile.write_text("x")
    for command in (["figures"], ["report", "--no-figures"]):
        for root, why in ((other, "belongs to study 'c1-digits', not 'quick'"),
                          (tmp_path / "typo", "there are no results at"),
                          (afile, "exists and is a file"),
                          ("ftp://host/x", "is not an address pyarrow can open")):
            args = [command[0], quick, "--results", str(root), *command[1:]]
            assert main(args) == 2, args
            err = " ".join(capsys.readouterr().err.split())
            assert why in err, (args, err)
    # gs:// without Google credentials: said within the retry limit (minutes before it had one)
    monkeypatch.setattr("harness.store.results.GCS_RETRY_S", 1)
    t0 = time.monotonic()
    assert main(["figures", quick, "--results", "gs://harness-no-such-bucket/r"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "cannot be reached" in err and "gs://" in err and time.monotonic() - t0 < 30, err
    assert main(["status", quick, "--results", str(afile)]) == 2  # status as well
    assert "exists and is a file" in " ".join(capsys.readouterr().err.split())
    assert sorted(p.relative_to(other) for p in other.rglob("*")) == before
    assert not (tmp_path / "typo").exists() and not os.path.exists(os.path.join(ROOT, "figures"))


def test_missing_inputs_are_skipped(tmp_path):
    """Only teacher and random init: reset/transplant/mapping figures are skipped, C3 not tested."""
    from analysis.figures import make_all

    rows = load_rows(FIXTURE)
    plain = rows["init_scheme"].isin(["random"]) | (
        (rows["init_scheme"] == "teacher") & rows["init_source"].isna())
    keep = plain | (rows["status"] == "reference")
    root = str(tmp_path / "store")
    write_rows(root, [{k: (None if pd.isna(v) else v) for k, v in r.items()}
                      for r in rows[keep].to_dict("records")])
    with open(os.path.join(root, "pin.json"), "w") as f:
        f.write(_read(FIXTURE, "pin.json"))
    out = str(tmp_path / "out")
    for name in ("transplant", "reset", "mapping"):
        assert make_all(root, out, only=name) == []
    make_all(root, out, only="claims")
    claims = pd.read_csv(os.path.join(out, "claims.data.csv")).set_index("claim")
    for c in ("C3", "C3a", "C3b", "C3c", "C3d", "C3e"):
        assert claims.loc[c, "verdict"] == "not tested by this study"
    assert claims.loc["C2", "verdict"] == "holds"
    assert make_all(root, out, only="samples") == []  # no samples in this store


def test_claims_have_no_monte_carlo_error(tmp_path):
    """The claims' intervals are analytic: another figures seed (which seeds every bootstrap
    the figures draw) cannot change a number or a verdict."""
    from analysis.figures import make_all

    a, b, c = (str(tmp_path / x) for x in "abc")
    make_all(FIXTURE, a, only="claims", seed=0)
    make_all(FIXTURE, b, only="claims", seed=0)
    make_all(FIXTURE, c, only="claims", seed=1)
    read = lambda d: _read(d, "claims.md")  # noqa: E731
    assert read(a) == read(b) == read(c) == read(GOLDEN)


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

    from analysis.claims import claim_results
    from analysis.data import load_study

    study = load_study(FIXTURE)
    f = study.final
    ratio = (f["loss_family"] == "ratio").to_numpy()
    study.final = f.assign(value=np.where(ratio, f["value"] * 1.5, f["value"]))
    v = {x.claim: x for x in claim_results(study)}
    assert v["C1"].verdict == "does not hold" and v["C1"].effect > 0.4
    # best vs best over 2 x 2 pairs at 2 seeds: each pair's interval at error rate 0.05 / 4 on
    # one degree of freedom leaves the denominator undecided, so the claim honestly stays open
    assert v["C1-best"].effect > 0.4 and v["C1-best"].verdict == "inconclusive (2 seeds)"
    # transplant (all weights kept) as good as teacher everywhere: no spread over sigma_feat
    ft = ((study.final["init_scheme"] == "feature_transplant")
          & (study.final["reset_output"] == False)).to_numpy()  # noqa: E712
    teach = study.final[study.final["init"] == "teacher"].set_index(["loss", "seed"])["value"]
    key = pd.MultiIndex.from_frame(study.final[["loss", "seed"]])
    study.final = study.final.assign(value=np.where(ft, teach.reindex(key).to_numpy(),
                                                    study.final["value"]))
    v = {x.claim: x for x in claim_results(study)}
    assert v["C3c"].verdict == "does not hold" and v["C3"].verdict == "does not hold"
    study.final = study.final[study.final["seed"] == 0]
    v = {x.claim: x for x in claim_results(study)}
    assert v["C2"].verdict == "inconclusive (1 seed)"
    assert v["C2"].seeds_needed is None and "no spread" in v["C2"].seeds_note


def test_toy2d_store(tmp_path):
    """A toy2d store (mmd metric, (N, 2) float32 samples, no pin.json) goes through end to end."""
    import numpy as np

    from analysis.figures import make_all
    from harness.store.results import write_samples

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


# ----------------------------------------------------------------------- claims: properties
def _study():
    from analysis.data import load_study

    return load_study(FIXTURE)


def test_fixed_pair_interval_is_the_pairs_own():
    """C1's interval is the Fieller interval of exactly the declared pair, paired by seed, and
    nothing about the other losses moves it (while the best-vs-best variant does move)."""
    import dataclasses

    import numpy as np

    from analysis.claims import claim_results
    from analysis.stats import fieller
    from harness.declare.claims_spec import ClaimsSpec

    study = _study()
    c1 = {x.claim: x for x in claim_results(study)}["C1"]
    assert ClaimsSpec().pair == ("ratio_js", "sid") and "ratio_js vs sid" in c1.comparison
    t = study.final[study.final["init"] == "teacher"].pivot(index="seed", columns="loss",
                                                             values="value").dropna()
    a, b = t["ratio_js"].to_numpy(), t["sid"].to_numpy()
    e, lo, hi = fieller(a - b, b, 0.05)
    assert (c1.effect, c1.ci_low, c1.ci_high) == pytest.approx((e, lo, hi))
    assert c1.effect == pytest.approx((a.mean() - b.mean()) / b.mean())
    assert c1.seeds == tuple(int(s) for s in t.index) and c1.round == 1 and c1.rounds == 1
    # make ratio_kl far better and di far worse: the fixed pair does not move, best-vs-best does
    f = study.final
    scale = np.select([(f["loss"] == "ratio_kl").to_numpy(), (f["loss"] == "di").to_numpy()],
                      [0.5, 3.0], 1.0)
    study.final = f.assign(value=f["value"] * scale)
    w = {x.claim: x for x in claim_results(study)}
    assert (w["C1"].effect, w["C1"].ci_low, w["C1"].ci_high) == (c1.effect, c1.ci_low,
                                                                  c1.ci_high)
    assert "ratio_kl" in w["C1-best"].comparison and w["C1-best"].effect < -0.4
    # a declared pair the study lacks: not tested, with the reason
    spec = dataclasses.replace(ClaimsSpec(), pair=("ratio_rkl", "sid"))
    x = {v.claim: v for v in claim_results(study, spec)}
    assert x["C1"].verdict == "not tested by this study"
    assert any("ratio_rkl" in d for d in x["C1"].details)


def test_seeds_needed_on_an_inconclusive_claim():
    """Spread ratio_js's seeds until C1 is inconclusive: the claim says how many seeds per
    group would decide it (analysis.stats.seeds_to_decide, tested in test_claims_stats)."""
    import numpy as np

    from analysis.claims import claim_results

    study = _study()
    f = study.final
    js = ((f["loss"] == "ratio_js") & (f["init"] == "teacher")).to_numpy()
    study.final = f.assign(value=np.where(js, f["value"] * np.where(f["seed"] == 0, 0.8, 1.3),
                                          f["value"]))
    c1 = {v.claim: v for v in claim_results(study)}["C1"]
    assert c1.verdict == "inconclusive (2 seeds)" and c1.seeds_needed > 2
    assert f"about {c1.seeds_needed} seeds per group" in c1.seeds_note


def test_protocol_selection_leaves_other_protocols_out(full_run):
    """One protocol per metric: the newest data floor's (v2); the teacher cells' superseded v1
    rows and the v1 references are left out, and the note says how many."""
    from analysis.protocol import select_protocol

    study = _study()
    assert study.protocol.protocol == "synthetic fixture v2"
    lo = study.protocol.left_out.set_index("protocol")
    assert lo.loc["synthetic fixture v1", "rows"] == 10 and lo.loc["synthetic fixture v1",
                                                                    "refs"] == 2
    assert study.ref("data_floor") == 1.25 and study.ref("teacher_heun35") == 9.5
    assert "left out 10 rows under 1 other protocol" in study.note()
    t = study.final[study.final["init"] == "teacher"]["value"]
    assert t.max() < 25  # the v1 values (3x) never enter
    out, _ = full_run
    for doc in ("table.md", "claims.md"):
        assert "synthetic fixture v1" in _read(out, doc) and "Left out 10 rows" in _read(out, doc)

    def frame(rows):
        return pd.DataFrame(rows, columns=["cell", "init", "status", "protocol", "written_at"])

    t0 = pd.Timestamp("2024-01-01", tz="UTC")
    rows = [("a", "x", "done", "P1", t0), ("b", "x", "done", "P1", t0),
            ("a", "x", "done", "P2", t0 + pd.Timedelta(1, "h"))]
    # no floor row: the protocol most done cells have
    choice, keep = select_protocol(frame(rows), {"a", "b"})
    assert choice.protocol == "P1" and list(keep) == [True, True, False]
    assert "the most common among done cells" in choice.source
    # the newest floor row's protocol, even with fewer cells ...
    rows += [("ref-t-data_floor", "data_floor", "reference", "floor; P1", t0),
             ("ref-t-data_floor", "data_floor", "reference", "floor; P2",
              t0 + pd.Timedelta(2, "h"))]
    choice, keep = select_protocol(frame(rows), {"a", "b"})
    assert choice.protocol == "P2" and list(keep) == [False, False, True, False, True]
    assert int(choice.left_out["rows"].sum()) == 3
    # ... unless no done cell has it: then the newest floor whose protocol the cells have
    rows += [("ref-t2-data_floor", "data_floor", "reference", "floor; P3",
              t0 + pd.Timedelta(3, "h"))]
    choice, _ = select_protocol(frame(rows), {"a", "b"})
    assert choice.protocol == "P2"


def test_verifier_metrics_stay_out(tmp_path):
    """``<metric>@<mode><n>`` rows are verifier scores: never the primary metric."""
    from analysis.data import choose_metric
    from harness.declare.config import ConfigError

    counts = pd.Series({"fd_digits_1k@resample4": 100, "fd_digits_1k": 10, "img_per_s": 5})
    assert choose_metric(counts) == "fd_digits_1k"
    assert choose_metric(pd.Series({"fd_digits_1k@best2": 3})) is None
    with pytest.raises(ConfigError, match="verifier"):
        choose_metric(counts, "fd_digits_1k@resample4")


def test_groups_come_from_columns_not_labels():
    """Renaming every init label to an opaque name changes no claim: selection reads the typed
    columns (init_scheme, reset_groups, reinit, sigma_feat, reset_output, init_source, ...)."""
    import numpy as np

    from analysis.claims import claim_results
    from analysis.data import load_study

    rows = load_rows(FIXTURE)
    cell = rows["status"] != "reference"
    names = {i: f"init{k}" for k, i in enumerate(sorted(rows.loc[cell, "init"].unique()))}
    renamed = rows.assign(init=np.where(cell, rows["init"].map(names), rows["init"]))
    a = load_study(FIXTURE)
    b = load_study(FIXTURE, rows=renamed)
    va = {v.claim: v for v in claim_results(a)}
    vb = {v.claim.replace("init", ""): v for v in claim_results(b)}
    for c in ("C2", "C3a", "C3b", "C3c", "C3d", "C3e"):
        assert va[c].verdict == vb[c].verdict != "not tested by this study", c
        assert va[c].effect == pytest.approx(vb[c].effect), c


def test_floor_caveat_reaches_the_legend_when_the_dataset_is_too_small():
    """eval.n above the training split (c1-digits: 2000 of 1200): the floor is drawn with
    replacement, and the figure legend says so (from the floor row's protocol string)."""
    import pandas as pd

    from analysis.data import floor_caveat

    ref = pd.DataFrame({"init": ["data_floor", "teacher_heun35"], "protocol": [
        "data floor: 2000 real training images (drawn with replacement: the training split has "
        "only 1200, fewer than n) scored exactly as generated samples; torch-fidelity ...",
        "teacher, Heun sampler, 35 evaluations; torch-fidelity ..."]})
    assert "with replacement" in floor_caveat(ref, "data_floor")
    assert floor_caveat(ref, "teacher_heun35") == ""
