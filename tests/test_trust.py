"""What the harness reads cannot run code, hang it or take a study down (fast tier).

Each hostile file carries a payload that would create a marker file if any code from it ran;
the tests assert the marker never appears, the harness's own refusal (exit 2 or a clean
carry-on), and that stored results that were intact stay byte-identical.
"""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from harness.core import data


class Payload:
    """Unpickling this runs ``open(marker, 'w')``: the proof that code from a file ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _cifar_folder(folder, batch):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(1, 6):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return folder


def test_cifar_batches_are_read_as_data_only(tmp_path):
    rng = np.random.default_rng(0)
    good = {b"batch_label": b"training batch 1 of 5", b"labels": list(range(10)) * 2,
            b"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8),
            b"filenames": [b"x.png"] * 20}
    ds = data.load("cifar10", str(_cifar_folder(tmp_path / "good", good)))
    assert ds.x.shape == (100, 3, 32, 32) and ds.labels.shape == (100,)
    marker = tmp_path / "ran"
    bad = _cifar_folder(tmp_path / "bad", {**good, b"labels": Payload(marker)})
    with pytest.raises(data.DataError, match="data_batch_1.*not allowed in a CIFAR-10 batch"):
        data.load("cifar10", str(bad))
    assert not marker.exists()


def _plant(path, marker):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(Payload(marker), f)


def test_fidelity_feature_cache_is_never_unpickled(tmp_path):
    """torch-fidelity loads its feature cache with weights_only=False: the harness keeps
    reference features in memory instead, so payloads planted under every name the library's
    cache would use in the shared cache folder are never read."""
    import torch
    import torch_fidelity

    from harness.core import metrics

    digits = data.load("digits")
    cache = tmp_path / "cache"
    ev = metrics.Evaluator(digits, 20, str(cache), extractor="shipped")
    marker = tmp_path / "ran"
    folder = cache / "fidelity" / torch_fidelity.__version__
    name, fe = ev._ref_cache_name, ev._fe_name
    for item in ("128", "logits"):
        _plant(str(folder / f"{name}-{fe}-features-{item}.pt"), marker)
    _plant(str(folder / f"{name}-{fe}-stat-fid-128.pt"), marker)
    x = torch.from_numpy(digits.x[:20])
    first, again = ev(x), ev(x)
    assert first == again and np.isfinite(first["fd_digits_20"])
    assert not marker.exists()


def _inception_state():
    """A random state dict of torch-fidelity's InceptionV3 (the real file is not needed)."""
    import io

    import torch
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):
            return None

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    torch.manual_seed(0)
    return Unloaded("x", ["2048"], feature_extractor_weights_path=empty).state_dict()


def _tiny_npz(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "tiny.npz", x=x)
    return data.load("npz", str(tmp_path / "tiny.npz"))


def test_hostile_inception_weights_run_no_code(tmp_path):
    from harness.core import metrics

    ds = _tiny_npz(tmp_path)
    marker = tmp_path / "ran"
    bad = tmp_path / "hostile.pth"
    _plant(str(bad), marker)
    with pytest.raises(metrics.MetricsError, match="is not a plain weights file"):
        metrics.Evaluator(ds, 2, str(tmp_path / "c"), metric="fid", inception_weights=str(bad))
    assert not marker.exists()


@pytest.mark.slow
def test_inception_weights_are_handed_to_fidelity_as_tensors(tmp_path):
    """About a minute on 2 busy CPU cores (InceptionV3 at 299x299)."""
    import torch

    from harness.core import metrics

    ds = _tiny_npz(tmp_path)
    good = tmp_path / "inception.pth"
    torch.save(_inception_state(), good)
    ev = metrics.Evaluator(ds, 2, str(tmp_path / "c"), metric="fid", inception_weights=str(good))
    out = ev(torch.from_numpy(ds.x[:2]))
    assert set(out) == {"fid_inception_2", "kid_inception_2"} and np.isfinite(out["fid_inception_2"])
    assert ev.identity["extractor"] == "inception-v3-compat"


def test_ray_state_restores_only_when_its_ledger_verifies(tmp_path, monkeypatch):
    """The ledger signs each version of Ray's state files with the user's own key: a planted
    or changed file, or a folder whose ledger was made with another key, does not verify."""
    from harness.store import signed

    monkeypatch.setenv("HARNESS_KEY_FILE", str(tmp_path / "key"))
    where = tmp_path / "tune" / "exp"
    (where / "trial_1" / "checkpoint_000001").mkdir(parents=True)
    (where / "tuner.pkl").write_bytes(b"state v1")
    (where / "trial_1" / "params.pkl").write_bytes(b"params")
    (where / "trial_1" / "checkpoint_000001" / "seed-0.pt").write_bytes(b"harness data")
    ledger = signed.Ledger(str(where))
    ledger.record()
    assert signed.unverified(str(where)) == []
    (where / "tuner.pkl").write_bytes(b"state v2")  # Ray rewrites it: recorded, still verifies
    ledger.record()
    assert signed.unverified(str(where)) == []
    marker = tmp_path / "ran"
    _plant(str(where / "tuner.pkl"), marker)
    (where / "experiment_state-x.json").write_text("{}")
    assert signed.unverified(str(where)) == ["experiment_state-x.json", "tuner.pkl"]
    signed.set_aside(str(where), signed.unverified(str(where)))
    assert signed.unverified(str(where)) == [] and (where / "tuner.pkl.unverified").exists()
    (where / "tuner.pkl").write_bytes(b"state v2")
    monkeypatch.setenv("HARNESS_KEY_FILE", str(tmp_path / "other-key"))  # another user's copy
    assert signed.unverified(str(where)) == ["trial_1/params.pkl", "tuner.pkl"]
    assert oct(os.stat(tmp_path / "key").st_mode & 0o777) == "0o600"
    assert not marker.exists()


# ---- hostile EDM pickles: bounded work and memory, records checked, loads independent ------

def _edm(tmp_path, name, extra=None):
    from edm_pickles import small_net, write_snapshot

    path = tmp_path / name
    write_snapshot(path, small_net(), extra=extra)
    return path


class _PastStorage:
    """Pickles as a tensor record of 2**28 floats over a storage of 4."""

    def __reduce__(self):
        import collections

        import torch

        return (torch._utils._rebuild_tensor_v2,
                (torch.zeros(4).storage(), 0, (1 << 28,), (1,), False, collections.OrderedDict()))


def test_hostile_edm_pickles_are_refused_within_bounds(tmp_path):
    import resource

    from harness.core.edm_import import EDMImportError, load_edm_pickle

    good = _edm(tmp_path, "good.pkl")
    state, _ = load_edm_pickle(str(good))
    shared = []  # 8 references per level, 12 levels: a walk would make 8**12 visits
    for _ in range(12):
        shared = [shared] * 8
    for name, extra, match in [
            ("shared.pkl", {"dataset_kwargs": {"x": shared}}, "repeat shared references"),
            ("past.pkl", {"junk": _PastStorage()}, "reaches past its storage")]:
        path = _edm(tmp_path, name, extra)
        assert path.stat().st_size < 4 * good.stat().st_size
        with pytest.raises(EDMImportError, match=match):
            load_edm_pickle(str(path))
    memo = tmp_path / "memo.pkl"  # 9 bytes: None, memo index 2**31 - 1
    memo.write_bytes(b"\x80\x02Nr\xff\xff\xff\x7f.")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(EDMImportError, match="expected a dict"):
        load_edm_pickle(str(memo))
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KB
    shape = tmp_path / "shape.pkl"  # a record whose _parameters is a list, not a dict
    shape.write_bytes(pickle.dumps({"ema": _Rec({"_parameters": [1, 2]})}, protocol=2)
                      .replace(b"test_trust\n_reconstruct", b"torch_utils.persistence\n"
                               b"_reconstruct_persistent_obj"))
    with pytest.raises(EDMImportError, match="not a readable EDM pickle"):
        load_edm_pickle(str(shape))
    fifo = tmp_path / "fifo.pkl"
    os.mkfifo(fifo)
    with pytest.raises(EDMImportError, match="is not a regular file"):
        load_edm_pickle(str(fifo))
    # a pickle that sets attributes on a record class is refused, and later loads are unchanged
    poison = tmp_path / "poison.pkl"
    poison.write_bytes(b"\x80\x02ctorch.nn.modules.container\nModuleDict\nN}X\x0c\x00\x00\x00"
                       b"__setstate__Ns\x86b.")
    with pytest.raises(EDMImportError, match="sets the state of a type"):
        load_edm_pickle(str(poison))
    again, _ = load_edm_pickle(str(good))
    assert again.keys() == state.keys() and all(again[k].equal(state[k]) for k in state)


def _reconstruct(meta):  # renamed to EDM's persistence function inside the pickle's bytes
    raise AssertionError


class _Rec:
    def __init__(self, state):
        self.state = state

    def __reduce__(self):
        return (_reconstruct, ({"type": "class", "class_name": "EDMPrecond", "module_src": "",
                                "state": self.state},))


# ---- writes never follow links ----------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "results_small")


def _tree_digest(folder):
    import hashlib

    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(folder)):
        for f in sorted(files):
            with open(os.path.join(dirpath, f), "rb") as fh:
                h.update(f.encode() + fh.read())
    return h.hexdigest()


def test_figures_never_write_through_links(tmp_path, capsys):
    import shutil

    from harness.cli import main

    root = tmp_path / "root"
    shutil.copytree(FIXTURE, root)
    rows = _tree_digest(root / "rows")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (root / "figures").mkdir(exist_ok=True)
    (root / "figures" / "heatmap.png").symlink_to(victim)
    study = os.path.join(ROOT, "studies", "quick.yaml")
    assert main(["figures", study, "--results", str(root), "--only", "heatmap"]) == 0
    assert victim.read_text() == "precious"
    assert not os.path.islink(root / "figures" / "heatmap.png")
    assert "removed the symlink" in capsys.readouterr().out
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.rmtree(root / "figures")
    (root / "figures").symlink_to(outside)
    assert main(["figures", study, "--results", str(root), "--only", "heatmap"]) == 2
    assert "outside the results folder" in " ".join(capsys.readouterr().err.split())
    assert os.listdir(outside) == []
    os.unlink(root / "figures")
    (root / "figures").write_text("a file in the way")
    assert main(["figures", study, "--results", str(root), "--only", "heatmap"]) == 2
    assert "a file is in the way" in " ".join(capsys.readouterr().err.split())
    assert _tree_digest(root / "rows") == rows


# ---- stored state that takes a study down --------------------------------------------------

def test_truncated_parquet_part_is_quarantined(tmp_path, capsys):
    import glob
    import shutil

    from harness.store import results
    from harness.cli import main

    root = tmp_path / "root"
    shutil.copytree(FIXTURE, root)
    whole = results.load_rows(str(root))
    parts = sorted(glob.glob(str(root / "rows" / "part-*.parquet")))
    victim = parts[len(parts) // 2]
    lost = results.load_rows(str(root)).merge(
        results.read_parts(results.filesystem(victim)[0], [victim], results.ROWS).to_pandas()[
            results.KEY], on=results.KEY)
    others = {p: open(p, "rb").read() for p in parts if p != victim}
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    study = os.path.join(ROOT, "studies", "quick.yaml")
    assert main(["figures", study, "--results", str(root), "--only", "heatmap"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert f"the results file {victim} is unreadable" in err and "every other row is used" in err
    # figures (like status and report) holds no lock: it reads, writes nothing, moves nothing
    assert "left in place (moved aside by the next command that holds" in err
    assert os.path.exists(victim) and not (root / "rows" / "quarantine").exists()
    assert all(open(p, "rb").read() == b for p, b in others.items())
    assert len(results.load_rows(str(root))) >= len(whole) - len(lost)
    capsys.readouterr()
    assert main(["compact", study, "--results", str(root)]) == 0  # holds the lock: moves it
    assert f"moved to {root}/rows/quarantine/" in " ".join(capsys.readouterr().err.split())
    assert os.path.exists(root / "rows" / "quarantine" / os.path.basename(victim))
    assert not os.path.exists(victim) and not results.HELD
    assert len(results.load_rows(str(root))) >= len(whole) - len(lost)


def test_stale_lock_with_a_reused_pid_is_taken_over(tmp_path, capsys):
    import json
    import socket

    from harness.store import lock

    root = tmp_path / "root"
    root.mkdir()
    me = os.getpid()
    # a lock left by a dead process whose PID now belongs to a live one (here: this process)
    (root / ".lock").write_text(json.dumps({"pid": me, "host": socket.gethostname(),
                                            "started_at": "earlier", "process_start": "x/1"}))
    # the dead driver's orphaned workers still write a row file 1 s into the takeover: the new
    # run plans only once rows have been quiet for QUIET_S
    import threading
    import time

    (root / "rows").mkdir()
    late = threading.Timer(1.0, lambda: (root / "rows" / "part-late.parquet").write_bytes(b""))
    t0 = time.monotonic()
    late.start()
    with lock.acquire_lock(str(root)):
        assert time.monotonic() - t0 >= 1.0 + lock.QUIET_S
        assert "taking over the stale lock" in capsys.readouterr().err
        held = json.loads((root / ".lock").read_text())
        assert held["process_start"] == lock.process_start(me)
        with pytest.raises(lock.LockedError, match=f"process {me} on host"):
            lock.acquire_lock(str(root))  # the live holder, named truly
    (tmp_path / "file").write_text("x")
    from harness.store.results import RootError

    with pytest.raises(RootError, match="is a file, not a folder"):
        lock.acquire_lock(str(tmp_path / "file"))


def test_hand_edited_pin_is_one_paragraph(tmp_path, capsys):
    import shutil

    from harness.cli import main

    root = tmp_path / "root"
    shutil.copytree(FIXTURE, root)
    rows = _tree_digest(root / "rows")
    study = os.path.join(ROOT, "studies", "quick.yaml")
    for text in ('{"current": "c-di-teacher-s0"}', '{"current": [', "[1, 2]"):
        (root / "pin.json").write_text(text)
        assert main(["figures", study, "--results", str(root), "--only", "heatmap"]) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert f"{root}/pin.json is not a pin file" in err and "Traceback" not in err
    assert _tree_digest(root / "rows") == rows


def test_bit_flipped_checkpoint_is_reported_and_skipped(tmp_path, capsys):
    import time
    import types

    import pyarrow.fs as pafs
    import torch

    from harness.core import io as hio
    from harness.orchestrate.trainables import _resume_into

    storage = tmp_path / "ray"
    older, newer = storage / "a" / "cell.pt", storage / "b" / "cell.pt"
    hio.save_checkpoint({"step": 1}, str(older))
    time.sleep(0.05)
    hio.save_checkpoint({"step": 2}, str(newer))
    assert hio.checkpoint_ok(str(newer))
    hio.save_checkpoint({"step": 3}, str(newer))  # the digest of the one before still counts
    raw = bytearray(newer.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    newer.write_bytes(bytes(raw))
    assert not hio.checkpoint_ok(str(newer))
    ckpt = tmp_path / "local" / "cell.pt"
    ckpt.parent.mkdir()
    previous = types.SimpleNamespace(filesystem=pafs.LocalFileSystem(), path=str(newer.parent))
    _resume_into(str(ckpt), str(storage), "a/cell.pt", previous=previous)
    err = " ".join(capsys.readouterr().err.split())
    assert f"the stored checkpoint {newer} does not match its recorded sha256" in err
    assert torch.load(ckpt, weights_only=True) == {"step": 1} and hio.checkpoint_ok(str(ckpt))


# ---- careless input that hangs or crashes ----------------------------------------------------

def test_png_bomb_in_a_folder_dataset_is_a_data_error(tmp_path):
    import struct
    import zlib

    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")

    def chunk(kind, body):
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    side = 10_000  # a 100-megapixel claim (under PIL's own refusal) in a few hundred bytes
    bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 4096)) + chunk(b"IEND", b""))
    (folder / "b.png").write_bytes(bomb)
    with pytest.raises(data.DataError, match="b.png.*claims 10000x10000 pixels"):
        data.load("folder", str(folder))


def test_study_file_and_command_line_values_are_bounded(tmp_path):
    import subprocess
    import sys

    def harness(*args):
        p = subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True,
                           text=True, timeout=120, cwd=tmp_path)
        return p.returncode, " ".join(p.stderr.split())

    fifo = tmp_path / "s.yaml"
    os.mkfifo(fifo)
    code, err = harness("run", str(fifo), "--dry-run")
    assert code == 2 and "not a regular text file" in err
    big = tmp_path / "big.yaml"
    big.write_text("study: big\ndata: {name: toy2d}\ngrid:\n"
                   f"  seed: [{', '.join(map(str, range(2000)))}]\n"
                   f"  student.lr: [{', '.join(str(1e-4 * (1 + i / 1000)) for i in range(1000))}]\n")
    code, err = harness("run", str(big), "--dry-run")
    assert code == 2 and "the grid has 2,000,000 cells" in err
    # --set values go through the study file's reader (what `harness cell --set` calls before
    # anything else; StudyError is one of the CLI's user errors: exit 2)
    from harness.cli import _overrides, _user_errors
    from harness.declare.study_yaml import StudyError

    assert issubclass(StudyError, _user_errors())
    marker = tmp_path / "ran"
    for value, words in [("&a [*a, *a]", "anchors and aliases are not allowed"),
                         ("[[[[", "YAML syntax error"),
                         (f"!!python/object/apply:os.system [touch {marker}]", "YAML tag refused"),
                         ("9" * 5000, "a value cannot be read")]:
        with pytest.raises(StudyError, match=words) as e:
            _overrides([f"student.lr={value}"])
        assert str(e.value).startswith("--set student.lr") and len(str(e.value)) < 1000
    assert not marker.exists()
