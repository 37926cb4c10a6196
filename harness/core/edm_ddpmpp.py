"""NVIDIA's EDM records (read by ``harness.core.edm_import``) as the harness's DDPM++ network.

``ddpmpp_settings`` checks that the metadata describe an ``EDMPrecond`` around a DDPM++
``SongUNet`` and returns the ``harness.core.nets.ddpmpp.DDPMpp`` keyword arguments; ``build_ddpmpp``
builds the network and loads the weights with ``strict=True``; ``harness_teacher`` wraps it as a
harness teacher.
"""
from __future__ import annotations

import torch

from harness.core import nets
from harness.core.edm_import import EDMImportError, plain
from harness.core.nets.ddpmpp import DDPMpp

# SongUNet's constructor defaults (EDM's training/networks.py), for keys a pickle leaves out
_SONG_DEFAULTS = {"label_dim": 0, "augment_dim": 0, "model_channels": 128,
                  "channel_mult": [1, 2, 2, 2], "channel_mult_emb": 4, "num_blocks": 4,
                  "attn_resolutions": [16], "dropout": 0.10, "label_dropout": 0,
                  "embedding_type": "positional", "channel_mult_noise": 1,
                  "encoder_type": "standard", "decoder_type": "standard",
                  "resample_filter": [1, 1]}
# what DDPM++ fixes (EDM's train.py --arch=ddpmpp) and DDPMpp implements
_DDPMPP_FIXED = {"embedding_type": "positional", "channel_mult_noise": 1,
                 "encoder_type": "standard", "decoder_type": "standard", "resample_filter": [1, 1]}
_PRECOND_KEYS = {"img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_min",
                 "sigma_max", "sigma_data", "model_type"}


def ddpmpp_settings(meta: dict) -> dict:
    """``DDPMpp`` keyword arguments for an EDM network's metadata; ``EDMImportError`` unless it
    is an ``EDMPrecond`` around a DDPM++ ``SongUNet``."""
    where = meta.get("path", "the EDM pickle")
    if meta.get("class_name") != "EDMPrecond":
        raise EDMImportError(
            f"{where}: the network is a {meta.get('class_name')}, not an EDMPrecond; the harness "
            f"applies EDM's preconditioning (c_noise = ln(sigma)/4), so a VP/VE-preconditioned "
            f"network (the 'baseline-*' pickles) would be fed the wrong inputs")
    pre = meta.get("init_kwargs")
    if pre is None:
        raise EDMImportError(f"{where}: the pickle does not record the network's constructor "
                             f"arguments, so its architecture cannot be checked")
    model_type = pre.get("model_type", "DhariwalUNet")
    if model_type != "SongUNet" or meta.get("model_class") not in (None, "SongUNet"):
        raise EDMImportError(f"{where}: the network is a {model_type}; only DDPM++ (SongUNet, "
                             f"train.py --arch=ddpmpp) is supported")
    song = meta.get("model_init_kwargs")
    if song is None:  # rebuild SongUNet's arguments the way EDMPrecond passes them
        song = {k: v for k, v in pre.items() if k not in _PRECOND_KEYS}
        song.update(img_resolution=pre["img_resolution"], in_channels=pre["img_channels"],
                    out_channels=pre["img_channels"], label_dim=pre.get("label_dim", 0))
    kw = {**_SONG_DEFAULTS, **song}
    for k, want in _DDPMPP_FIXED.items():
        got = list(kw[k]) if isinstance(kw[k], tuple) else kw[k]
        if got != want:
            raise EDMImportError(f"{where}: SongUNet {k}={got!r} is not DDPM++ ({k}={want!r}; "
                                 f"NCSN++ pickles use fourier/residual/[1,3,3,1]); unsupported")
    known = set(_SONG_DEFAULTS) | {"img_resolution", "in_channels", "out_channels"}
    unknown = sorted(set(kw) - known)
    if unknown:
        raise EDMImportError(f"{where}: unknown SongUNet arguments {unknown}; unsupported")
    return {"img_resolution": int(kw["img_resolution"]), "in_channels": int(kw["in_channels"]),
            "out_channels": int(kw["out_channels"]), "label_dim": int(kw["label_dim"]),
            "augment_dim": int(kw["augment_dim"]), "model_channels": int(kw["model_channels"]),
            "channel_mult": tuple(int(m) for m in kw["channel_mult"]),
            "channel_mult_emb": int(kw["channel_mult_emb"]), "num_blocks": int(kw["num_blocks"]),
            "attn_resolutions": tuple(int(r) for r in kw["attn_resolutions"]),
            "dropout": float(kw["dropout"]), "label_dropout": float(kw["label_dropout"])}


def model_state(state: dict[str, torch.Tensor], prefix: str = "model.") -> dict:
    """The ``EDMPrecond``'s inner network's tensors, ``model.`` stripped."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def build_ddpmpp(state: dict[str, torch.Tensor], meta: dict):
    """(``DDPMpp`` holding the pickle's weights, its keyword arguments); strict loading."""

    kwargs = ddpmpp_settings(meta)
    net = DDPMpp(**kwargs)
    try:
        net.load_state_dict(model_state(state), strict=True)
    except RuntimeError as e:
        raise EDMImportError(f"{meta.get('path', 'the EDM pickle')}: the weights do not fit a "
                             f"DDPM++ built from its own settings: {str(e)[:400]}") from None
    return net, kwargs


# tensors of an EDM pickle that the harness's own ``ddpmpp`` does not have, and why dropping
# them changes no output: EDM feeds augmentation labels only while training (augment_dim 9)
UNUSED_AT_INFERENCE = ("map_augment.weight",)


def harness_teacher(state: dict[str, torch.Tensor], meta: dict, shape: tuple,
                    channels: int | None = None):
    """(the harness's ``ddpmpp`` network for data of ``shape`` holding the pickle's weights,
    a summary for the teacher's metadata).

    The network is ``harness.core.nets.build("ddpmpp", shape, channels)``, so generator and auxiliary nets
    built from it take these weights by name (every init scheme works). Refused: other
    architectures (``ddpmpp_settings``), class-conditional networks (EDM trains them without
    label dropout, so they have no unconditional mode for a one-step generator to distil),
    settings other than the harness's ``ddpmpp`` and a resolution or channel count other than
    the data's. ``map_augment`` is dropped (``UNUSED_AT_INFERENCE``).
    """

    where = meta.get("path", "the EDM pickle")
    kw = ddpmpp_settings(meta)
    if kw["label_dim"]:
        raise EDMImportError(
            f"{where}: the network is class-conditional (label_dim {kw['label_dim']}); EDM trains "
            f"those without label dropout, so they have no unconditional mode to distil. Use an "
            f"unconditional pickle (e.g. edm-cifar10-32x32-uncond-vp.pkl)")
    want = (kw["in_channels"], kw["img_resolution"], kw["img_resolution"])
    if tuple(shape) != want:
        raise EDMImportError(f"{where}: the network is for {want[0]}x{want[1]}x{want[2]} images, "
                             f"the study's data are {'x'.join(map(str, shape))}")
    for k, v in nets.ddpmpp_settings(channels).items():
        if k != "dropout" and kw[k] != v:  # dropout is no weight: a frozen teacher never uses it
            fix = (" (teacher.channels sets the harness's model_channels)"
                   if k == "model_channels" else "")
            raise EDMImportError(f"{where}: {k}={kw[k]!r}, the harness's ddpmpp has {k}={v!r}; "
                                 f"only EDM's CIFAR-10 DDPM++ shape is supported{fix}")
    net = nets.build("ddpmpp", tuple(shape), channels)
    inner = {k: v for k, v in model_state(state).items() if k not in UNUSED_AT_INFERENCE}
    try:
        net.load_state_dict(inner, strict=True)
    except RuntimeError as e:
        raise EDMImportError(f"{where}: the weights do not fit the harness's ddpmpp: "
                             f"{str(e)[:400]}") from None
    dropped = sorted(set(model_state(state)) - set(inner))
    info = {"sha256": meta["sha256"], "class_name": meta["class_name"],
            "model_class": meta["model_class"], "settings": {k: plain(v) for k, v in kw.items()},
            "dropped": dropped, "sigma_data": meta.get("attrs", {}).get("sigma_data")}
    return net, info
