"""Cell and teacher ids, pin.json, the study lock, and the no-torch/no-Ray promise."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from harness import __version__
from harness.declare import hashing
from harness.store import results
from harness.store.lock import LockedError, acquire_lock
from harness.declare.hashing import PinError, canonical_json, cell_id, identity, teacher_id
from harness.store.pins import pin_study, read_pin
from harness.declare.study import parse_study

FP = "0123456789abcdef"

BASE = """\
study: pins
data: {name: digits}
teacher: {arch: unet-xs, kimg: 50}
student: {kimg: 10, lr: 1.0e-4}
grid:
  loss: [di, ratio_js]
  init: [teacher, {reset_layers: {groups: [output]}}]
  seed: [0, 1]
resources: {cpu: 1, gpu: 0}
max_failures: 1
"""


def study(text=BASE):
    return parse_study(text)


def ids(s, fp=FP):
    return [cell_id(c.config, fp) for c in s.cells]


def test_canonical_json():
    assert canonical_json({"b": 1e-4, "a": [1.0, 2]}) == '{"a":[1,2],"b":0.0001}'
    assert canonical_json({"x": 0.0001}) == canonical_json({"x": 1e-4})
    assert canonical_json({"x": 1200}) == canonical_json({"x": 1200.0})
    assert canonical_json({"x": True, "y": None, "z": (1, "a")}) == '{"x":true,"y":null,"z":[1,"a"]}'
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})


def test_ids_stable_and_order_independent():
    s = study()
    a = ids(s)
    assert a == ids(study()) and len(set(a)) == len(a) == 8
    assert all(len(i) == 12 and int(i, 16) >= 0 for i in a)
    cfg = s.cells[0].config
    shuffled = {k: (dict(reversed(list(v.items()))) if isinstance(v, dict) else v)
                for k, v in reversed(list(cfg.items()))}
    assert cell_id(shuffled, FP) == a[0]
    assert teacher_id(shuffled, FP) == teacher_id(cfg, FP)
    assert teacher_id(cfg, FP).startswith("t-") and len(teacher_id(cfg, FP)) == 14
    # a partial config means the same as its resolution; ints and floats alike
    assert cell_id({"loss": "ratio_js", "student": {"kimg": 10.0, "lr": 1e-4},
                    "teacher": {"kimg": 50}, "seed": 0}, FP) == cell_id(
        {**cfg, "loss": {"name": "ratio", "divergence": "js", "sigma": "schedule"}}, FP)
    # the same config in a study of another shape has the same id
    other = study(BASE.replace("seed: [0, 1]", "seed: [1, 5]"))
    assert cell_id(other.cells[0].config, FP) == a[1]
    # extra keys (scheduling) never enter
    assert cell_id({**cfg, "resources": {"gpu": 1}, "max_failures": 3}, FP) == a[0]


def test_fixed_setting_change_changes_every_id_and_teacher():
    a, s = ids(study()), study()
    b = ids(study(BASE.replace("student: {kimg: 10", "student: {kimg: 20")))
    assert not set(a) & set(b)
    assert teacher_id(s.cells[0].config, FP) == teacher_id(
        study(BASE.replace("student: {kimg: 10", "student: {kimg: 20")).cells[0].config, FP)
    c = study(BASE.replace("kimg: 50", "kimg: 60"))
    assert not set(a) & set(ids(c))
    assert teacher_id(c.cells[0].config, FP) != teacher_id(s.cells[0].config, FP)
    assert not set(a) & set(ids(s, fp="fedcba9876543210"))
    assert len({teacher_id(c.config, FP) for c in s.cells}) == 1


def test_resources_and_data_path_do_not_change_ids():
    a = ids(study())
    assert ids(study(BASE.replace("{cpu: 1, gpu: 0}", "{cpu: 4, gpu: 0.5}")
                     .replace("max_failures: 1", "max_failures: 5"))) == a
    x = parse_study("study: c\ndata: {name: cifar10, path: /a/cifar}\n").cells[0].config
    y = parse_study("study: c\ndata: {name: cifar10, path: /b/cifar}\n").cells[0].config
    assert cell_id(x, FP) == cell_id(y, FP) and teacher_id(x, FP) == teacher_id(y, FP)


def test_pin_study_writes_and_reuses(tmp_path):
    root = str(tmp_path / "res")
    s = study()
    pin = pin_study(s, root, FP)
    assert [i for i, _ in pin.current] == ids(s) == pin.new
    assert pin.orphaned == [] and len(pin.teachers) == 1
    doc = json.loads((tmp_path / "res" / "pin.json").read_text())
    assert doc["study"] == "pins" and doc["version"] == __version__
    assert doc["current"] == ids(s) and doc["fingerprints"] == {"digits": FP}
    entry = doc["cells"][ids(s)[0]]
    assert entry["axes"] == {"loss": "di", "init": "teacher", "seed": 0}
    assert entry["config"] == s.cells[0].config and entry["data_fingerprint"] == FP
    assert entry["teacher"] in doc["teachers"] and "pinned_at" in entry
    # the teacher's identity: execution-only settings and the legacy fp32 precision left out
    assert doc["teachers"][entry["teacher"]]["teacher"] == identity(s.cells[0].config)["teacher"]
    assert "compile" not in doc["teachers"][entry["teacher"]]["teacher"]
    # again: nothing new, file unchanged
    before = (tmp_path / "res" / "pin.json").read_bytes()
    again = pin_study(study(), root, FP)
    assert again.new == [] and again.ids == pin.ids
    assert (tmp_path / "res" / "pin.json").read_bytes() == before


def test_adding_a_seed_pins_only_new_cells_and_keeps_entries(tmp_path):
    root = str(tmp_path)
    old = pin_study(study(), root, FP)
    text_before = (tmp_path / "pin.json").read_text()
    doc_before = json.loads(text_before)
    bigger = study(BASE.replace("seed: [0, 1]", "seed: [0, 1, 2]"))
    pin = pin_study(bigger, root, FP)
    assert len(pin.current) == 12
    assert set(pin.new) == set(pin.ids) - set(old.ids) and len(pin.new) == 4
    assert all(cell.axes["seed"] == 2 for cid, cell in pin.current if cid in pin.new)
    doc = json.loads((tmp_path / "pin.json").read_text())
    text_after = (tmp_path / "pin.json").read_text()
    for cid in old.ids:
        assert doc["cells"][cid] == doc_before["cells"][cid]
        entry = json.dumps(doc_before["cells"][cid], sort_keys=True, indent=2)
        assert entry.replace("\n", "\n    ") in text_after  # byte-identical in the file
    assert pin.orphaned == []


def test_removing_values_lists_orphans(tmp_path):
    root = str(tmp_path)
    full = pin_study(study(), root, FP)
    smaller = study(BASE.replace("loss: [di, ratio_js]", "loss: [ratio_js]"))
    pin = pin_study(smaller, root, FP)
    assert pin.new == []
    gone = [cid for cid, cell in full.current if cell.axes["loss"] == "di"]
    assert pin.orphaned == gone and len(gone) == 4
    doc = read_pin(root)
    assert set(doc["cells"]) == set(full.ids) and doc["current"] == pin.ids
    # and back: nothing new, nothing orphaned
    back = pin_study(study(), root, FP)
    assert back.new == [] and back.orphaned == []


def test_fingerprint_change_is_drift(tmp_path):
    root = str(tmp_path)
    first = pin_study(study(), root, FP)
    pin = pin_study(study(), root, {"digits": "ffffffffffffffff"})
    assert set(pin.new) == set(pin.ids) and set(pin.orphaned) == set(first.ids)
    assert any("digits" in n and "changed" in n for n in pin.notes)


def test_dry_pin_writes_nothing(tmp_path):
    pin = pin_study(study(), str(tmp_path), FP, write=False)
    assert len(pin.new) == 8 and not (tmp_path / "pin.json").exists()


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b'{"study": "pins"}', b"\xff\xfe"])
def test_corrupt_pin_is_never_overwritten(tmp_path, content):
    (tmp_path / "pin.json").write_bytes(content)
    with pytest.raises(PinError) as e:
        pin_study(study(), str(tmp_path), FP)
    assert "pin.json" in str(e.value) and "aside" in str(e.value)
    assert (tmp_path / "pin.json").read_bytes() == content


def test_pin_of_another_study_is_refused(tmp_path):
    pin_study(study(), str(tmp_path), FP)
    before = (tmp_path / "pin.json").read_bytes()
    with pytest.raises(PinError, match="belongs to study 'pins'"):
        pin_study(study(BASE.replace("study: pins", "study: other")), str(tmp_path), FP)
    assert (tmp_path / "pin.json").read_bytes() == before


def test_pin_on_file_uri(tmp_path):
    uri = "file://" + str(tmp_path / "uri-root")
    pin = pin_study(study(), uri, FP)
    assert (tmp_path / "uri-root" / "pin.json").exists()
    assert pin_study(study(), uri, FP).new == [] and read_pin(uri)["current"] == pin.ids
    with acquire_lock(uri):
        assert (tmp_path / "uri-root" / ".lock").exists()
        with pytest.raises(LockedError):
            acquire_lock(uri)
    assert not (tmp_path / "uri-root" / ".lock").exists()


def test_pin_and_lock_on_a_subtree_filesystem(tmp_path, monkeypatch):
    import pyarrow.fs as pafs

    base = tmp_path / "bucket"
    base.mkdir()
    real = results.filesystem

    def filesystem(root):
        if root.startswith("sub://"):
            return pafs.SubTreeFileSystem(str(base), pafs.LocalFileSystem()), root[len("sub://"):]
        return real(root)

    monkeypatch.setattr(results, "filesystem", filesystem)
    root = "sub://studies/pins"
    pin = pin_study(study(), root, FP)
    assert (base / "studies" / "pins" / "pin.json").exists()
    assert pin_study(study(), root, FP).new == [] and read_pin(root)["current"] == pin.ids
    with acquire_lock(root) as lock:
        assert (base / "studies" / "pins" / ".lock").exists()
        with pytest.raises(LockedError, match=str(os.getpid())):
            acquire_lock(root)
        assert lock.held
    assert not (base / "studies" / "pins" / ".lock").exists()


def test_second_lock_is_refused(tmp_path):
    root = str(tmp_path / "r")
    with acquire_lock(root):
        info = json.loads((tmp_path / "r" / ".lock").read_text())
        assert info["pid"] == os.getpid() and info["host"] and info["started_at"]
        with pytest.raises(LockedError) as e:
            acquire_lock(root)
        message = str(e.value)
        assert str(os.getpid()) in message and info["host"] in message
        assert "delete the lock file" in message and ".lock" in message
    assert not (tmp_path / "r" / ".lock").exists()
    with acquire_lock(root):  # free again
        pass


def _dead_pid() -> int:
    proc = subprocess.Popen(["sleep", "0"])
    proc.wait()
    return proc.pid


def test_stale_lock_is_taken_over(tmp_path, capsys):
    import socket

    stale = {"pid": _dead_pid(), "host": socket.gethostname(), "started_at": "2020-01-01T00:00:00+00:00"}
    (tmp_path / ".lock").write_text(json.dumps(stale))
    with acquire_lock(str(tmp_path)):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert "stale" in capsys.readouterr().err
    assert not (tmp_path / ".lock").exists()
    assert not list(tmp_path.iterdir())  # the stale file was removed, not left aside


def test_lock_of_another_host_is_respected(tmp_path):
    other = {"pid": _dead_pid(), "host": "some-other-node", "started_at": "2020-01-01T00:00:00+00:00"}
    (tmp_path / ".lock").write_text(json.dumps(other))
    with pytest.raises(LockedError, match="some-other-node"):
        acquire_lock(str(tmp_path))
    assert json.loads((tmp_path / ".lock").read_text()) == other


def test_study_and_pin_import_no_torch_or_ray(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        from harness.declare.study import parse_study, describe
        from harness.store.lock import acquire_lock
        from harness.store.pins import pin_study
        s = parse_study({BASE!r})
        describe(s)
        with acquire_lock({str(tmp_path)!r}):
            pin_study(s, {str(tmp_path)!r}, "abc")
        bad = [m for m in ("torch", "ray") if m in sys.modules]
        assert not bad, bad
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=str(pathlib.Path(__file__).parent.parent))
    assert out.returncode == 0, out.stderr


def test_imported_teacher_id_is_its_file_content(tmp_path):
    """``teacher.import``: the teacher id is ``t-`` + the file's sha256 (what
    ``teacher.load_imported`` reports), the same file at another path gives the same ids."""
    import hashlib
    import shutil

    from harness.declare.config import ConfigError

    a = tmp_path / "a.pkl"
    a.write_bytes(b"not really a pickle, only its bytes are hashed here")
    b = tmp_path / "sub" / "b.pkl"
    b.parent.mkdir()
    shutil.copy(a, b)
    sha = hashlib.sha256(a.read_bytes()).hexdigest()
    cfg = {"data": {"name": "digits"}, "teacher": {"arch": "ddpmpp", "import": str(a)}}
    moved = {**cfg, "teacher": {"arch": "ddpmpp", "import": str(b)}}
    assert hashing.teacher_id(cfg, "fp") == hashing.teacher_id(moved, "fp") == "t-" + sha[:12]
    assert hashing.cell_id(cfg, "fp") == hashing.cell_id(moved, "fp")
    with pytest.raises(ConfigError, match="teacher.arch: ddpmpp"):
        hashing.teacher_id({**cfg, "teacher": {"import": str(a)}}, "fp")
    with pytest.raises(ConfigError, match="does not exist"):
        hashing.teacher_id({**cfg, "teacher": {"arch": "ddpmpp", "import": str(tmp_path / "x")}}, "fp")
