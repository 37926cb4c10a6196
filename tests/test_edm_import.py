"""harness.core.edm_import: EDM pickles read without executing anything from them.

The fixtures are written by our own code in EDM's format (``edm_pickles``). Parity with a
pickle written by NVIDIA's own ``torch_utils.persistence`` was shown once outside the repository
(their code is CC BY-NC-SA): identical state dicts, see the issue's report.
"""
from __future__ import annotations

import hashlib
import os
import pickle

import pytest
import torch

from edm_pickles import MODULE_SRC, SMALL, c_noise, small_net, write_snapshot
from harness.core.diffusion import Denoiser
from harness.core.edm_ddpmpp import build_ddpmpp, ddpmpp_settings, model_state
from harness.core.edm_import import EDMImportError, load_edm_pickle


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture
def marker(tmp_path, monkeypatch):
    """A path that exists only if code from a pickle ran."""
    path = tmp_path / "pwned"
    monkeypatch.setenv("EDM_FIXTURE_MARKER", str(path))
    return path


@pytest.mark.parametrize("label_dim", [0, 10])
def test_reads_edm_snapshot(tmp_path, marker, label_dim):
    net = small_net(label_dim)
    path = tmp_path / "network-snapshot.pkl"
    precond = write_snapshot(path, net, label_dim)
    state, meta = load_edm_pickle(str(path))

    want = precond.state_dict()  # nested: EDMPrecond -> model (SongUNet) -> ModuleDicts -> blocks
    assert list(state) == list(want)
    assert all(k.startswith("model.") for k in state)
    assert "model.enc.4x4_down.conv0.resample_filter" in state  # buffers too
    for k, v in want.items():
        assert state[k].dtype == v.dtype and torch.equal(state[k], v), k
    assert not marker.exists()  # the embedded module source was not run

    assert meta["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert meta["class_name"] == "EDMPrecond" and meta["model_class"] == "SongUNet"
    assert meta["keys"] == ["augment_pipe", "dataset_kwargs", "ema", "loss_fn"]
    assert meta["contents"]["loss_fn"] == "EDMLoss"
    assert {"UNetBlock", "Conv2d", "GroupNorm", "Linear", "ModuleDict"} <= set(meta["classes"])
    assert meta["init_kwargs"]["model_type"] == "SongUNet"
    assert meta["init_kwargs"]["label_dim"] == label_dim
    assert meta["model_init_kwargs"]["channel_mult"] == [1, 2]
    assert meta["attrs"]["sigma_data"] == 0.5 and meta["attrs"]["sigma_max"] == float("inf")
    assert meta["source_sha256"] == hashlib.sha256(MODULE_SRC.encode()).hexdigest()
    assert meta["dataset_kwargs"]["use_labels"] is bool(label_dim)
    assert meta["parameters"] == sum(p.numel() for p in net.parameters())

    ours, kwargs = build_ddpmpp(state, meta)
    assert kwargs["label_dim"] == label_dim and kwargs["augment_dim"] == 9
    assert kwargs["channel_mult"] == (1, 2) and kwargs["dropout"] == pytest.approx(0.13)
    x = torch.randn(3, 3, 8, 8)
    labels = torch.eye(10)[[1, 4, 9]] if label_dim else None
    with torch.no_grad():
        for s in (0.002, 2.5, 80.0):
            assert torch.equal(ours.eval()(x, c_noise(s, 3), labels),
                               net(x, c_noise(s, 3), labels))
        if not label_dim:
            d = Denoiser(ours, meta["attrs"]["sigma_data"])
            assert torch.isfinite(d(x, 2.5)).all()


@pytest.mark.parametrize("protocol", [2, 3])
def test_numpy1_old_protocol_pickle(tmp_path, marker, protocol):
    """Older pickles: protocols 2-3 and NumPy 1's ``numpy.core.multiarray.scalar``."""
    net = small_net()
    path = tmp_path / "old.pkl"
    write_snapshot(path, net, protocol=protocol)
    raw = path.read_bytes()
    assert b"numpy._core.multiarray" in raw
    path.write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    state, meta = load_edm_pickle(str(path))
    assert torch.equal(state["model.map_layer0.weight"], net.map_layer0.weight)
    net2, _ = build_ddpmpp(state, meta)
    assert not marker.exists()


class _Payload:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class _ExecPayload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return exec, (f"open({str(self.path)!r}, 'w').close()",)


def test_controls_are_live(tmp_path, marker):
    """The payloads below really run under a plain unpickler; the module source really writes
    the marker when executed. So 'not created' in the other tests means 'not run'."""
    target = tmp_path / "created-by-payload"
    pickle.loads(pickle.dumps(_Payload(f"touch {target}")))
    assert target.exists()
    exec(compile(MODULE_SRC, "module_src", "exec"), {})
    assert marker.exists()


def test_refuses_os_system(tmp_path, marker):
    target = tmp_path / "created-by-payload"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"ema": _Payload(f"touch {target}")}))
    with pytest.raises(EDMImportError) as err:
        load_edm_pickle(str(path))
    msg = str(err.value)
    assert f"{os.system.__module__}.system" in msg and "nothing from the file was executed" in msg
    assert not target.exists()


@pytest.mark.parametrize("where", ["top", "dataset_kwargs", "inside_network_state"])
def test_refuses_payload_anywhere(tmp_path, marker, where):
    """A payload after legitimate tensors, deep inside an EDM snapshot, is refused too."""
    target = tmp_path / "created-by-payload"
    net = small_net()
    if where == "inside_network_state":
        net.map_layer0.extra = _Payload(f"touch {target}")  # pickled with the Linear's state
        extra = {}
    elif where == "dataset_kwargs":
        extra = {"dataset_kwargs": {"path": _ExecPayload(target)}}
    else:
        extra = {"zzz": _Payload(f"touch {target}")}
    path = tmp_path / "evil.pkl"
    write_snapshot(path, net, extra=extra)
    with pytest.raises(EDMImportError, match="refused before it was called"):
        load_edm_pickle(str(path))
    assert not target.exists() and not marker.exists()


@pytest.mark.parametrize("module, name", [("builtins", "eval"), ("subprocess", "Popen"),
                                          ("torch", "load"), ("torch_utils.persistence",
                                                              "_src_to_module"),
                                          ("torch.nn.modules.module", "_global_hook")])
def test_refuses_other_globals(tmp_path, module, name):
    # protocol-2 GLOBAL opcode naming module.name, called with no arguments
    raw = b"\x80\x02c" + f"{module}\n{name}\n".encode() + b")R."
    path = tmp_path / "g.pkl"
    path.write_bytes(raw)
    with pytest.raises(EDMImportError, match=f"{module}.{name}"):
        load_edm_pickle(str(path))


def test_not_an_edm_pickle(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save({"w": torch.ones(2)}, path)  # a zip archive, not EDM's plain pickle
    with pytest.raises(EDMImportError, match="not a readable EDM pickle"):
        load_edm_pickle(str(path))
    path.write_bytes(pickle.dumps({"net": 1}))
    with pytest.raises(EDMImportError, match="'ema'"):
        load_edm_pickle(str(path))
    with pytest.raises(EDMImportError, match="cannot read"):
        load_edm_pickle(str(tmp_path / "missing.pkl"))


def _meta(**over):
    song = {**SMALL, "embedding_type": "positional", "channel_mult_noise": 1,
            "encoder_type": "standard", "decoder_type": "standard", "resample_filter": [1, 1]}
    meta = {"class_name": "EDMPrecond", "model_class": "SongUNet", "path": "x.pkl",
            "init_kwargs": {"model_type": "SongUNet", "img_resolution": 8, "img_channels": 3},
            "model_init_kwargs": song}
    for k, v in over.items():
        if k in song:
            song[k] = v
        else:
            meta[k] = v
    return meta


@pytest.mark.parametrize("over, match", [
    ({"class_name": "VPPrecond"}, "not an EDMPrecond"),
    ({"init_kwargs": {"model_type": "DhariwalUNet"}, "model_class": "DhariwalUNet"},
     "only DDPM\\+\\+"),
    ({"embedding_type": "fourier"}, "embedding_type"),
    ({"encoder_type": "residual"}, "encoder_type"),
    ({"resample_filter": [1, 3, 3, 1]}, "resample_filter"),
    ({"init_kwargs": None}, "constructor arguments"),
])
def test_settings_refuse_other_networks(over, match):
    with pytest.raises(EDMImportError, match=match):
        ddpmpp_settings(_meta(**over))


def test_settings_from_precond_kwargs_only():
    """Without the SongUNet's own record, its arguments come from EDMPrecond's (+ defaults)."""
    meta = _meta(model_init_kwargs=None)
    meta["init_kwargs"] = {"model_type": "SongUNet", "img_resolution": 32, "img_channels": 3,
                           "label_dim": 0, "use_fp16": False, "model_channels": 128,
                           "channel_mult": [2, 2, 2], "augment_dim": 9, "dropout": 0.13,
                           "embedding_type": "positional", "encoder_type": "standard",
                           "decoder_type": "standard", "channel_mult_noise": 1,
                           "resample_filter": [1, 1]}
    kw = ddpmpp_settings(meta)
    assert kw["in_channels"] == kw["out_channels"] == 3 and kw["num_blocks"] == 4
    assert kw["attn_resolutions"] == (16,) and kw["channel_mult"] == (2, 2, 2)


def test_strict_loading_reports_mismatch(tmp_path):
    net = small_net()
    path = tmp_path / "s.pkl"
    write_snapshot(path, net, song_kwargs={"num_blocks": 2})  # says 2 blocks, holds 1
    state, meta = load_edm_pickle(str(path))
    with pytest.raises(EDMImportError, match="do not fit"):
        build_ddpmpp(state, meta)
    assert set(model_state(state)) == set(net.state_dict())


@pytest.fixture
def small_harness_ddpmpp(monkeypatch):
    """The harness's ddpmpp at the fixture's small settings (the real one is 56M parameters)."""
    from harness.core import nets

    small = {"model_channels": 16, "channel_mult": (1, 2), "channel_mult_emb": 4,
             "num_blocks": 1, "attn_resolutions": (4,), "dropout": 0.13}
    monkeypatch.setattr(nets, "DDPMPP_SETTINGS", small)
    return small


def _dataset(shape=(3, 8, 8), sigma_data=0.5):
    import numpy as np

    from harness.core.data import Dataset

    return Dataset("fake", np.zeros((4, *shape), np.float32), None, sigma_data)


def test_load_imported_teacher(tmp_path, marker, small_harness_ddpmpp):
    from harness.core import nets
    from harness.core.inits import init_aux
    from harness.orchestrate.teacher import load_imported

    net = small_net()
    path = tmp_path / "edm-uncond.pkl"
    write_snapshot(path, net)
    teacher, meta = load_imported(str(path), _dataset())
    assert meta["id"] == "t-" + hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    assert meta["arch"] == "ddpmpp" and meta["edm"]["dropped"] == ["map_augment.weight"]
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():  # identical to the network that was pickled (no augmentation labels)
        assert torch.equal(teacher(x, 2.5), Denoiser(net, 0.5)(x, 2.5))
    state = teacher.net.state_dict()
    shape = (3, 8, 8)
    nets.build("ddpmpp", shape).load_state_dict(state, strict=True)  # what the generator is
    aux = init_aux("teacher", state, lambda: nets.build_ratio("ddpmpp", shape), 0)
    assert torch.equal(aux["enc.8x8_conv.weight"], state["enc.8x8_conv.weight"])
    assert not marker.exists()


@pytest.mark.parametrize("case, match", [("cond", "class-conditional"),
                                         ("shape", "the study's data are 1x8x8"),
                                         ("sigma", "sigma_data"),
                                         ("width", "model_channels=32")])
def test_load_imported_refuses(tmp_path, small_harness_ddpmpp, case, match):
    from harness.orchestrate.teacher import load_imported

    path = tmp_path / "t.pkl"
    label_dim = 10 if case == "cond" else 0
    song = {"model_channels": 32} if case == "width" else None
    if case == "width":
        net = _small_ddpmpp(model_channels=32)
    else:
        net = small_net(label_dim)
    write_snapshot(path, net, label_dim, song_kwargs=song)
    data = _dataset((1, 8, 8) if case == "shape" else (3, 8, 8),
                    sigma_data=0.25 if case == "sigma" else 0.5)
    with pytest.raises(EDMImportError, match=match):
        load_imported(str(path), data)


def _small_ddpmpp(**over):
    from harness.core.nets.ddpmpp import DDPMpp

    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in SMALL.items()}
    return DDPMpp(**{**kw, **over})


def test_teacher_channels_imports_a_narrower_ddpmpp(tmp_path, small_harness_ddpmpp):
    """``teacher.channels`` (a CPU rehearsal's narrow teacher) is the one architecture knob: the
    pickle's model_channels must equal it, and generator and aux nets are built at that width."""
    from harness.core import nets
    from harness.declare.config import ConfigError, resolve_cell
    from harness.orchestrate.teacher import load_imported

    net = _small_ddpmpp(model_channels=32)
    path = tmp_path / "narrow.pkl"
    write_snapshot(path, net, song_kwargs={"model_channels": 32})
    with pytest.raises(EDMImportError, match="teacher.channels"):
        load_imported(str(path), _dataset())
    teacher, meta = load_imported(str(path), _dataset(), channels=32)
    state = teacher.net.state_dict()
    narrow = nets.build("ddpmpp", (3, 8, 8), 32)
    narrow.load_state_dict(state, strict=True)  # what generator and fake score are built as
    assert meta["parameters"] == nets.count_parameters(narrow) < nets.count_parameters(
        nets.build("ddpmpp", (3, 8, 8), 64))
    cfg = resolve_cell({"data": {"name": "cifar10", "path": "/x"},
                        "teacher": {"arch": "ddpmpp", "channels": 32}})
    assert cfg["teacher"]["channels"] == 32
    for bad, match in (({"arch": "unet-xs", "channels": 32}, "only the ddpmpp"),
                       ({"arch": "ddpmpp", "channels": 30}, "multiple of 4")):
        with pytest.raises(ConfigError, match=match):
            resolve_cell({"data": {"name": "cifar10", "path": "/x"}, "teacher": bad})
