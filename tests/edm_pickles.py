"""EDM-format pickles written by our own code (no NVIDIA code): fixtures for harness.core.edm_import.

EDM's ``torch_utils.persistence`` pickles a decorated object as
``_reconstruct_persistent_obj(meta)`` with ``meta = {type: 'class', version: 6, module_src,
class_name, state}``, ``state`` being the object's ``__dict__`` (which includes ``_init_args`` and
``_init_kwargs``); plain ``torch.nn`` containers (``ModuleDict``) and tensors pickle as usual.
``write_snapshot`` reproduces that layout for a ``DDPMpp`` (standing in for EDM's ``SongUNet``)
inside an ``EDMPrecond`` record, plus ``loss_fn``, ``augment_pipe`` and ``dataset_kwargs``, as
EDM's training loop saves a snapshot. While pickling, a stub ``torch_utils.persistence`` module
exists in ``sys.modules`` only so that the pickler can name the function; it is removed after.
"""
from __future__ import annotations

import math
import pickle
import sys
import types
from unittest import mock

import numpy as np
import torch
from torch import nn

from harness.core.nets.ddpmpp import Block, Conv, DDPMpp, PositionalEmbedding

# the module source a persistent record carries; the loader must never run it: running it
# creates the file named by MARKER_ENV
MODULE_SRC = ("import os\n"
              "open(os.environ.get('EDM_FIXTURE_MARKER', '/nonexistent/marker'), 'w').close()\n"
              "class SongUNet: pass\n")

EDM_NAMES = {DDPMpp: "SongUNet", Block: "UNetBlock", Conv: "Conv2d", nn.GroupNorm: "GroupNorm",
             nn.Linear: "Linear", PositionalEmbedding: "PositionalEmbedding"}

SMALL = {"img_resolution": 8, "in_channels": 3, "out_channels": 3, "label_dim": 0,
         "augment_dim": 9, "model_channels": 16, "channel_mult": [1, 2], "num_blocks": 1,
         "attn_resolutions": [4], "dropout": 0.13}
SONG_FIXED = {"embedding_type": "positional", "channel_mult_noise": 1,
              "encoder_type": "standard", "decoder_type": "standard", "resample_filter": [1, 1]}


def _stub_reconstruct(meta):  # never called: only its name goes into the pickle
    raise AssertionError("the fixture's reconstruct stub ran")


_stub_reconstruct.__module__ = "torch_utils.persistence"
_stub_reconstruct.__qualname__ = _stub_reconstruct.__name__ = "_reconstruct_persistent_obj"


class Record:
    """A non-module persistent object (EDM's EDMLoss, AugmentPipe): class name and state."""

    def __init__(self, class_name: str, state: dict, init_kwargs: dict | None = None):
        self.class_name, self.state = class_name, state
        self.init_kwargs = init_kwargs or {}


class Precond(nn.Module):
    """Stands in for EDMPrecond: attributes + the network as ``model``."""

    def __init__(self, model: nn.Module, label_dim: int, sigma_data: float = 0.5):
        super().__init__()
        self.img_resolution, self.img_channels = SMALL["img_resolution"], SMALL["in_channels"]
        self.label_dim, self.use_fp16 = label_dim, False
        self.sigma_min, self.sigma_max, self.sigma_data = 0, float("inf"), sigma_data
        self.model = model


def _meta(class_name: str, state: dict) -> dict:
    return {"type": "class", "version": 6, "module_src": MODULE_SRC, "class_name": class_name,
            "state": state}


class _EDMPickler(pickle.Pickler):
    def __init__(self, f, init_kwargs: dict, protocol: int):
        super().__init__(f, protocol=protocol, fix_imports=False)
        self.init_kwargs = init_kwargs  # id(module) -> constructor kwargs to record

    def reducer_override(self, obj):
        if isinstance(obj, Record):
            state = {**obj.state, "_init_args": (), "_init_kwargs": obj.init_kwargs}
            return _stub_reconstruct, (_meta(obj.class_name, state),)
        name = "EDMPrecond" if isinstance(obj, Precond) else EDM_NAMES.get(type(obj))
        if name is None:
            return NotImplemented  # tensors, ModuleDict, numbers...: pickled as usual
        state = dict(obj.__dict__)
        state["_init_args"] = ()
        state["_init_kwargs"] = self.init_kwargs.get(id(obj), {})
        if name == "UNetBlock":
            state["skip_scale"] = np.sqrt(0.5)  # EDM keeps NumPy scalars in its attributes
        return _stub_reconstruct, (_meta(name, state),)


def small_net(label_dim: int = 0, seed: int = 0) -> DDPMpp:
    torch.manual_seed(seed)
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in SMALL.items()}
    net = DDPMpp(**{**kw, "label_dim": label_dim}).eval()
    with torch.no_grad():  # random everywhere (the architecture's own init is ~0 in places)
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def write_snapshot(path, net: DDPMpp, label_dim: int = 0, protocol: int = 4, extra=None,
                   precond_kwargs: dict | None = None, song_kwargs: dict | None = None) -> Precond:
    """Pickle ``{'ema': EDMPrecond(model=SongUNet), 'loss_fn', 'augment_pipe',
    'dataset_kwargs'}`` in EDM's format; ``extra`` entries are added to the dict."""
    precond = Precond(net, label_dim).eval()
    song = {**SMALL, **SONG_FIXED, "label_dim": label_dim, **(song_kwargs or {})}
    pre = {"model_type": "SongUNet", **{k: v for k, v in song.items() if k not in
                                         ("img_resolution", "in_channels", "out_channels",
                                          "label_dim")},
           "use_fp16": False, "img_resolution": song["img_resolution"],
           "img_channels": song["in_channels"], "label_dim": label_dim, **(precond_kwargs or {})}
    data = {"ema": precond,
            "loss_fn": Record("EDMLoss", {"P_mean": -1.2, "P_std": 1.2, "sigma_data": 0.5}),
            "augment_pipe": Record("AugmentPipe", {"p": 0.12, "xflip": 1e8}),
            "dataset_kwargs": {"class_name": "training.dataset.ImageFolderDataset",
                               "path": "datasets/cifar10-32x32.zip", "use_labels": bool(label_dim),
                               "xflip": False, "cache": True}}
    data.update(extra or {})
    stub = types.ModuleType("torch_utils.persistence")
    stub._reconstruct_persistent_obj = _stub_reconstruct
    pkg = types.ModuleType("torch_utils")
    pkg.persistence = stub
    with mock.patch.dict(sys.modules, {"torch_utils": pkg, "torch_utils.persistence": stub}):
        with open(path, "wb") as f:
            _EDMPickler(f, {id(precond): pre, id(net): song}, protocol).dump(data)
    return precond


def c_noise(sigma: float, n: int) -> torch.Tensor:
    return torch.full((n,), math.log(sigma) / 4)
