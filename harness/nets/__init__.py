"""Networks by architecture name, with the named parameter groups of SPEC §4.

``build(arch, shape)`` gives the raw network ``F(x_in, c_noise)`` that the EDM preconditioning
wraps; ``build_ratio(arch, shape)`` the ratio network's backbone (the encoder half + a head).
The group of a parameter is the first component of its name.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import GROUPS
from ..diffusion import _bcast, c_in, c_noise
from .mlp import MLP, MLPClassifier
from .unet import SIZES, EncoderClassifier, UNet


class ArchError(ValueError):
    pass


def _check(arch: str, shape: tuple):
    image = len(shape) == 3
    if arch == "mlp" and image:
        raise ArchError(f"architecture 'mlp' is for toy 2-D data, not images of shape {shape}; "
                        f"use one of {', '.join(SIZES)}")
    if arch != "mlp":
        if arch not in SIZES:
            raise ArchError(f"unknown architecture {arch!r}; known: mlp, {', '.join(SIZES)}")
        if not image:
            raise ArchError(f"architecture {arch!r} is for images; toy 2-D data needs 'mlp'")
        levels = len(SIZES[arch].mult)
        if shape[1] % 2 ** (levels - 1) or shape[2] % 2 ** (levels - 1):
            raise ArchError(f"{arch!r} halves the resolution {levels - 1} times; image size "
                            f"{shape[1]}x{shape[2]} must be divisible by {2 ** (levels - 1)}")


def build(arch: str, shape: tuple) -> nn.Module:
    """Raw network for data of per-sample ``shape`` ((C, H, W) or (2,))."""
    _check(arch, shape)
    return MLP(shape[0]) if arch == "mlp" else UNet(shape[0], SIZES[arch])


def build_ratio(arch: str, shape: tuple) -> nn.Module:
    _check(arch, shape)
    return MLPClassifier(shape[0]) if arch == "mlp" else EncoderClassifier(shape[0], SIZES[arch])


def group_of(param_name: str) -> str:
    group = param_name.split(".", 1)[0]
    return group if group in GROUPS else "head"


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
