"""Seeds on demand end to end (``harness run`` with a ``seeds:`` plan, Ray Tune, toy2d): rounds
add seeds only to the groups of open claims, added cells have the ids hand-listed seeds would
have, a rerun trains nothing, and the plan replayed from any prefix of the stored rows names the
same cells (a driver killed mid-round loses and re-runs nothing). Marked slow.

    python -m pytest -m slow tests/test_rounds.py -q -s
"""
from __future__ import annotations

import pathlib

import pytest

from harness.declare import hashing
from harness.store import results
from harness.orchestrate import rounds
from harness.orchestrate.status import fingerprints
from harness.declare.study import load_study
from harness.orchestrate.sweep import run_study, study_status

pytestmark = pytest.mark.slow

TOY = """\
study: rounds
data: {name: toy2d}
teacher: {kimg: 4}
student: {kimg: 1, batch: 64}
eval: {n: 200, every_kimg: 0.5}
grid:
  loss: [ratio_js, sid]
  init: [teacher, random]
"""


def _ids(study, cells, fp) -> set:
    return {cid for cid, *_ in hashing.compute_ids(rounds.with_cells(study, cells), fp)}


def test_rounds_add_seeds_to_open_claims_only(tmp_path, study_cache, monkeypatch, capsys):
    monkeypatch.setenv("HARNESS_CACHE", study_cache)
    path = pathlib.Path(tmp_path) / "rounds.yaml"
    # C2 (the only claim comparing random-init groups) decides at once at a threshold of -10;
    # C1 and C1-best (teacher-init groups) cannot decide at a 0.1% margin on 2 toy seeds
    path.write_text(TOY + "claims: {thresholds: {C1: 0.001, C1-best: 0.001, C2: -10}}\n"
                          "seeds: {start: 2, step: 1, max: 3}\n")
    root = str(tmp_path / "r")
    assert run_study(str(path), results=root) == 0
    out = capsys.readouterr().out
    study = load_study(str(path))
    fp, _ = fingerprints(study)
    rows = results.load_rows(root)
    is_ref = rows["cell"].str.startswith("ref-")
    stored = set(rows.loc[~is_ref, "cell"])
    # every stored cell has the id the same seed would have listed by hand in grid.seed
    hand = pathlib.Path(tmp_path) / "hand.yaml"
    hand.write_text(TOY.replace("  init: [teacher, random]\n",
                                "  init: [teacher, random]\n  seed: [0, 1, 2]\n"))
    hand_ids = {cid: c for cid, c, *_ in hashing.compute_ids(load_study(str(hand)), fp)}
    assert stored <= set(hand_ids)
    # round 2 ran seed 2 for the teacher-init groups only: those of the open claims
    added = {c for c in stored if hand_ids[c].config["seed"] == 2}
    assert {(hand_ids[c].config["init"]["name"], hand_ids[c].config["loss"]["divergence"]
             if "divergence" in hand_ids[c].config["loss"] else "sid") for c in added} == \
        {("teacher", "js"), ("teacher", "sid")}
    first = {c for c in stored if hand_ids[c].config["seed"] < 2}
    after1 = rounds.plan(study, root, fp, rows[rows["cell"].isin(first) | is_ref])
    assert _ids(study, after1.adds, fp) == added
    assert {v.claim for v in after1.open} >= {"C1"} and "C2" not in {v.claim for v in after1.open}
    assert "round 2: 2 cells added for the open claims" in out
    # replayed from all rows: the cells stored, nothing to add
    now = rounds.plan(study, root, fp)
    assert not now.adds and _ids(study, now.cells, fp) == stored
    # a driver killed mid-round 2 (one added cell stored): the same cells, none lost or new
    one = sorted(added)[0]
    mid = rounds.plan(study, root, fp, rows[rows["cell"].isin(first | {one}) | is_ref])
    assert _ids(study, mid.cells, fp) == stored and _ids(study, mid.adds, fp) == added - {one}
    words = rounds.describe_round(mid)  # what `harness status` shows mid-round
    assert "C1 (open after round 1 of 2): round 2 runs 3 seeds per group (0-2)" in words[0]
    assert "round 2 is under way: 1 of its 2 new cells have no result yet" in words[1]
    words = rounds.describe_round(after1)  # after round 1, before round 2 starts
    assert "round 2 adds 2 cells" in words[1]
    assert "claims: none open" in study_status(str(path), root)
    # a rerun trains nothing
    assert run_study(str(path), results=root) == 0
    assert "all 10 cells done" in capsys.readouterr().out
