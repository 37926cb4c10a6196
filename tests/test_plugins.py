"""Extension points: a loss family, an init scheme and a figure, each one file under
``tests/plugins/`` that no project file names, selected from a study file by name, trained a
few steps through ``harness run`` (Ray workers import them too) and drawn by ``harness figures``.
The modules reach the harness as a user's would: ``HARNESS_PLUGINS`` and ``PYTHONPATH``."""
from __future__ import annotations

import os
import pathlib

import pandas as pd

from test_cli import cache, cli, tree_hash  # noqa: F401 (cache: the toy teacher fixture)

PLUGINS = pathlib.Path(__file__).parent / "plugins"
STUDY = """\
study: plug
data: {name: toy2d}
teacher: {kimg: 4}
student: {kimg: 1, batch: 64}
eval: {n: 200, every_kimg: 0.5}
grid:
  loss: [sid, {teacher_l2: {weight: WEIGHT}}]
  init: [teacher, {shrunk_teacher: {factor: 0.25}}]
"""


def _env(cache, plugins="plugin_loss,plugin_init,plugin_figure"):
    path = os.pathsep.join(p for p in (str(PLUGINS), os.environ.get("PYTHONPATH")) if p)
    return {"HARNESS_CACHE": str(cache), "RAY_ADDRESS": "", "HARNESS_PLUGINS": plugins,
            "PYTHONPATH": path}


def test_plugin_loss_init_and_figure_run_end_to_end(tmp_path, cache):
    study = tmp_path / "plug.yaml"
    study.write_text(STUDY.replace("WEIGHT", "2.0"))
    root = tmp_path / "results"
    code, out, err = cli("run", study, "--results", root, cwd=tmp_path, env=_env(cache),
                         timeout=600)
    assert code == 0, err
    rows = pd.read_parquet(root / "rows")
    cells = rows[rows["status"] != "reference"].drop_duplicates("cell")
    assert sorted(cells["loss"].unique()) == ["sid", "teacher_l2[weight=2]"]
    assert sorted(cells["init"].unique()) == ["shrunk_teacher[factor=0.25]", "teacher"]
    assert set(cells["loss_family"]) == {"sid", "teacher_l2"}
    assert set(cells["init_scheme"]) == {"teacher", "shrunk_teacher"}
    last = rows[rows["status"] != "reference"].sort_values("kimg").drop_duplicates("cell",
                                                                                 keep="last")
    assert len(last) == 4 and (last["status"] == "done").all() and (last["kimg"] >= 1.0).all()

    code, out, err = cli("figures", study, "--results", root, "--only", "final_by_seed",
                         cwd=tmp_path, env=_env(cache), timeout=300)
    assert code == 0, err
    png = root / "figures" / "final_by_seed.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000

    # without the plug-ins the study's names are unknown: exit 2 naming the fix, nothing written
    before = tree_hash(root)
    code, out, err = cli("status", study, "--results", root, cwd=tmp_path,
                         env={**_env(cache), "HARNESS_PLUGINS": ""})
    assert code == 2 and "unknown loss 'teacher_l2'" in err and "HARNESS_PLUGINS" in err, err
    assert tree_hash(root) == before


def test_plugin_parameters_are_checked_like_built_in_ones(tmp_path, cache):
    study = tmp_path / "plug.yaml"
    study.write_text(STUDY.replace("WEIGHT", "-1"))
    code, out, err = cli("run", study, "--dry-run", cwd=tmp_path, env=_env(cache))
    assert code == 2, err
    assert "grid.loss[1].teacher_l2.weight: must be in (0, 10], got -1" in err, err


def test_a_plugin_that_cannot_be_imported_is_refused(tmp_path, cache):
    study = tmp_path / "plug.yaml"
    study.write_text(STUDY.replace("WEIGHT", "2.0"))
    for value, words in (("no_such_plugin_module", "cannot import plug-in 'no_such_plugin_module'"),
                         ("os; rm -rf", "is not a module name")):
        code, out, err = cli("status", study, cwd=tmp_path, env=_env(cache, value))
        assert code == 2 and words in err and "Traceback" not in err, err
