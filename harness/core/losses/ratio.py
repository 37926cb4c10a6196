"""Score-free density-ratio family: never calls the teacher's score.

A ratio network ``c_phi(x, s)`` is trained by binary cross-entropy to separate noised generator
samples (label 1) from noised data (label 0), so at its optimum its logit is
``l = log p_theta,s(x) / q_s(x)``. For ``D_f(p || q) = E_q f(p/q)`` the reparameterised gradient
is ``E_z[grad_x f'(r(x_s)) . dx_s/dtheta]`` with r frozen, hence the surrogate ``f'(exp(l))``:

- ``kl``  (f = r log r):                           f'(e^l) = l + 1
- ``js``  (f = 1/2[r log r - (1+r) log((1+r)/2)]): f'(e^l) = 1/2 log(2 sigmoid(l))
- ``rkl`` (f = -log r):                            f'(e^l) = -exp(-l)

(additive constants dropped). ``sigma='fixed'`` puts all noise at sigma_min: a plain
GAN-like discriminator, to show what the diffusion noise adds.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from harness.core.diffusion import SIGMA_MIN
from harness.core.losses.base import LossFamily

RKL_LOGIT_MIN = -20.0  # exp(20) ~ 5e8: keeps -exp(-l) finite where the ratio net is confident


class DensityRatio(LossFamily):
    aux_kind = "ratio"
    uses_teacher_score = False

    def __init__(self, teacher, aux, *, t_max, divergence, sigma):
        super().__init__(None, aux, t_max=t_max)  # the teacher is never held, so never called
        self.divergence, self.fixed_sigma = divergence, sigma == "fixed"

    def sample_sigma(self, n, device=None):
        if self.fixed_sigma:
            return torch.full((n,), SIGMA_MIN, device=device)
        return super().sample_sigma(n, device)

    def aux_loss(self, x_fake, x_real):
        sigma = self.sample_sigma(x_fake.shape[0], device=x_fake.device)
        fake, _ = self.noised(x_fake.detach(), sigma)
        real, _ = self.noised(x_real, sigma)
        return F.softplus(-self.aux(fake, sigma)) + F.softplus(self.aux(real, sigma))

    def generator_loss(self, x, sigma=None, noise=None):
        x_s, sigma = self.noised(x, sigma, noise)
        logit = self.aux(x_s, sigma)
        if self.divergence == "kl":
            return logit
        if self.divergence == "js":
            return 0.5 * F.logsigmoid(logit)
        return -torch.exp(-logit.clamp_min(RKL_LOGIT_MIN))
