"""A new loss family in one file (a plug-in; tests/test_plugins.py selects it from a study file).

``teacher_l2``: the generator regresses onto the teacher's denoised estimate of its own noised
samples, ``weight * mean (G(z) - sg(D_T(G(z) + s n; s)))^2``, so it calls the teacher's score.
The fake score it owns is trained with the EDM denoising loss on detached samples, as the
built-in teacher-score families do.
"""
import torch

from harness.core.diffusion import denoising_loss
from harness.core.losses import LossFamily, register_loss
from harness.declare.config import param


@register_loss("teacher_l2", {"weight": param(1.0, positive=True, hi=10.0)})
class TeacherL2(LossFamily):
    aux_kind = "score"
    uses_teacher_score = True
    calls = 0  # generator_loss calls in this process (a test reads it in-process)

    def __init__(self, teacher, aux, *, t_max, weight):
        super().__init__(teacher, aux, t_max=t_max)
        self.weight = weight

    def aux_loss(self, x_fake, x_real):
        return denoising_loss(self.aux, x_fake.detach())

    def generator_loss(self, x, sigma=None, noise=None):
        type(self).calls += 1
        x_s, sigma = self.noised(x, sigma, noise)
        with torch.no_grad():
            target = self.teacher(x_s, sigma)
        return self.weight * (x - target).pow(2).flatten(1).mean(1)
