"""``tune:`` sections and ``harness tune`` (harness.store.tuning, harness.orchestrate.tune_run, analysis.tuning).

    python -m pytest -q tests/test_tuning.py                 # fast: validation, selection, apply
    python -m pytest -q -m slow tests/test_tuning.py         # Ray: tune then run, kill/resume

Shown here: a bad ``tune:`` section is refused with file:line (exit 2); selection reads only the
selection seeds' rows and takes the best mean final value over them; the pinned choice reaches
the cells' configs and ids, and ``harness run`` refuses a study whose choice is missing or stale;
figures and tables state the protocol. Slow: every family runs the same number of trials (at the
same random-search points) and ``harness run`` then trains the tuned cells; a SIGKILLed
``harness tune`` resumes without running finished trials again.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import types

import pytest

from harness import cli
from harness.declare import hashing, tune_spec
from harness.store import results, tune_views, tuning
from harness.orchestrate.status import fingerprints
from harness.declare.study import StudyError, load_study

ROOT = pathlib.Path(__file__).resolve().parent.parent

HEAD = """\
study: {name}
data: {{name: toy2d}}
teacher: {{kimg: 4}}
student: {{kimg: {kimg}, batch: 64}}
eval: {{n: 200, every_kimg: 0.5}}
grid:
  loss: [sid, ratio_kl]
  seed: [0, 1]
"""
TUNE = """\
tune:
  space:
    student.lr: loguniform(1.0e-5, 1.0e-3)
  trials: {trials}
  kimg: {tkimg}
  seeds: {seeds}
  scheduler: {scheduler}
"""


def write(folder, text, name="t.yaml"):
    path = pathlib.Path(folder) / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def toy(folder, name="t", kimg=1, trials=3, tkimg=1, seeds="[100]", scheduler="asha", file=None):
    return write(folder, HEAD.format(name=name, kimg=kimg)
                 + TUNE.format(trials=trials, tkimg=tkimg, seeds=seeds, scheduler=scheduler),
                 file or f"{name}.yaml")


# ---------------------------------------------------------------------------------------------
# the section: parsed, or refused with file:line

def test_tune_section_parses_into_families(tmp_path):
    path = write(tmp_path, """\
        study: t
        data: {name: toy2d}
        teacher: {kimg: 4}
        student: {kimg: 2, batch: 64}
        eval: {n: 200, every_kimg: 0.5, verifier: {n: [1, 2]}}
        grid:
          loss: [di, sid, ratio_kl, ratio_js]
          init: [random, teacher]
          seed: [0, 1]
        tune:
          space:
            student.lr: loguniform(1.0e-5, 1.0e-3)
            sid: {loss.alpha: [1.0, 1.2]}
            ratio: {student.aux_lr: loguniform(1.0e-5, 1.0e-3)}
            ratio_js: {student.aux_steps: randint(1, 3)}
          trials: 4
          kimg: 1.5
          seeds: [100, 101]
        """)
    t = load_study(path).tune
    assert list(t.families) == ["di", "sid", "ratio_kl", "ratio_js"]
    space = {f: {k: d.text for k, d in fam.space.items()} for f, fam in t.families.items()}
    lr = "loguniform(1e-05, 0.001)"
    assert space["di"] == {"student.lr": lr}
    assert space["sid"] == {"loss.alpha": "[1.0, 1.2]", "student.lr": lr}
    assert space["ratio_kl"] == {"student.aux_lr": lr, "student.lr": lr}
    assert space["ratio_js"] == {"student.aux_lr": lr, "student.aux_steps": "randint(1, 3)",
                                 "student.lr": lr}
    base = t.families["sid"].base
    assert base["init"] == {"name": "teacher"}  # teacher init, not the first init axis value
    assert base["student"]["kimg"] == 1.5 and base["seed"] == 100
    assert base["eval"]["verifier"] is None and base["eval"]["n"] == 200
    assert t.metric == "auto" and t.scheduler == "asha" and t.trials == 4
    assert t.families["sid"].space["student.lr"].log
    # a trial's values pass the study file's schema
    cfg = tuning.trial_config(t.families["sid"], {"student.lr": 3e-4, "loss.alpha": 1.0}, 101)
    assert cfg["student"]["lr"] == 3e-4 and cfg["loss"]["alpha"] == 1.0 and cfg["seed"] == 101
    with pytest.raises(tuning.C.ConfigError, match="student.lr: must be in"):
        tuning.trial_config(t.families["sid"], {"student.lr": 50.0, "loss.alpha": 1.0}, 100)


BAD = [  # (tune section lines, the message's start after the file name)
    ("tune: 3\n", ":9: tune: expected a mapping"),
    ("tune: {space: {student.lr: [1.0e-4]}, trials: 2, kimg: 1, seeds: [0]}\n",
     ":9: tune.seeds[0]: selection seed 0 is also a seed of the study's cells"),
    ("tune:\n  space: {student.lr: lognormal(1, 2)}\n  trials: 2\n  kimg: 1\n  seeds: [100]\n",
     ":10: tune.space.student.lr: unknown distribution 'lognormal'"),
    ("tune:\n  space:\n    student.lr: loguniform(0, 1.0e-3)\n  trials: 2\n  kimg: 1\n"
     "  seeds: [100]\n", ":11: tune.space.student.lr: loguniform needs a lower end > 0"),
    ("tune:\n  space:\n    student.lr: loguniform(1.0e-5, 100)\n  trials: 2\n  kimg: 1\n"
     "  seeds: [100]\n", ":11: tune.space.student.lr: must be in (0, 10], got 100"),
    ("tune:\n  space:\n    student.kimg: uniform(1, 4)\n  trials: 2\n  kimg: 1\n  seeds: [100]\n",
     ":11: tune.space.student.kimg: student.kimg is the training budget"),
    ("tune:\n  space:\n    teacher.lr: uniform(0.001, 0.01)\n  trials: 2\n  kimg: 1\n"
     "  seeds: [100]\n", ":11: tune.space.teacher.lr: 'teacher.lr' cannot be searched"),
    ("tune:\n  space:\n    di: {student.lr: loguniform(1.0e-5, 1.0e-3)}\n  trials: 2\n  kimg: 1\n"
     "  seeds: [100]\n", ":11: tune.space.di: no loss of this study is 'di'"),
    ("tune:\n  space:\n    student.lr: [1.0e-4, 3.0e-4]\n    ratio: {loss.divergence: [kl, js]}\n"
     "  trials: 2\n  kimg: 1\n  seeds: [100]\n",
     ":12: tune.space.ratio.loss.divergence: the study compares ratio losses that differ in "
     "divergence"),
    ("tune:\n  space:\n    ratio: {student.aux_lr: [1.0e-4, 2.0e-4]}\n  trials: 2\n  kimg: 1\n"
     "  seeds: [100]\n", ":10: tune.space: nothing is searched for loss sid"),
    ("tune:\n  space:\n    student.lr: [1.0e-4, 3.0e-4]\n    sid: {student.lr: [1.0e-4]}\n"
     "  trials: 2\n  kimg: 1\n  seeds: [100]\n",
     ":12: tune.space.sid.student.lr: student.lr is searched twice"),
    ("tune:\n  space:\n    student.aux_steps: uniform(1, 3)\n  trials: 2\n  kimg: 1\n"
     "  seeds: [100]\n", ":11: tune.space.student.aux_steps: student.aux_steps is not a real"),
    ("tune:\n  space: {student.lr: [1.0e-4]}\n  trials: 0\n  kimg: 1\n  seeds: [100]\n",
     ":11: tune.trials: must be in [1, 1,000], got 0; use a value in [1, 1,000]"),
    ("tune:\n  space: {student.lr: [1.0e-4]}\n  trials: 2\n  kimg: 1\n  seeds: [100]\n"
     "  scheduler: hyperband\n", ":14: tune.scheduler: unknown value 'hyperband'; known: asha, none"),
    ("tune:\n  space: {student.lr: [1.0e-4]}\n  trials: 2\n  kimg: 1\n",
     ":9: tune: missing tune.seeds"),
    ("tune:\n  space: {student.lr: [1.0e-4]}\n  trials: 2\n  kimg: 1\n  seeds: [100]\n"
     "  budget: 3\n",
     ":14: tune.budget: unknown key 'budget' in tune"),
    ("tune:\n  space: {student.aux_steps: [1, 1.5]}\n  trials: 2\n  kimg: 1\n  seeds: [100]\n",
     ":10: tune.space.student.aux_steps[1]: expected a whole number"),
]


@pytest.mark.parametrize("section,expected", BAD, ids=[b[1].split(": ")[1] + str(i)
                                                       for i, b in enumerate(BAD)])
def test_bad_tune_section_gives_file_and_line(tmp_path, section, expected):
    grid = "  loss: [sid, ratio_kl, ratio_js]\n" if "divergence" in section else \
        "  loss: [sid, ratio_kl]\n"
    text = HEAD.format(name="bad", kimg=1).replace("  loss: [sid, ratio_kl]\n", grid) + section
    path = write(tmp_path, text, "bad.yaml")
    with pytest.raises(StudyError) as e:
        load_study(path)
    assert str(e.value).startswith(path + expected), str(e.value)


def test_bad_tune_section_exits_2_from_every_command(tmp_path, capsys):
    path = write(tmp_path, HEAD.format(name="bad", kimg=1) + BAD[2][0], "bad.yaml")
    for argv in (["tune", path, "--dry-run"], ["tune", path], ["run", path, "--dry-run"],
                 ["status", path]):
        assert cli.main(argv) == 2
        err = " ".join(capsys.readouterr().err.split())  # the CLI wraps its paragraph
        assert f"{path}:10: tune.space.student.lr: unknown distribution" in err, err


def test_tune_digits_study_is_valid_and_fair():
    study = load_study(str(ROOT / "studies" / "tune-digits.yaml"))
    t = study.tune
    assert list(t.families) == ["di", "sid", "ratio_kl", "ratio_js", "ratio_rkl"]
    assert all({k: d.text for k, d in f.space.items()} == {"student.lr": "loguniform(1e-05, 0.001)"}
               for f in t.families.values())
    assert t.trials == 8 and t.kimg <= study.cells[0].config["student"]["kimg"] == 48
    assert not set(t.seeds) & {c.config["seed"] for c in study.cells}
    assert all(c.config["student"]["lr"] == 1e-4 for c in study.cells)  # untuned: the default
    assert "16 kimg per trial" in study.description


# ---------------------------------------------------------------------------------------------
# selection

def _rows(study_name, fam_hash, family, trial, seed, values, finals, metric="mmd_toy2d_200",
          kimg_final=1.0, diverged=False, stopped_at=None):
    """Tuning rows of one trial and seed: evaluations at kimg 0, 0.5 and 1 (the final)."""
    axes = json.dumps({"tune.family": family, "tune.hash": fam_hash, "tune.trial": trial,
                       "tune.metric": metric, "tune.values": values}, sort_keys=True)
    out = []
    for kimg, value in ((0.0, 9.0), (0.5, finals * 2), (kimg_final, finals)):
        if stopped_at is not None and kimg > stopped_at:
            break
        base = {"study": study_name, "cell": f"tune-{trial}-s{seed}", "loss": family,
                "init": "teacher", "seed": seed, "axes": axes, "kimg": kimg,
                "step": int(kimg * 1000 / 64), "status": "tuning",
                "protocol": tune_spec.TRIAL_PROTOCOL, "wall_s": 1.0}
        if diverged and kimg == kimg_final:
            out.append({**base, "metric": "diverged", "value": 10.0})
            break
        out += [{**base, "metric": metric, "value": value},
                {**base, "metric": "swd_toy2d_200", "value": -value}]
    return out


def test_selection_reads_only_selection_seeds_and_averages_them(tmp_path, monkeypatch):
    root = str(tmp_path / "r")
    H = "h" * 16
    rows = []
    # trial a: mean over 100, 101 = 0.3; b: better on 100 but stopped early on 101; c: best
    # on seed 0 (a study seed, never read) and poor on the selection seeds; d: diverged;
    # e: another tune hash (an older tune: section); f: the winner, mean 0.25
    rows += _rows("t", H, "sid", "a_0", 100, {"student.lr": 1e-4}, 0.2)
    rows += _rows("t", H, "sid", "a_0", 101, {"student.lr": 1e-4}, 0.4)
    rows += _rows("t", H, "sid", "b_1", 100, {"student.lr": 2e-4}, 0.01)
    rows += _rows("t", H, "sid", "b_1", 101, {"student.lr": 2e-4}, 0.01, stopped_at=0.5)
    rows += _rows("t", H, "sid", "c_2", 100, {"student.lr": 3e-4}, 0.9)
    rows += _rows("t", H, "sid", "c_2", 101, {"student.lr": 3e-4}, 0.9)
    rows += _rows("t", H, "sid", "c_2", 0, {"student.lr": 3e-4}, 0.0001)
    rows += _rows("t", H, "sid", "d_3", 100, {"student.lr": 9e-4}, 0.001, diverged=True)
    rows += _rows("t", "x" * 16, "sid", "e_4", 100, {"student.lr": 5e-4}, 0.0)
    rows += _rows("t", "x" * 16, "sid", "e_4", 101, {"student.lr": 5e-4}, 0.0)
    rows += _rows("t", H, "sid", "f_5", 100, {"student.lr": 6e-5}, 0.3)
    rows += _rows("t", H, "sid", "f_5", 101, {"student.lr": 6e-5}, 0.2)
    other = [dict(r, status="done", cell="c0", seed=100) for r in rows[:4]]  # a cell's rows
    results.write_rows(root, rows[: len(rows) // 2])
    results.write_rows(root, rows[len(rows) // 2:] + other)

    import pyarrow.parquet as pq

    calls = []
    real = pq.read_table

    def spy(*a, **k):
        calls.append(k.get("filters"))
        return real(*a, **k)

    monkeypatch.setattr(pq, "read_table", spy)
    got = tuning.read_trial_rows(root, [100, 101])
    assert calls and all(f == [("status", "=", "tuning"), ("seed", "in", [100, 101])]
                         for f in calls)  # filtered while reading: other seeds never arrive
    assert set(got.seed) == {100, 101} and set(got.status) == {"tuning"}
    table = tuning.trial_table(got, H, [100, 101], 1.0)
    assert list(table.trial) == ["a_0", "b_1", "c_2", "d_3", "f_5"]
    assert dict(zip(table.trial, table.state)) == {"a_0": "complete", "b_1": "stopped",
                                                   "c_2": "complete", "d_3": "diverged",
                                                   "f_5": "complete"}
    assert table.set_index("trial").score["a_0"] == pytest.approx(0.3)
    best = tuning.select(table)
    assert best["trial"] == "f_5" and best["values"] == {"student.lr": 6e-5}
    assert best["score"] == pytest.approx(0.25) and best["candidates"] == 3
    # with the study's seed 0 read as well, trial c would have won: the rule never sees it
    assert tuning.select(tuning.trial_table(results.load_rows(root), H, [100, 101, 0], 1.0)) \
        is not None
    # a higher-is-better metric picks the largest mean
    hb = table.assign(metric="precision_x")
    assert tuning.select(hb)["trial"] == "c_2"
    # ties go to the earlier trial
    tie = table.assign(score=[0.1, float("nan"), 0.1, float("nan"), 0.1])
    assert tuning.select(tie)["trial"] == "a_0"
    assert tuning.select(table[table.state != "complete"]) is None


def test_status_shows_the_tuning_under_way(tmp_path, capsys):
    """While `harness tune` holds the lock, status names it and gives each untuned family's
    trials as the rows show them, with the best complete one; a pinned family drops out."""
    from harness.store.lock import acquire_lock

    path = toy(tmp_path, trials=3)
    root = str(tmp_path / "r")
    study = load_study(path)
    fam = study.tune.families["sid"]
    h, final = tuning.family_hash(study.tune, fam), tuning.final_kimg(fam.base)
    rows = (_rows("t", h, "sid", "a_0", 100, {"student.lr": 1e-4}, 0.3, kimg_final=final)
            + _rows("t", h, "sid", "b_1", 100, {"student.lr": 2e-4}, 0.2, kimg_final=final)
            + _rows("t", h, "sid", "c_2", 100, {"student.lr": 9e-4}, 0.1, kimg_final=final,
                    stopped_at=0.5))
    results.write_rows(root, rows)
    with acquire_lock(root, command="harness tune"):
        assert cli.main(["status", path, "--results", root]) == 0
    out = capsys.readouterr().out
    assert "`harness tune` is in progress: process" in out, out
    assert ("tuning sid: 3 of 3 trials have reported, 2 reached the whole budget, 0 diverged, "
            "1 stopped early or still running; best so far student.lr=0.0002: "
            "mmd_toy2d_200 0.2") in out, out
    assert "tuning ratio_kl: no trial has reported yet (3 to run)" in out
    _pin_choice(study, root, {"sid": 2e-4})
    assert cli.main(["status", path, "--results", root]) == 0
    out = capsys.readouterr().out
    assert "tuning sid:" not in out and "tuning ratio_kl: no trial" in out, out


# ---------------------------------------------------------------------------------------------
# the choice reaches the cells (configs and ids); run refuses without it

def _pin_choice(study, root, lrs: dict):
    for fam, lr in lrs.items():
        f = study.tune.families[fam]
        tuning.record_choice(root, study, fam, {
            "hash": tuning.family_hash(study.tune, f), "choice": {"student.lr": lr},
            "space": {k: d.text for k, d in f.space.items()}, "log": ["student.lr"],
            "trial": f"t{fam}", "metric": "mmd_toy2d_200", "score": 0.1, "candidates": 3,
            "trials": 3, "final_kimg": 1.0, "experiment": "x", "init": "teacher"})


def _ids(study):
    fp, _ = fingerprints(study)
    return {c.config["loss"]["name"] + str(c.config["seed"]): cid
            for cid, c, *_ in hashing.compute_ids(study, fp)}


def test_chosen_values_reach_cells_and_ids_and_run_refuses_without(tmp_path, capsys):
    path = toy(tmp_path)
    root = str(tmp_path / "r")
    study = load_study(path)
    untuned = _ids(study)
    # no choice pinned: run refuses (exit 2), the dry run and status say so and go on
    assert cli.main(["run", path, "--results", root]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "no tuned choice is pinned" in err and f"harness tune {path}" in err
    assert not os.path.exists(os.path.join(root, "pin.json"))
    assert cli.main(["run", path, "--results", root, "--dry-run"]) == 0
    assert "note: " in capsys.readouterr().out
    with pytest.raises(tuning.TuneError, match="not tuned"):
        tuning.apply_pinned(study, root)

    _pin_choice(study, root, {"sid": 3e-4, "ratio_kl": 5e-5})
    doc = json.loads(open(os.path.join(root, "pin.json")).read())
    assert doc["tuned"]["choice"] == {"sid": {"student.lr": 3e-4}, "ratio_kl": {"student.lr": 5e-5}}
    assert doc["tuned"]["protocol"]["trials"] == 3 and doc["tuned"]["hash"] == study.tune.hash
    tuned = tuning.apply_pinned(study, root, log=lambda *a: None)
    assert [c.config["student"]["lr"] for c in tuned.cells] == [3e-4, 3e-4, 5e-5, 5e-5]
    assert [c.axes for c in tuned.cells] == [c.axes for c in study.cells]
    ids = _ids(tuned)
    assert set(ids) == set(untuned) and not set(ids.values()) & set(untuned.values())
    assert cli.main(["run", path, "--results", root, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "tuned (pinned by harness tune): sid student.lr=0.0003; ratio_kl student.lr=5e-05" in out
    assert all(cid in out for cid in ids.values())
    assert "2 families to tune" not in out

    # the tune: section changes (another budget): the choice is stale, run refuses again
    path2 = toy(tmp_path, tkimg=2, file="t2.yaml")
    with pytest.raises(tuning.TuneError, match="tuned under another tune: section"):
        tuning.apply_pinned(load_study(path2), root)
    assert cli.main(["tune", path2, "--results", root, "--dry-run"]) == 0
    assert "2 families to tune, 0 tuned" in capsys.readouterr().out
    # a changed study setting the trials use (teacher) makes it stale too; seeds do not
    more_seeds = write(tmp_path, open(path).read().replace("seed: [0, 1]", "seed: [0, 1, 2]"),
                       "t3.yaml")
    assert len(tuning.apply_pinned(load_study(more_seeds), root, log=lambda *a: None).cells) == 6
    other_teacher = write(tmp_path, open(path).read().replace("kimg: 4}", "kimg: 5}"), "t4.yaml")
    with pytest.raises(tuning.TuneError):
        tuning.apply_pinned(load_study(other_teacher), root)


def test_figure_and_table_state_the_protocol(tmp_path):
    from analysis.figures import make_all
    from analysis.tables import provenance_lines

    path = toy(tmp_path, seeds="[100, 101]")
    root = str(tmp_path / "r")
    study = load_study(path)
    rows = []
    for fam in study.tune.families:
        h = tuning.family_hash(study.tune, study.tune.families[fam])
        for k, lr in enumerate((2e-5, 1e-4, 5e-4)):
            for seed in (100, 101):
                rows += _rows("t", h, fam, f"{fam}_{k}", seed, {"student.lr": lr},
                              0.1 + abs(k - 1) * 0.05, stopped_at=0.5 if k == 2 else None)
    results.write_rows(root, rows)
    _pin_choice(study, root, {"sid": 1e-4, "ratio_kl": 1e-4})
    tuned = json.loads(open(os.path.join(root, "pin.json")).read())["tuned"]
    for fam in tuned["families"]:
        tuned["families"][fam]["trial"] = f"{fam}_1"
    paths = make_all(root, only="tuning")  # no done cell yet: right after `harness tune`
    assert [os.path.basename(p) for p in paths] == ["tuning.data.csv", "tuning.png", "tuning.pdf"]
    import pandas as pd

    csv = pd.read_csv(paths[0])
    assert len(csv) == 6 and set(csv.state) == {"complete", "stopped"}
    lines = provenance_lines(types.SimpleNamespace(protocol=None, tuned=tuned))
    text = "\n".join(lines)
    assert "3 trials per family" in text and "1 kimg per trial" in text
    assert "every loss family's student.lr ~ loguniform(1e-05, 0.001), chosen" in text
    assert "selection seeds 100, 101" in text and "student.lr ~ loguniform(1e-05, 0.001)" in text
    assert "sid: student.lr = 0.000100" in text


def test_asha_that_cannot_stop_a_trial_is_said(tmp_path):
    """ASHA compares trials at rungs from its grace period to the whole budget: when a trial
    scores only before the grace period and at the end (evaluations too sparse), the dry run and
    `harness tune` say it will stop nothing (c3-mnist's 8-kimg trials evaluated every 8 kimg)."""
    fine = load_study(toy(tmp_path, tkimg=2))  # scores at 0, 0.512, ..., 2.048: inside the rungs
    assert tune_views.report_kimg(fine.tune.families["sid"].base)[:3] == [0.0, 0.512, 1.024]
    assert all(tune_views.asha_note(fine.tune, f) is None for f in fine.tune.families.values())
    sparse = write(tmp_path, open(toy(tmp_path, tkimg=2, file="x.yaml")).read().replace(
        "every_kimg: 0.5", "every_kimg: 4"), "sparse.yaml")
    study = load_study(sparse)
    assert tune_views.report_kimg(study.tune.families["sid"].base) == [0.0, 2.048]
    note = tune_views.asha_note(study.tune, study.tune.families["sid"])
    assert note.startswith("scheduler asha cannot stop any sid trial: a trial reports a score "
                           "at kimg 0, 2.048 (eval.every_kimg 4), none between ASHA's grace "
                           "period (0.512) and the whole budget (2.048)"), note
    assert f"note: {note}" in tune_views.describe(study, str(tmp_path / "r"))
    two_seeds = write(tmp_path, open(sparse).read().replace("seeds: [100]", "seeds: [100, 101]"),
                      "two.yaml")  # the second seed's first score (2.048) lies inside the rungs
    study = load_study(two_seeds)
    assert tune_views.asha_note(study.tune, study.tune.families["sid"]) is None
    none = write(tmp_path, open(sparse).read().replace("scheduler: asha", "scheduler: none"),
                 "none.yaml")
    assert tune_views.asha_note(load_study(none).tune, load_study(none).tune.families["sid"]) is None


def test_trial_lines_count_on_after_a_resume(capsys):
    """A resumed `harness tune` numbers its trial lines from the trials Tune had already ended
    (their callbacks fired in an earlier driver), not from 1."""
    from harness.orchestrate.tune_run import TrialLines

    def trial(tid, status, lr=1e-4):
        return types.SimpleNamespace(trial_id=tid, status=status, config={"student.lr": lr},
                                     last_result={"kimg": 8.0, "score": 1.5, "metric": "fd",
                                                  "seed": 100})

    lines = TrialLines("sid", 8, 8.0, [100])  # what a restored driver builds: a fresh callback
    ended = [trial(f"t{k}", "TERMINATED") for k in range(3)] + [trial("t3", "ERROR")]
    now, waiting = trial("t4", "RUNNING"), trial("t5", "PENDING")
    lines.on_trial_complete(0, ended + [now, waiting], now)
    now.status = "TERMINATED"  # the next one sees it ended, whichever order Tune sets it in
    nxt = trial("t5", "TERMINATED")
    lines.on_trial_complete(0, ended + [now, nxt], nxt)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("tune sid: trial t4 (5/8) student.lr=0.0001: fd 1.5 (seed 100)"), out
    assert out[1].startswith("tune sid: trial t5 (6/8)"), out


# ---------------------------------------------------------------------------------------------
# Ray (slow): the search itself, then run; a killed tune resumes

@pytest.fixture(scope="module")
def cache(study_cache):
    return study_cache


@pytest.fixture
def own_ray(cache, monkeypatch):
    import logging

    import ray

    monkeypatch.setenv("HARNESS_CACHE", cache)
    ray.shutdown()
    ray.init(num_cpus=2, log_to_driver=False, include_dashboard=False,
             logging_level=logging.WARNING, _temp_dir=tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    yield
    ray.shutdown()


@pytest.mark.slow
def test_tune_same_trials_per_family_then_run_uses_the_choice(tmp_path, own_ray, capsys):
    from harness.orchestrate.sweep import run_study
    from harness.orchestrate.tune_run import tune_study

    path = toy(tmp_path, name="tr", kimg=0.5, trials=3, tkimg=1, scheduler="asha")
    path = write(tmp_path, open(path).read().replace("seed: [0, 1]", "seed: [0]"), "tr.yaml")
    root = str(tmp_path / "r")
    assert tune_study(path, results=root) == 0
    out = capsys.readouterr().out
    rows = tuning.read_trial_rows(root, [100])
    trials = {fam: sorted({json.loads(a)["tune.trial"] for a in g["axes"]})
              for fam, g in rows.groupby("loss")}
    assert {f: len(t) for f, t in trials.items()} == {"sid": 3, "ratio_kl": 3}  # the same budget
    values = {fam: sorted(json.loads(a)["tune.values"]["student.lr"] for a in g["axes"].unique())
              for fam, g in rows.groupby("loss")}
    assert values["sid"] == values["ratio_kl"]  # one random-search seed: the same points
    doc = json.loads(open(os.path.join(root, "pin.json")).read())
    choice = doc["tuned"]["choice"]
    assert set(choice) == {"sid", "ratio_kl"} and "next: harness run" in out
    for fam, entry in doc["tuned"]["families"].items():
        table = tuning.trial_table(rows, entry["hash"], [100], entry["final_kimg"])
        assert tuning.select(table)["trial"] == entry["trial"]
        assert entry["trials"] == 3 and entry["choice"]["student.lr"] in values[fam]
    assert os.path.isdir(os.path.join(root, "tune", doc["tuned"]["families"]["sid"]["experiment"]))
    weights = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(root, "tune"))
               for f in fs if f.endswith(".pt")]
    assert weights == []  # a pinned family's trial weights are deleted (its rows stay)

    # run: the cells train with the chosen lr, under ids that hash it
    assert tune_study(path, results=root) == 0
    assert "nothing was run" in capsys.readouterr().out
    assert run_study(path, results=root) == 0
    doc = json.loads(open(os.path.join(root, "pin.json")).read())
    for cid in doc["current"]:
        cfg = doc["cells"][cid]["config"]
        fam = tuning.C.loss_label(cfg["loss"])
        assert cfg["student"]["lr"] == choice[fam]["student.lr"]
    df = results.load_rows(root)
    assert set(df[df.cell.isin(doc["current"])].status) >= {"done"}
    assert "tuning" in set(df.status)


def test_pinned_family_trial_weights_are_deleted(tmp_path):
    from harness.orchestrate.tune_run import _drop_trial_weights

    exp = tmp_path / "tune" / "exp"
    keep = []
    for trial in ("harness_trial_a", "harness_trial_b"):
        for ck in ("checkpoint_000000", "checkpoint_000001"):
            d = exp / trial / ck
            d.mkdir(parents=True)
            (d / "seed-100.pt").write_bytes(b"w")
            (d / "seed-101.pt").write_bytes(b"w")
            (d / "state.json").write_text("{}")
            keep.append(d / "state.json")
        (exp / trial / "result.json").write_text("{}")
        keep.append(exp / trial / "result.json")
    (exp / "experiment_state.json").write_text("{}")
    keep.append(exp / "experiment_state.json")
    _drop_trial_weights(str(exp), [100, 101])
    assert not list(exp.rglob("*.pt"))
    assert all(p.exists() for p in keep)
    _drop_trial_weights(str(tmp_path / "absent"), [100])  # nothing there: no error


def _trial_rows(root):
    df = results.load_rows(root)
    return df[df.status == "tuning"] if len(df) else df


@pytest.mark.slow
def test_killed_tune_resumes_without_rerunning_finished_trials(tmp_path, cache):
    from conftest import reap_ray

    path = toy(tmp_path, name="kt", trials=4, tkimg=3, scheduler="none")
    path = write(tmp_path, open(path).read().replace("loss: [sid, ratio_kl]", "loss: [sid]"),
                 "kt.yaml")
    root = str(tmp_path / "r")
    ray_tmp = tempfile.mkdtemp(prefix="rk", dir="/tmp")
    env = {**os.environ, "HARNESS_CACHE": cache, "RAY_TMPDIR": ray_tmp, "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "harness.cli", "tune", path, "--results", root]
    final = 3.0
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=tmp_path)
        deadline, done = time.time() + 400, set()
        while time.time() < deadline and proc.poll() is None:
            df = _trial_rows(root)
            if len(df):
                done = set(df.cell[df.kimg >= final])
                busy = set(df.cell) - done
                if done and busy:
                    break
            time.sleep(0.2)
        assert done and busy, (tmp_path / "first.log").read_text()[-3000:]
        t_kill = results.now()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = _trial_rows(root)
    done = set(before.cell[before.kimg >= final])
    reap_ray(ray_tmp)
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600,
                            cwd=tmp_path)
    print(second.stdout, second.stderr)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming Ray experiment kt-sid-" in second.stdout
    # the resumed driver counts on from the trials Tune had already ended: "(k/4)" with k
    # running up to 4, never restarting at 1 for trials the first driver finished
    ks = sorted(int(k) for k in re.findall(r"trial \S+ \((\d)/4\)", second.stdout))
    assert ks and ks == list(range(5 - len(ks), 5)), second.stdout
    reap_ray(ray_tmp)
    import glob

    import pandas as pd
    import pyarrow.parquet as pq

    raw = pd.concat([pq.read_table(f, schema=results.ROWS).to_pandas()
                     for f in glob.glob(os.path.join(root, "rows", "part-*.parquet"))])
    new = raw[(raw.written_at > t_kill) & (raw.status == "tuning")]
    assert done and not set(new.cell) & done  # finished trials were not run again
    after = _trial_rows(root)
    assert after.cell.nunique() == 4  # 4 trials x 1 seed, none lost, none added
    assert set(after.cell[after.kimg >= final]) == set(after.cell)
    doc = json.loads(open(os.path.join(root, "pin.json")).read())
    assert doc["tuned"]["families"]["sid"]["trials"] == 4
