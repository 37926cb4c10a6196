"""The study page (``harness report``), the notebook API (``analysis.open_study``) and the
per-seed figures, on the small synthetic store ``tests/fixtures/results_small`` (see
test_analysis.py for how it is made) and the committed c3-digits results.

The browser test of the page is tests/test_report_browser.py (slow tier, headless Chromium).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from harness.store.results import load_rows, write_rows

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FIXTURE = os.path.join(HERE, "fixtures", "results_small")
GOLDEN = os.path.join(HERE, "fixtures", "golden")
EXCLUDED = {"c-sid-teacher-s2": "failed", "c-ratio_js-random-s2": "diverged",
            "c-di-random-s3": "unfinished", "c-di-teacher-s7": "orphaned"}


def _copy(tmp_path, src=FIXTURE) -> str:
    dst = str(tmp_path / "results")
    shutil.copytree(src, dst)
    return dst


def _tree(root: str) -> dict:
    out = {}
    for d, _, fs in os.walk(root):
        for f in fs:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


# ------------------------------------------------------------------------------ notebook API
def test_open_study_frames_follow_the_figures_rules():
    import analysis
    from analysis.data import load_study

    s = analysis.open_study(FIXTURE)
    study = load_study(FIXTURE)
    assert s.metric == "fd_digits_1k" and not s.higher_better
    # final / scores: exactly the figures' included cells and values
    pd.testing.assert_series_equal(s.final["value"], study.final["value"], check_names=False)
    assert list(s.final["cell"]) == list(study.final["cell"])
    assert set(s.scores["cell"]) == set(study.final["cell"])
    # every cell listed, the excluded ones with the figures' reason
    assert set(s.cells["cell"]) == set(study.cells["cell"])
    assert dict(zip(s.excluded["cell"], s.excluded["reason"])) == EXCLUDED
    inc = s.cells.set_index("cell").loc[list(study.final["cell"])]
    np.testing.assert_array_equal(inc["final"].to_numpy(), study.final["value"].to_numpy())
    # typed: names as strings, seed as nullable int, numbers as float64
    assert str(s.cells["loss"].dtype) == "string" and str(s.cells["seed"].dtype) == "Int64"
    assert s.final["value"].dtype == np.float64 and s.cells["wall_s"].dtype == np.float64
    assert len(s.rows) == len(load_rows(FIXTURE))
    assert s.data_floor == study.ref(study.floor_name())
    assert s.pin["current"] and "c-di-teacher-s7" not in s.pin["current"]


def test_claims_objects_carry_the_claims_md_numbers():
    import analysis

    s = analysis.open_study(FIXTURE)
    gold = pd.read_csv(os.path.join(GOLDEN, "claims.data.csv")).set_index("claim")
    assert [c.name for c in s.claims] == list(gold.index)
    for c in s.claims:
        g = gold.loc[c.name]
        for mine, theirs in ((c.effect, g.effect), (c.lo, g.ci_low), (c.hi, g.ci_high)):
            if np.isnan(theirs):
                assert np.isnan(mine), c.name
            else:
                assert float(f"{mine:.6g}") == theirs, c.name
        assert c.verdict == g.verdict and c.kimg is None and c.method
    t = s.claims_table
    assert list(t["name"]) == list(gold.index) and "details" not in t.columns


def test_open_study_refuses_an_empty_root(tmp_path):
    import analysis
    from harness.declare.config import ConfigError

    with pytest.raises(ConfigError, match="no result rows"):
        analysis.open_study(str(tmp_path))


def test_import_harness_is_light_and_open_study_is_the_notebook_api():
    """``import harness`` loads no torch, Ray or pandas; ``harness.open_study`` is imported on
    first use and is the notebook API itself; an unknown attribute is still an AttributeError."""
    code = ("import sys, harness\n"
            "heavy = lambda: sorted({m.split('.')[0] for m in sys.modules} & "
            "{'torch', 'ray', 'pandas', 'matplotlib'})\n"
            "print(heavy())\n"
            "import analysis.notebook\n"
            "print(harness.open_study is analysis.notebook.open_study, "
            "'open_study' in dir(harness))\n"
            "print(heavy())\n"
            "try:\n    harness.no_such_thing\nexcept AttributeError as e:\n    print('AE', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "[]"
    assert lines[1] == "True True"
    assert lines[2] == "['matplotlib', 'pandas']"  # the notebook API's own needs, still no torch
    assert lines[3].startswith("AE") and "no_such_thing" in lines[3]


def test_every_analysis_module_imports_without_torch_or_ray():
    """Each module of analysis/ on its own, in a fresh interpreter: neither torch nor Ray loads."""
    names = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "analysis"))
                   if f.endswith(".py") and f != "__init__.py")
    assert len(names) > 10
    code = ("import importlib, sys\n"
            f"for n in {names!r}:\n"
            "    importlib.import_module('analysis.' + n)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ROOT}, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_readme_example_runs():
    """The README's notebook example, verbatim, from the repository root."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    block = re.search(r"<!-- notebook-example -->\s*```python\n(.*?)```", text, re.S)
    assert block, "README lost its notebook example"
    out = subprocess.run([sys.executable, "-c", block.group(1)], cwd=ROOT, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "C2" in out.stdout and "holds" in out.stdout


def test_open_study_and_report_import_no_torch_and_no_ray(tmp_path):
    root = _copy(tmp_path)
    code = ("import sys, analysis\n"
            "from analysis.figures import make_all\n"
            "from analysis.report import write_report\n"
            f"s = analysis.open_study({root!r}); s.claims\n"
            f"make_all({root!r}, only='heatmap')\n"
            f"write_report({root!r}, regenerate=False)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ROOT}, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


# ------------------------------------------------------------------------------- the page
@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """The fixture's page, with one extra failed cell whose message is hostile HTML."""
    from analysis.figures import make_all
    from analysis.report import write_report

    root = _copy(tmp_path_factory.mktemp("page"))
    base = load_rows(FIXTURE)
    row = {k: (None if pd.isna(v) else v)
           for k, v in base[base["cell"] == "c-sid-teacher-s2"].iloc[-1].to_dict().items()}
    row.update(cell="c-hostile", seed=9, status="failed", message='<img src=x onerror="boom">',
               kimg=4.0)
    write_rows(root, [row])
    pin = json.load(open(os.path.join(root, "pin.json")))
    pin["current"].append("c-hostile")
    pin["versions"] = {"python": "3.11.2", "torch": "2.14.1"}
    with open(os.path.join(root, "pin.json"), "w") as f:
        json.dump(pin, f)
    make_all(root, only="heatmap")
    make_all(root, only="forest")
    path = write_report(root, study_text="study: small\n# <b>not bold</b>\n",
                        study_path="studies/small.yaml", regenerate=False)
    with open(path, encoding="utf-8") as f:
        return root, path, f.read()


def test_page_is_self_contained(page):
    root, path, html = page
    assert path == os.path.join(root, "report.html")
    # images inlined, one per PNG in figures/, and nothing fetched from anywhere
    pngs = sorted(f for f in os.listdir(os.path.join(root, "figures")) if f.endswith(".png"))
    assert pngs == ["forest.png", "heatmap.png"]
    assert html.count('src="data:image/png;base64,') == len(pngs)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", html)
    assert "default-src 'none'" in html  # the browser refuses any request the page might make
    assert "<script>" in html and "</script>" in html


def test_page_lists_every_cell_claim_and_version(page):
    import analysis

    root, _, html = page
    s = analysis.open_study(root)
    cells = re.search(r'<table id="cell-table".*?</table>', html, re.S).group(0)
    assert cells.count("<tr>") == len(s.cells) + 1  # header row + one per cell
    for c in s.cells["cell"]:
        assert f"<td>{c}</td>" in cells
    for c in s.claims:
        assert f"<b>{c.name}</b>" in html
    assert "3.11.2" in html and "2.14.1" in html  # pin.json's versions, when recorded
    assert "studies/small.yaml" in html and "Data floor" in html
    for caption in ("heatmap.", "forest."):
        assert f"<b>{caption}</b>" in html


def test_page_escapes_what_it_shows(page):
    _, _, html = page
    assert '<img src=x onerror="boom">' not in html
    assert "&lt;img src=x onerror=&quot;boom&quot;&gt;" in html
    assert "<b>not bold</b>" not in html and "&lt;b&gt;not bold&lt;/b&gt;" in html


def test_report_cli_refuses_bad_input_and_leaves_results_alone(tmp_path, capsys):
    from harness.cli import main

    root = _copy(tmp_path)
    before = _tree(root)
    assert main(["report", str(tmp_path / "missing.yaml"), "--results", root]) == 2
    study = tmp_path / "small.yaml"
    study.write_text("study: small\ndata: {name: digits}\ngrid: {loss: [sid], init: [teacher]}\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(study), "--results", str(empty)]) == 2
    err = capsys.readouterr().err
    assert "no result rows" in err and "harness run" in err
    assert main(["report", str(study), "--results", root, "--metric", "nope"]) == 2
    assert _tree(root) == before


# --------------------------------------------------------------------- figures show seeds
@pytest.fixture(scope="module")
def seed_figures(tmp_path_factory):
    from analysis.figures import make_all

    out = str(tmp_path_factory.mktemp("seedfigs"))
    for name in ("heatmap", "curves", "transplant", "samples", "table", "forest", "kimg0"):
        make_all(FIXTURE, out, only=name)
    return out


def test_heatmap_and_table_carry_every_seed(seed_figures):
    from analysis.data import load_study

    study = load_study(FIXTURE)
    heat = pd.read_csv(os.path.join(seed_figures, "heatmap.data.csv"))
    for r in heat.itertuples(index=False):
        g = study.final[(study.final["loss"] == r.loss) & (study.final["init"] == r.init)]
        g = g.sort_values("seed")
        assert [float(v) for v in r.values.split(";")] == pytest.approx(list(g["value"]),
                                                                          rel=1e-5)
        assert r.median == pytest.approx(float(np.median(g["value"])), rel=1e-5)


def test_table_gives_median_and_seeds_for_wide_groups(tmp_path):
    """c3-digits (committed) has bimodal groups: sid from σ_feat 0.02 features succeeds with
    one seed of three."""
    from analysis.figures import make_all
    from analysis.style import fmt_num

    make_all(os.path.join(ROOT, "results", "c3-digits"), str(tmp_path), only="table")
    md = open(os.path.join(tmp_path, "table.md"), encoding="utf-8").read()
    table = pd.read_csv(os.path.join(tmp_path, "table.data.csv"))
    assert table["wide"].any() and not table["wide"].all()
    for r in table.itertuples(index=False):  # a wide group: its median and every seed
        seeds = " / ".join(fmt_num(float(v)) for v in r.values.split(";"))
        assert (f"median {fmt_num(r.median)} [{seeds}]" in md) == bool(r.wide), (r.loss, r.init)


def test_wide_groups_are_flagged():
    from analysis.seeds import seed_summary, wide

    assert wide([3.27, 95.9, 182.8]) and wide([30.0, 9.14, 111.1])
    assert not wide([3.45, 2.4, 4.2]) and not wide([5.0])
    df = pd.DataFrame({"g": ["a"] * 3, "seed": [2, 0, 1], "value": [182.8, 3.27, 95.9]})
    r = seed_summary(df, ["g"]).iloc[0]
    assert r["seeds"] == "0;1;2" and r["values"] == "3.27;95.9;182.8" and r["median"] == 95.9


def test_samples_show_the_median_seed_with_its_score(seed_figures):
    from analysis.data import load_study

    study = load_study(FIXTURE)
    data = pd.read_csv(os.path.join(seed_figures, "samples.data.csv"))
    for r in data.itertuples(index=False):
        g = study.final[(study.final["loss"] == r.loss) & (study.final["init"] == r.init)]
        v = np.sort(g["value"].to_numpy())
        assert r.score == pytest.approx(v[(len(v) - 1) // 2], rel=1e-5)


def test_forest_matches_claims_and_claims_kimg_skips_kimg0(seed_figures):
    forest = pd.read_csv(os.path.join(seed_figures, "forest.data.csv")).set_index("name")
    gold = pd.read_csv(os.path.join(GOLDEN, "claims.data.csv")).set_index("claim")
    assert "C3" not in forest.index
    for name, r in forest.iterrows():
        assert (r.effect, r.verdict) == (gold.loc[name, "effect"], gold.loc[name, "verdict"]) \
            or (np.isnan(r.effect) and np.isnan(gold.loc[name, "effect"]))
    kimg = pd.read_csv(os.path.join(GOLDEN, "claims_kimg.data.csv"))
    assert (kimg["kimg"] > 0).all()
    k0 = pd.read_csv(os.path.join(seed_figures, "kimg0.data.csv"))
    assert (k0["kimg0"] > 0).all() and len(k0) == len(k0.drop_duplicates(["loss", "init",
                                                                          "seed"]))


def test_figures_fit_a_page_width(seed_figures):
    """Readable at print size: at 150 dpi these figures fit a two-column page (7 in) for the
    fixture's 12 inits x 4 losses, and the heatmap's inits run down the page."""
    from PIL import Image

    for name in ("heatmap", "transplant", "forest", "curves", "kimg0"):
        w, h = Image.open(os.path.join(seed_figures, f"{name}.png")).size
        assert w <= 7.2 * 150, (name, w)
    w, h = Image.open(os.path.join(seed_figures, "heatmap.png")).size
    assert h > w  # 12 inits x 3 losses: rows are inits
