"""The claims engine on the small fixture store: one declaration with study overrides, claims
within each level of other grid axes (never averaged across them unless pooled), no verdict at
kimg 0, and the round-by-round replay that seeds on demand runs on (``harness.orchestrate.rounds``)."""
from __future__ import annotations

import dataclasses
import json
import math
import os

import pandas as pd
import pytest

from analysis.claim_view import judged_claims
from analysis.claims import NOT_AT_ZERO, claim_results, open_claims
from analysis.claims_base import seeds_words
from analysis.data import load_study
from analysis.overview_figures import _verdict_words
from harness.declare.claims_spec import ClaimsSpec, SeedPlan
from harness.declare.study import load_study as load_study_file
from harness.declare.study import parse_study
from harness.store.results import load_rows

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "fixtures", "results_small")


@pytest.fixture(scope="module")
def study():
    return load_study(FIXTURE)


def _by_name(results):
    return {v.name: v for v in results}


def test_study_file_overrides_the_declaration():
    """claims: and seeds: in a study file change only what they name; the rest are the
    declared defaults."""
    s = parse_study("study: s\ngrid: {loss: [sid, ratio_js], student.lr: [1.0e-4, 1.0e-3]}\n"
                    "claims: {thresholds: {C1: 0.05}, pair: [ratio_js, sid], pool: [student.lr],"
                    " alpha: 0.1}\nseeds: {start: 2, max: 6}\n", "s.yaml")
    default = ClaimsSpec()
    assert s.claims.threshold("C1") == (0.05, "below")
    assert s.claims.threshold("C2") == default.threshold("C2") == (0.25, "above")
    assert s.claims.pool == ("student.lr",) and s.claims.alpha == 0.1
    assert s.claims.seeds == SeedPlan(start=2, step=2, max=6, first=0)
    assert s.claims.seeds.looks() == [2, 4, 6]
    # the first round's cells are seeds 0, 1; the pool holds every seed up to the cap
    assert sorted({c.config["seed"] for c in s.cells}) == [0, 1]
    assert len(s.cells) == 2 * 2 * 2 and len(s.seed_pool) == 2 * 2 * 6
    assert parse_study("study: s\ngrid: {loss: [sid]}\n", "s.yaml").claims == default


def test_threshold_override_changes_the_verdict(study):
    c1 = _by_name(claim_results(study))["C1"]
    assert c1.verdict == "holds" and c1.ci_high < 0.10
    tight = dataclasses.replace(ClaimsSpec(), thresholds={**ClaimsSpec().thresholds,
                                                          "C1": c1.ci_low / 2})
    assert _by_name(claim_results(study, tight))["C1"].verdict == "does not hold"


def _two_levels(study):
    """The fixture's cells twice, as two levels of student.lr; at the second level random init
    is as good as teacher init (C2 does not hold there)."""
    f = study.final
    lv = lambda lr: json.dumps({"student.lr": lr}, sort_keys=True)  # noqa: E731
    good = f.assign(levels=lv(0.0001))
    teach = f[f["init"] == "teacher"].set_index(["loss", "seed"])["value"]
    rand = (f["init"] == "random").to_numpy()
    same = teach.reindex(pd.MultiIndex.from_frame(f[["loss", "seed"]])).to_numpy() * 1.02
    bad = f.assign(levels=lv(0.001), value=f["value"].where(~rand, same),
                   cell=f["cell"] + "-b")
    cells = pd.concat([study.cells.assign(levels=lv(0.0001)),
                       study.cells.assign(levels=lv(0.001), cell=study.cells["cell"] + "-b")])
    return dataclasses.replace(study, final=pd.concat([good, bad], ignore_index=True),
                               cells=cells)


def test_claims_are_judged_within_each_level(study):
    two = _two_levels(study)
    v = _by_name(claim_results(two))
    low, high = v["C2 (student.lr=0.0001)"], v["C2 (student.lr=0.001)"]
    assert low.verdict == "holds" and high.verdict == "does not hold"
    assert low.level == {"student.lr": 0.0001} and "C2" not in v
    assert low.effect == pytest.approx(_by_name(claim_results(study))["C2"].effect)
    # pooled only when the study says so: then one C2 over 8 (loss, lr) groups
    pooled = _by_name(claim_results(two, ClaimsSpec(pool=("student.lr",))))
    assert "averaged over 8 losses" in pooled["C2"].comparison
    assert pooled["C2"].level == {}


def test_no_verdict_at_kimg_0(study):
    at0 = study.scores[study.scores["kimg"] == 0]
    assert not at0.empty
    assert {v.verdict for v in claim_results(study, final=at0, kimg=0.0)} == {NOT_AT_ZERO}
    from analysis.claims_report import claims_by_kimg

    assert (claims_by_kimg(study)["kimg"] > 0).all()


def test_rounds_replay_decides_or_opens_each_claim(study):
    """With a seeds plan a claim keeps the verdict of the first round that decides it; one
    undecided at the last complete round is open, naming the seeds and cells of the next."""
    spec = ClaimsSpec(seeds=SeedPlan(start=2, step=1, max=4))
    v = _by_name(claim_results(study, spec))
    c2 = v["C2"]
    assert c2.verdict == "holds" and c2.round == 1 and c2.rounds == 3 and not c2.next_seeds
    assert c2.alpha == pytest.approx(0.05 * math.log1p((math.e - 1) * 2 / 4))  # spent at 2/4
    best = v["C1-best"]
    assert best.verdict.startswith("open") and best.next_seeds == (0, 1, 2)
    assert best.seeds == (0, 1) and best.round is None
    cells = set(study.cells.loc[study.cells["init"] == "teacher", "cell"])
    assert set(best.cells) <= cells and len(best.cells) >= 8
    assert "C1-best" in {o.name for o in open_claims(claim_results(study, spec))}
    # without the plan: one look at every seed, no claim open
    assert not open_claims(claim_results(study))


def test_dry_run_and_status_show_the_cap_and_the_claims(tmp_path, capsys):
    """A study with a seeds plan: the dry run gives the most it can cost (every group at the
    cap) and `harness status` the plan and the claims' state; nothing is written."""
    from harness.orchestrate.sweep import run_study, study_status

    path = tmp_path / "s.yaml"
    path.write_text("study: capped\ndata: {name: toy2d}\nteacher: {kimg: 4}\n"
                    "student: {kimg: 2, batch: 64}\ngrid: {loss: [ratio_js, sid], "
                    "init: [teacher, random]}\nseeds: {start: 3, step: 2, max: 9}\n")
    root = str(tmp_path / "r")
    assert run_study(str(path), results=root, dry_run=True) == 0
    out = capsys.readouterr().out
    assert "12 to run" in out and "up to 9 (4 rounds at most)" in out
    assert "at most 36 cells (72 kimg of student training)" in out
    status = study_status(str(path), root)
    assert "so far, this round included: 12 cells" in status and "claims: not judged yet" in status
    assert not os.path.exists(root) or not os.listdir(root)
    # a later round's cells are no longer the grid's product: the header does not claim it is
    from harness.declare.study import describe, load_study
    from harness.orchestrate.rounds import with_cells

    study = load_study(str(path))
    assert describe(study).splitlines()[0].endswith(": 12 cells = 2 loss x 2 init x 3 seed")
    later = with_cells(study, [c for c in study.seed_pool if c.config["seed"] < 5])
    assert describe(later).splitlines()[0].endswith(
        ": 20 cells (the grid's 2 loss x 2 init x 3 seed to start, and the seeds its rounds "
        "added)")


def _frozen_store(root: str):
    """Two losses x {frozen variants, teacher, random} x 4 seeds; a per-seed offset shared by
    every group (the paired design) and known gap shares: freezing the body costs 10% of the
    teacher-random gap, freezing the encoder alone 60%."""
    from harness.store.results import write_rows

    offset = [0.0, 0.9, -0.5, 0.3]
    share = {"encoder+middle+decoder": 0.1, "encoder": 0.6}
    rows = []
    for loss, fam in (("sid", "sid"), ("ratio_js", "ratio")):
        for init, frozen in (("teacher[freeze encoder+middle+decoder]", "encoder+middle+decoder"),
                             ("teacher[freeze encoder]", "encoder"), ("teacher", None),
                             ("random", None)):
            for seed in range(4):
                t = 2.0 + offset[seed]
                value = {"teacher": t, "random": t + 8.0}.get(init)
                if value is None:
                    value = t + 8.0 * share[frozen] + 0.01 * (seed % 2)
                cell = f"{loss}-{init}-{seed}"
                for kimg in (0.0, 4.0):
                    rows.append({"cell": cell, "loss": loss, "init": init, "loss_family": fam,
                                 "init_scheme": "random" if init == "random" else "teacher",
                                 "freeze_groups": frozen, "seed": seed, "kimg": kimg,
                                 "metric": "fd_digits_1k", "value": 70.0 if kimg == 0 else value,
                                 "status": "done" if kimg else "running",
                                 "axes": json.dumps({"loss": loss, "init": init, "seed": seed})})
    write_rows(root, rows)


def test_frozen_features_claim(tmp_path):
    """C3f judges teacher init with the encoder, middle and decoder frozen as a share of the
    teacher-random gap; every other frozen variant gets its own C3f[...] row; neither enters C3
    or stands in for the teacher init (which C2 and the gap shares are measured from)."""
    root = str(tmp_path / "store")
    _frozen_store(root)
    study = load_study(root)
    assert study.inits_where(init_scheme="teacher", init_source=None, freeze_groups=None) == [
        "teacher"]
    v = _by_name(claim_results(study))
    assert v["C3f"].effect == pytest.approx(0.1 + 0.005 / 8, abs=1e-9)
    assert v["C3f"].verdict == "holds" and v["C3f"].ci_high < 0.25 and v["C3f"].n_seeds == 4
    assert v["C3f[encoder]"].effect == pytest.approx(0.6 + 0.005 / 8, abs=1e-9)
    assert v["C3f[encoder]"].verdict == "does not hold"
    assert v["C2"].effect == pytest.approx(8.0 / 2.175)  # from the plain teacher's mean
    assert v["C3"].verdict == "not tested by this study" and "C3f" not in v["C3"].comparison
    order = [r.name for r in claim_results(study)]
    assert order.index("C3e") < order.index("C3f") < order.index("C3f[encoder]")
    # without the body-frozen variant C3f is not tested and says what it needs
    rows = study.final[study.final["init"] != "teacher[freeze encoder+middle+decoder]"]
    w = _by_name(claim_results(study, final=rows))
    assert w["C3f"].verdict == "not tested by this study"
    assert any("freeze [encoder, middle, decoder]" in d for d in w["C3f"].details)
    assert w["C3f[encoder]"].verdict == "does not hold"


def test_status_names_each_round_that_claims_a_round_apart_wait_for():
    """Mid-round, a claim whose cells are all final is judged and waits for the next round while
    another still waits for this one: `harness status` lists each round's cells under its own
    number (it used to file this round's last cell under the next round)."""
    from types import SimpleNamespace as NS

    from harness.orchestrate.rounds import Round, describe_round

    def cell(loss, seed):
        return NS(config={"seed": seed}, label=f"loss={loss} seed={seed}")

    looks = [8, 12, 16, 20, 24, 28]
    c1 = NS(name="C1", verdict="open after round 5 of 6", next_seeds=list(range(28)))
    c4 = NS(name="C4", verdict="open after round 4 of 6", next_seeds=list(range(24)))
    r = Round(cells=[], adds=[cell("rkl", 23), cell("sid", 24), cell("js", 24)],
              begun=[cell("rkl", 20), cell("sid", 20), cell("sid", 23)], looks=looks, round=6,
              open=[c1, c4], results=[c1, c4])
    words = describe_round(r)
    assert "C1 (open after round 5 of 6): round 6 runs 28 seeds per group (0-27)" in words[0]
    assert "C4 (open after round 4 of 6): round 5 runs 24 seeds per group (0-23)" in words[0]
    assert words[1:] == ["round 5 is under way: 1 of its 4 new cells have no result yet: "
                         "loss=rkl seed=23",
                         "round 6 adds 2 cells: loss=sid seed=24, loss=js seed=24"]



def test_committed_tune_digits_claims_stop_at_their_own_rounds():
    """The committed tune-digits store (9 rounds of 4 + 4k seeds, capped at 40): C1 holds at
    round 7 with 32 seeds; C1-best and the verifier's C4 are still undecided after round 9, and
    both say so the same way. The forest figure's labels and title give each claim's seeds."""
    root = os.path.join(HERE, "..", "results", "tune-digits")
    rows = load_rows(root)
    spec = load_study_file(os.path.join(HERE, "..", "studies", "tune-digits.yaml")).claims
    v = {c.name: c for c in judged_claims(load_study(root, rows=rows), spec, rows=rows)}
    assert (v["C1"].verdict, v["C1"].n_seeds) == ("holds", 32)
    for name in ("C1-best", "C4"):
        assert v[name].verdict == "inconclusive at the cap (40 seeds)", v[name].verdict
        assert v[name].seeds_to_decide and v[name].seeds_to_decide > 40
    assert seeds_words(c.n_seeds for c in v.values() if c.n_seeds) == ("32-40 seeds, by claim",
                                                                       True)
    assert _verdict_words(v["C1"], True) == "holds\n32 seeds"
    assert _verdict_words(v["C4"], True) == (f"inconclusive at the cap\n40 seeds; "
                                             f"~{v['C4'].seeds_to_decide} decide")
    assert seeds_words([3, 3]) == ("3 seeds", False)
    assert _verdict_words(dataclasses.replace(v["C1-best"], verdict="inconclusive (3 seeds)",
                                              seeds_to_decide=None), False) == \
        "inconclusive\n3 seeds"
