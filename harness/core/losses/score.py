"""Teacher-score families: ``di`` (Diff-Instruct / VSD / DMD) and ``sid`` (Score identity
Distillation, Zhou et al. 2024). Both train a fake score ``D_psi`` with the EDM denoising loss
on detached generator samples and need the teacher's score at every generator step.
"""
from __future__ import annotations

import torch

from harness.core.diffusion import _bcast, denoising_loss
from harness.core.losses.base import LossFamily, dmd_weight


class _FakeScoreFamily(LossFamily):
    aux_kind = "score"
    uses_teacher_score = True

    def aux_loss(self, x_fake, x_real):
        return denoising_loss(self.aux, x_fake.detach())


class DistributionMatching(_FakeScoreFamily):
    """Reverse KL(p_theta,s || q_s): grad_x = score_fake - score_teacher = (D_psi - D_T) / s^2.

    Surrogate ``0.5 ||x - sg(x - g)||^2`` has gradient exactly ``g`` w.r.t. x, with
    ``g = (D_psi - D_T) / w`` (``weighting='dmd'``, w = mean |x - D_T|) or ``/ s^2``
    (``weighting='sigma2'``: the exact reverse-KL gradient at that noise level).
    """

    def __init__(self, teacher, aux, *, t_max, weighting):
        super().__init__(teacher, aux, t_max=t_max)
        self.weighting = weighting

    def generator_loss(self, x, sigma=None, noise=None):
        x_s, sigma = self.noised(x, sigma, noise)
        with torch.no_grad():
            d_t, d_f = self.teacher(x_s, sigma), self.aux(x_s, sigma)
            scale = dmd_weight(x, d_t) if self.weighting == "dmd" else _bcast(sigma, x) ** 2
            target = x - (d_f - d_t) / scale
        return 0.5 * ((x - target) ** 2).flatten(1).sum(1)


class ScoreIdentity(_FakeScoreFamily):
    """SiD: ``L = (D_T - D_psi) . ((D_T - x) - alpha (D_T - D_psi)) / w`` at x_s, with the
    networks' parameters frozen and gradients flowing through x_s (and x) into G."""

    def __init__(self, teacher, aux, *, t_max, alpha):
        super().__init__(teacher, aux, t_max=t_max)
        self.alpha = alpha

    def generator_loss(self, x, sigma=None, noise=None):
        x_s, sigma = self.noised(x, sigma, noise)
        d_t, d_f = self.teacher(x_s, sigma), self.aux(x_s, sigma)
        w = dmd_weight(x, d_t)
        diff = d_t - d_f
        return (diff * ((d_t - x) - self.alpha * diff) / w).flatten(1).sum(1)
