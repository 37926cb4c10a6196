"""Study files: expansion into cells, defaults, and strict validation with YAML lines."""
from __future__ import annotations

import os
import pathlib
import textwrap

import pytest

from harness.declare import config
from harness.declare.study import Study, StudyError, describe, load_study, parse_study

BAD = pathlib.Path(__file__).parent / "studies_bad"
BAD_FILES = sorted(BAD.glob("*.yaml"))


def study(text: str) -> Study:
    return parse_study(textwrap.dedent(text), source="s.yaml")


def error(text: str) -> str:
    with pytest.raises(StudyError) as e:
        study(text)
    return str(e.value)


PAPER = """\
    study: paper-digits
    data: {name: digits}
    teacher: {arch: unet-s, kimg: 2000, seed: 0}
    student: {sigma_init: 2.5, t_max: 0.8, kimg: 400, batch: 128, lr: 1.0e-4, aux_steps: 1, aux_init: teacher}
    eval: {metric: fd, n: 2000, every_kimg: 40}
    grid:
      loss: [di, sid, ratio_kl, ratio_js]
      init:
        - teacher
        - random
        - {reset_layers: {groups: [output]}}
        - {reset_layers: {groups: [encoder, middle, decoder]}}
        - {feature_transplant: {sigma_feat: [0.002, 0.2, 2.5, 20, 80]}}
      seed: [0, 1, 2]
    resources: {cpu: 1, gpu: 0}
"""


def test_design_example_expands():
    s = study(PAPER)
    assert s.name == "paper-digits"
    assert [a for a, _ in s.axes] == ["loss", "init", "seed"]
    assert len(s.cells) == 4 * 9 * 3
    assert len({c.config["init"]["name"] for c in s.cells}) == 4
    first, last = s.cells[0], s.cells[-1]
    assert first.axes == {"loss": "di", "init": "teacher", "seed": 0}
    assert last.axes == {"loss": "ratio_js", "init": "feature_transplant[80]", "seed": 2}
    assert last.config["loss"] == {"name": "ratio", "divergence": "js", "sigma": "schedule"}
    assert last.config["init"] == {"name": "feature_transplant", "sigma_feat": 80.0,
                                   "reset_output": False, "reinit": "matched"}
    assert last.config["seed"] == 2
    # the order is the cartesian product in YAML order: seed varies fastest
    assert [c.axes["seed"] for c in s.cells[:4]] == [0, 1, 2, 0]
    assert [c.index for c in s.cells] == list(range(len(s.cells)))
    assert s.resources == {"cpu": 1.0, "gpu": 0.0}
    assert s.max_failures == 0


def test_defaults_filled_and_configs_canonical():
    s = study("""\
        study: tiny
        student: {kimg: 10}
    """)
    assert len(s.cells) == 1 and s.cells[0].axes == {}
    cfg = s.cells[0].config
    assert set(cfg) == set(config.DEFAULTS)
    assert cfg["student"]["kimg"] == 10
    assert cfg["student"]["lr"] == config.DEFAULTS["student"]["lr"]
    assert cfg["teacher"] == config.DEFAULTS["teacher"]
    assert cfg["loss"] == {"name": "sid", "alpha": 1.2}
    assert cfg["init"] == {"name": "teacher"}
    assert config.resolve_cell(cfg) == cfg  # resolved through config: idempotent
    assert s.results_root == os.path.abspath("results/tiny")
    assert "resources" not in cfg and "max_failures" not in cfg


def test_brief_example_with_dotted_axis_and_fixed_settings():
    s = study("""\
        study: quick
        results: file:///tmp/quick-results
        data: {name: digits}
        teacher: {arch: unet-xs, kimg: 1200}
        student: {kimg: 100, batch: 64}
        eval: {n: 1000, every_kimg: 20}
        grid:
          loss: [di, sid, ratio_kl, ratio_js, {sid: {alpha: [1.0, 1.5]}}, {ratio: {divergence: rkl, sigma: fixed}}]
          init:
            - teacher
            - random
            - {reset_layers: {groups: [output]}}
            - {reset_layers: {groups: [[input, output], [encoder, middle, decoder]]}}
            - {feature_transplant: {sigma_feat: [0.002, 0.2, 2.5]}}
          seed: [0, 1, 2]
          student.lr: [1.0e-4, 3.0e-4]
        resources: {cpu: 2, gpu: 0.25}
        max_failures: 2
    """)
    assert s.results_root == "file:///tmp/quick-results"
    assert [a for a, _ in s.axes] == ["loss", "init", "seed", "student.lr"]
    assert len(s.cells) == 7 * 8 * 3 * 2
    assert s.resources == {"cpu": 2.0, "gpu": 0.25} and s.max_failures == 2
    losses = list(dict.fromkeys(c.axes["loss"] for c in s.cells))
    assert losses == ["di", "sid", "ratio_kl", "ratio_js", "sid[alpha=1]", "sid[alpha=1.5]",
                      "ratio_rkl[fixed]"]
    inits = list(dict.fromkeys(c.axes["init"] for c in s.cells))
    assert inits == ["teacher", "random", "reset_layers[output]", "reset_layers[input+output]",
                     "reset_layers[encoder+middle+decoder]", "feature_transplant[0.002]",
                     "feature_transplant[0.2]", "feature_transplant[2.5]"]
    cell = s.cells[1]
    assert cell.axes == {"loss": "di", "init": "teacher", "seed": 0, "student.lr": 3.0e-4}
    assert cell.config["student"]["lr"] == 3.0e-4
    assert cell.config["student"]["batch"] == 64  # fixed section kept
    assert cell.config["teacher"]["kimg"] == 1200
    assert s.fixed["student"] == {"kimg": 100, "batch": 64}
    # every cell is distinct
    assert len({repr(c.config) for c in s.cells}) == len(s.cells)


def test_list_of_lists_groups_expand_and_flat_list_is_one_value():
    s = study("""\
        study: groups
        grid:
          init:
            - {reset_layers: {groups: [decoder, encoder]}}
            - {reset_layers: {groups: [[output], [middle, input], [embedding]]}}
    """)
    assert [c.config["init"]["groups"] for c in s.cells] == [
        ["encoder", "decoder"], ["output"], ["input", "middle"], ["embedding"]]
    assert s.cells[0].axes["init"] == "reset_layers[encoder+decoder]"


def test_sigma_feat_and_param_products_expand():
    s = study("""\
        study: sweep
        grid:
          init: [{feature_transplant: {sigma_feat: [0.002, 0.02, 0.2, 2.5, 20, 80]}}]
          loss: [{ratio: {divergence: [kl, js], sigma: [schedule, fixed]}}, {name: sid, alpha: [1.0, 2]}]
    """)
    assert [v["sigma_feat"] for v in dict(s.axes)["init"]] == [0.002, 0.02, 0.2, 2.5, 20.0, 80.0]
    assert [config.loss_label(v) for v in dict(s.axes)["loss"]] == [
        "ratio_kl", "ratio_kl[fixed]", "ratio_js", "ratio_js[fixed]", "sid[alpha=1]", "sid[alpha=2]"]
    assert len(s.cells) == 6 * 6


def test_fixed_loss_init_seed_and_name_mapping():
    s = study("""\
        study: fixed
        loss: {name: sid, alpha: 1.0}
        init: {reset_layers: {groups: [output]}}
        seed: 7
        grid:
          student.aux_steps: [1, 2]
    """)
    assert s.fixed["loss"] == {"name": "sid", "alpha": 1.0}
    assert all(c.config["init"] == {"name": "reset_layers", "groups": ["output"],
                                    "reinit": "matched"} for c in s.cells)
    assert all(c.config["seed"] == 7 for c in s.cells)
    assert [c.axes for c in s.cells] == [{"student.aux_steps": 1}, {"student.aux_steps": 2}]


def test_yaml_1_1_exponent_strings_are_numbers():
    s = study("""\
        study: exp
        student: {lr: 1e-4}
        grid:
          student.aux_lr: [1e-4, 3e-4]
          loss: [{sid: {alpha: 1e0}}]
    """)
    assert s.cells[0].config["student"]["lr"] == 1e-4
    assert [c.config["student"]["aux_lr"] for c in s.cells] == [1e-4, 3e-4]
    assert s.cells[0].config["loss"]["alpha"] == 1.0


def test_ratio_kl_and_canonical_form_are_duplicates():
    msg = error("""\
        study: dup
        grid:
          loss: [ratio_kl, sid, {ratio: {divergence: kl}}]
    """)
    assert msg.startswith("s.yaml:3: grid.loss[2]: duplicate cell")
    assert "grid.loss[0]" in msg
    msg = error("""\
        study: dup
        grid:
          student.kimg: [100, 100.0]
    """)
    assert "s.yaml:3: grid.student.kimg[1]: duplicate cell" in msg
    assert "grid.init[1]: duplicate cell" in error("""\
        study: dup
        grid:
          init: [{reset_layers: {groups: [output, input]}}, {reset_layers: {groups: [input, output]}}]
    """)


def test_line_numbers_in_messages():
    msg = error("""\
        study: lines
        teacher: {arch: unet-xs}
        student:
          kimg: 100
          lr: fast
    """)
    assert msg.startswith("s.yaml:5: student.lr: expected a number, got 'fast'")
    assert "; write a number" in msg
    msg = error("""\
        study: lines
        grid:
          init:
            - teacher
            - {reset_layers: {groups: [output]}}
            - {reset_layers: {groups: [head]}}
    """)
    assert msg.startswith("s.yaml:6: grid.init[2].reset_layers.groups[0]: unknown group 'head'; "
                          "known: input, encoder, middle, decoder, output, embedding")
    with pytest.raises(StudyError) as e:
        study("study: x\ngrid: {seed: [0, 1]\n")
    assert e.value.line is not None and "YAML syntax error" in str(e.value)


def test_error_types():
    with pytest.raises(config.ConfigError):
        study("study: x\nstudent: {kimg: -1}\n")
    with pytest.raises(ValueError):
        study("[1, 2]")
    with pytest.raises(StudyError, match="empty"):
        study("")


def test_data_checks():
    s = study("""\
        study: toy
        data: {name: toy2d, kind: checkerboard}
        teacher: {arch: mlp}
        eval: {metric: mmd}
    """)
    assert s.cells[0].config["data"] == {"name": "toy2d", "path": None, "kind": "checkerboard",
                                         "resolution": None}
    s = study("""\
        study: cifar
        data: {name: cifar10, path: /data/cifar-10-batches-py}
        teacher: {arch: unet-s}
    """)
    assert s.cells[0].config["data"]["path"] == "/data/cifar-10-batches-py"  # not checked here
    assert "grid.data.name[1]: dataset 'npz' needs data.path" in error("""\
        study: data-axis
        grid:
          data.name: [digits, npz]
    """)
    assert "data.kind: only toy2d takes a kind" in error("""\
        study: kind
        data: {name: digits, kind: ring8}
    """)
    assert "grid.teacher.arch[1]: architecture 'mlp' is for toy2d" in error("""\
        study: arch
        grid:
          teacher.arch: [unet-xs, mlp]
    """)


def test_other_rejections():
    assert "grid: expected a mapping of axes" in error("study: x\ngrid: [loss, init]\n")
    assert "resources.gpu: a fraction of a GPU must be below 1" in error(
        "study: x\nresources: {gpu: 1.5}\n")
    assert "resources.memory: unknown key" in error("study: x\nresources: {memory: 1}\n")
    assert "grid.seed[1]: expected a whole number" in error("study: x\ngrid: {seed: [0, a]}\n")
    assert "grid.loss[0].ratio_kl.divergence: ratio_kl fixes divergence='kl'" in error(
        "study: x\ngrid: {loss: [{ratio_kl: {divergence: js}}]}\n")
    assert "grid.loss[0]: expected a loss name or a one-key mapping" in error(
        "study: x\ngrid: {loss: [3]}\n")
    assert "student.lr: a value is required, got null" in error("study: x\nstudent: {lr: }\n")
    assert "results: expected a path or URI" in error("study: x\nresults: 3\n")


def test_load_study_and_describe(tmp_path):
    path = tmp_path / "quick.yaml"
    path.write_text(textwrap.dedent("""\
        study: quick
        description: a smoke study
        results: out/quick
        grid:
          loss: [di, ratio_js]
          seed: [0, 1]
    """))
    s = load_study(str(path))
    assert s.path == str(path) and s.description == "a smoke study"
    assert s.results_root == os.path.abspath("out/quick")
    text = describe(s)
    assert "quick" in text and "4 cells" in text
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("#"))
    assert lines[header].split() == ["#", "loss", "seed"]
    assert [line.split() for line in lines[header + 1:]] == [
        ["0", "di", "0"], ["1", "di", "1"], ["2", "ratio_js", "0"], ["3", "ratio_js", "1"]]
    text = describe(s, ids=["a" * 12, "b" * 12, "c" * 12, "d" * 12], notes=["done", "", "", "new"])
    assert "aaaaaaaaaaaa" in text and text.splitlines()[-1].endswith("new")
    with pytest.raises(StudyError, match="no such study file"):
        load_study(str(tmp_path / "missing.yaml"))


def test_there_are_enough_malformed_files():
    assert len(BAD_FILES) >= 14


@pytest.mark.parametrize("path", BAD_FILES, ids=[p.stem for p in BAD_FILES])
def test_malformed_study(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name}: first line must be '# expect: ...'"
    expected = first[len("# expect: "):]
    with pytest.raises(StudyError) as e:
        load_study(str(path))
    message = str(e.value)
    assert message.startswith(str(path))
    assert expected in message


OVERRIDABLE = textwrap.dedent("""\
    study: ov
    data: {name: digits}
    student: {kimg: 100, batch: 64}
    grid:
      loss: [di, sid]
      init: [teacher, mapping_match, {mapping_match: {lr: 0.01}}, {name: random}]
      seed: [0, 1, 2]
    resources: {cpu: 8, gpu: 1}
    """)


def test_set_overrides_a_study_as_if_its_file_said_so():
    """``harness run/status --set``: sections, resources, a grid axis's values and an init
    scheme's parameter wherever that scheme is used; the cells are those of the edited file."""
    s = parse_study(OVERRIDABLE, "ov.yaml", overrides={
        "student": {"kimg": 0.5}, "resources": {"gpu": 0}, "grid": {"seed": [0]},
        "init": {"mapping_match.steps": 3}})
    assert len(s.cells) == 2 * 4 and s.resources == {"cpu": 8.0, "gpu": 0.0}
    assert {c.config["student"]["kimg"] for c in s.cells} == {0.5}
    maps = [c.config["init"] for c in s.cells if c.config["init"]["name"] == "mapping_match"]
    assert {(m["steps"], m["lr"]) for m in maps} == {(3, 0.001), (3, 0.01)}
    edited = OVERRIDABLE.replace("kimg: 100", "kimg: 0.5").replace("gpu: 1", "gpu: 0").replace(
        "seed: [0, 1, 2]", "seed: [0]").replace("[teacher, mapping_match,", "[teacher, "
        "{mapping_match: {steps: 3}},").replace("{lr: 0.01}", "{lr: 0.01, steps: 3}")
    assert [c.config for c in parse_study(edited).cells] == [c.config for c in s.cells]
    assert parse_study(OVERRIDABLE).cells[0].config["student"]["kimg"] == 100  # file untouched


@pytest.mark.parametrize("overrides, match", [
    ({"grid": {"sed": [0]}}, r"--set grid.sed: the study has no grid axis 'sed'"),
    ({"init": {"mapping_match.stps": 3}}, r"--set init.mapping_match.stps: expected "
                                          r"init.SCHEME.PARAM"),
    ({"init": {"feature_transplant.reinit": "fresh"}}, r"no init of the study is "
                                                       r"'feature_transplant'"),
    ({"tracking": {"x": 1}}, r"'tracking' cannot be set on the command line"),
])
def test_set_that_fits_nothing_is_refused(overrides, match):
    with pytest.raises(config.ConfigError, match=match):
        parse_study(OVERRIDABLE, "ov.yaml", overrides=overrides)


def test_bad_set_value_is_blamed_on_set_not_the_file():
    for overrides, where in (({"resources": {"gpu": -1}}, "--set: resources.gpu: must be"),
                             ({"grid": {"seed": ["a"]}}, "--set: grid.seed[0]: expected"),
                             ({"init": {"mapping_match.steps": -3}}, "--set: grid.init[1]")):
        with pytest.raises(StudyError) as e:
            parse_study(OVERRIDABLE, "ov.yaml", overrides=overrides)
        assert str(e.value).startswith(where), str(e.value)
    with pytest.raises(StudyError, match=r"^ov.yaml:3: student.kimg"):  # the file's own error
        parse_study(OVERRIDABLE.replace("kimg: 100", "kimg: -1"), "ov.yaml",
                    overrides={"grid": {"seed": [0]}})
