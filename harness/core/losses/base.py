"""The one interface every loss family implements.

A family owns an auxiliary network (a fake score ``D_psi(x, s)`` or a ratio logit
``c_phi(x, s)``) and returns **per-sample** losses; the training loop reduces, steps the
optimizers and never knows which family it runs.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

import torch

from harness.core.diffusion import _bcast, sample_sigma_generator

NetFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class LossFamily(ABC):
    """Base class: ``aux_loss`` trains the auxiliary net, ``generator_loss`` trains G.

    Args:
        teacher: frozen teacher denoiser ``D_T(x, s)``; score-free families never call it.
        aux: auxiliary network: fake-score denoiser (``aux_kind = 'score'``) or ratio logit
            (``aux_kind = 'ratio'``), returning (N, ...) denoised data or (N,) logits.
        t_max: generator-loss noise levels come from u ~ U(0, t_max) mapped by
            ``diffusion.generator_sigma`` (u = 0: sigma_min; t_max = 0.8: about 24.4).
    """

    aux_kind: str = "score"
    uses_teacher_score: bool = True

    def __init__(self, teacher: NetFn | None, aux: NetFn, *, t_max: float):
        self.teacher, self.aux, self.t_max = teacher, aux, t_max

    def sample_sigma(self, n: int, device=None) -> torch.Tensor:
        return sample_sigma_generator(n, self.t_max, device=device)

    def noised(self, x: torch.Tensor, sigma=None, noise=None):
        """x_s = x + s n with s from the generator schedule unless given; returns (x_s, s)."""
        if sigma is None:
            sigma = self.sample_sigma(x.shape[0], device=x.device)
        if noise is None:
            noise = torch.randn_like(x)
        return x + _bcast(sigma, x) * noise, sigma

    @abstractmethod
    def aux_loss(self, x_fake: torch.Tensor, x_real: torch.Tensor) -> torch.Tensor:
        """Per-sample loss of the auxiliary network on detached generator samples, shape (N,)."""

    @abstractmethod
    def generator_loss(self, x: torch.Tensor, sigma=None, noise=None) -> torch.Tensor:
        """Per-sample generator surrogate whose gradient w.r.t. x is the family's estimator."""


def dmd_weight(x: torch.Tensor, d_teacher: torch.Tensor) -> torch.Tensor:
    """w = mean_CHW |G(z) - D_T(x_s)| (no grad), broadcast to x (DMD normalisation)."""
    w = (x - d_teacher).detach().abs().flatten(1).mean(1).clamp_min(1e-8)
    return _bcast(w, x)
