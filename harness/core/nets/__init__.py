"""Networks by architecture name, with the named parameter groups the init schemes act on.

``build(arch, shape)`` gives the raw network ``F(x_in, c_noise)`` that the EDM preconditioning
wraps; ``build_ratio(arch, shape)`` the ratio network's backbone (the encoder half + a head).
``channels`` (``teacher.channels``, ddpmpp only) narrows ddpmpp's base width (EDM's
``model_channels``, 128 by default) and nothing else.

Groups (``group_of``): for ``mlp`` and the ``unet-*`` sizes a parameter's group is the first
component of its name. ``ddpmpp`` (EDM's SongUNet, ``nets.ddpmpp``) keeps EDM's own names, so
its groups come from them:

- ``map_*`` (``map_label``, ``map_augment``, ``map_layer0``, ``map_layer1``) -> ``embedding``
- ``enc.*_conv`` (the stem conv at full resolution) -> ``input``; every other ``enc.*`` ->
  ``encoder``
- ``dec.*_in0``, ``dec.*_in1`` (the two blocks at the lowest resolution) -> ``middle``
- ``dec.*_aux_norm``, ``dec.*_aux_conv`` (final norm and conv) -> ``output``; every other
  ``dec.*`` -> ``decoder``

Anything else (a ratio network's ``head.*``) is in ``head``, which no init scheme resets.
"""
from __future__ import annotations

import torch
from torch import nn

from harness.declare.config import GROUPS
from harness.core.diffusion import _bcast, c_in, c_noise
from harness.core.nets.ddpmpp import CIFAR10 as DDPMPP_SETTINGS, DDPMpp, DDPMppEncoder
from harness.core.nets.mlp import MLP, MLPClassifier
from harness.core.nets.unet import SIZES, EncoderClassifier, UNet

IMAGE_ARCHS = (*SIZES, "ddpmpp")


class ArchError(ValueError):
    pass


def _check(arch: str, shape: tuple):
    image = len(shape) == 3
    if arch == "mlp" and image:
        raise ArchError(f"architecture 'mlp' is for toy 2-D data, not images of shape {shape}; "
                        f"use one of {', '.join(IMAGE_ARCHS)}")
    if arch != "mlp":
        if arch not in IMAGE_ARCHS:
            raise ArchError(f"unknown architecture {arch!r}; known: mlp, {', '.join(IMAGE_ARCHS)}")
        if not image:
            raise ArchError(f"architecture {arch!r} is for images; toy 2-D data needs 'mlp'")
        levels = len(DDPMPP_SETTINGS["channel_mult"] if arch == "ddpmpp" else SIZES[arch].mult)
        if shape[1] % 2 ** (levels - 1) or shape[2] % 2 ** (levels - 1):
            raise ArchError(f"{arch!r} halves the resolution {levels - 1} times; image size "
                            f"{shape[1]}x{shape[2]} must be divisible by {2 ** (levels - 1)}")


def ddpmpp_settings(channels: int | None = None) -> dict:
    """ddpmpp's keyword arguments: EDM's CIFAR-10 DDPM++, at ``channels`` base width if given."""
    return {**DDPMPP_SETTINGS, **({"model_channels": channels} if channels else {})}


def build(arch: str, shape: tuple, channels: int | None = None) -> nn.Module:
    """Raw network for data of per-sample ``shape`` ((C, H, W) or (2,))."""
    _check(arch, shape)
    if arch == "ddpmpp":  # EDM's CIFAR-10 DDPM++, unconditional, no augmentation labels
        return DDPMpp(shape[1], shape[0], shape[0], **ddpmpp_settings(channels))
    return MLP(shape[0]) if arch == "mlp" else UNet(shape[0], SIZES[arch])


def build_ratio(arch: str, shape: tuple, channels: int | None = None) -> nn.Module:
    _check(arch, shape)
    if arch == "ddpmpp":
        return DDPMppEncoder(shape[1], shape[0], **ddpmpp_settings(channels))
    return MLPClassifier(shape[0]) if arch == "mlp" else EncoderClassifier(shape[0], SIZES[arch])


def group_of(param_name: str) -> str:
    first, _, rest = param_name.partition(".")
    if first in GROUPS:
        return first
    if first.startswith("map_"):  # ddpmpp (EDM names): see the module docstring
        return "embedding"
    entry = rest.split(".", 1)[0]
    if first == "enc":
        return "input" if entry.endswith("_conv") else "encoder"
    if first == "dec":
        if entry.endswith(("_in0", "_in1")):
            return "middle"
        return "output" if "_aux_" in entry else "decoder"
    return "head"


def parameter_groups(net: nn.Module) -> dict[str, list[str]]:
    """Group name -> parameter names (every parameter belongs to exactly one group)."""
    out: dict[str, list[str]] = {}
    for name, _ in net.named_parameters():
        out.setdefault(group_of(name), []).append(name)
    return out


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


class RatioNet(nn.Module):
    """``c_phi(x, sigma)``: the log density ratio logit, with EDM input preconditioning."""

    def __init__(self, net: nn.Module, sigma_data: float):
        super().__init__()
        self.net = net
        self.sigma_data = float(sigma_data)

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        s = _bcast(sigma, x)
        return self.net(c_in(s, self.sigma_data) * x, c_noise(s).reshape(-1)).float()
