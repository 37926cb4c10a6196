"""EDM formulas (SPEC §1-§2): preconditioning identities, loss weighting, schedules."""
import math

import pytest
import torch

from harness.core import diffusion as D


@pytest.mark.parametrize("sd", [0.5, 1.3])
@pytest.mark.parametrize("s", [0.002, 0.3, 2.5, 80.0])
def test_preconditioning_identities(s, sd):
    s = torch.tensor(s, dtype=torch.float64)
    # c_skip^2 sd^2 + c_out^2 ... EDM: the target of F has unit variance, and c_in makes the
    # input unit variance; c_skip + c_out^2/sd^2 = 1 (Karras et al. Appendix B.6).
    assert torch.allclose(D.c_skip(s, sd) + D.c_out(s, sd) ** 2 / sd**2, torch.tensor(1.0, dtype=torch.float64))
    assert torch.allclose(D.c_in(s, sd) ** 2 * (s**2 + sd**2), torch.tensor(1.0, dtype=torch.float64))
    assert torch.allclose(D.loss_weight(s, sd) * D.c_out(s, sd) ** 2, torch.tensor(1.0, dtype=torch.float64))
    assert math.isclose(float(D.c_noise(s)), math.log(float(s)) / 4)


def test_denoiser_with_zero_network_is_c_skip_times_input():
    class Zero(torch.nn.Module):
        def forward(self, x, c):
            return torch.zeros_like(x)

    den = D.Denoiser(Zero(), 0.5)
    x = torch.randn(3, 2, dtype=torch.float64)
    out = den(x, torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64))
    expect = x * (0.25 / (torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64) ** 2 + 0.25))[:, None]
    assert torch.allclose(out, expect)


def test_pinned_conditioning_feeds_sigma_cond():
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x, c):
            seen.append(c.clone())
            return torch.zeros_like(x)

    gen = D.OneStepGenerator(D.Denoiser(Spy(), 0.5), sigma_init=2.5, sigma_feat=0.2)
    gen(torch.randn(4, 2))
    assert torch.allclose(seen[-1], torch.full((4,), math.log(0.2) / 4))


def test_karras_schedule_endpoints():
    s = D.karras_sigmas(18).double()
    assert len(s) == 19 and s[-1] == 0
    assert math.isclose(float(s[0]), 80.0, rel_tol=1e-12)
    assert math.isclose(float(s[17]), 0.002, rel_tol=1e-9)
    assert torch.all(s[:-1][1:] < s[:-1][:-1])


def test_generator_sigma_convention():
    assert math.isclose(float(D.generator_sigma(torch.tensor(0.0, dtype=torch.float64))), 0.002, rel_tol=1e-9)
    assert math.isclose(float(D.generator_sigma(torch.tensor(1.0, dtype=torch.float64))), 80.0, rel_tol=1e-9)
    assert abs(float(D.generator_sigma(torch.tensor(0.8, dtype=torch.float64))) - 24.4) < 0.1


def test_heun_uses_35_evaluations_and_converges_on_gaussian_data():
    calls = []
    sd = 0.7

    class Oracle(torch.nn.Module):
        """Exact denoiser for data N(0, sd^2): D(x; s) = x sd^2 / (s^2 + sd^2)."""

        def forward(self, x, sigma, sigma_cond=None):
            calls.append(1)
            s = torch.as_tensor(sigma, dtype=x.dtype)
            return x * sd**2 / (s**2 + sd**2)

    z = torch.ones(1, 1, dtype=torch.float64)
    exact = 80 * sd / (80**2 + sd**2) ** 0.5  # the probability-flow ODE maps z*80 to this
    x18 = float(D.heun_sample(Oracle(), z, steps=18))
    assert len(calls) == 35
    # second-order method: the error shrinks fast with steps (5% at 18, < 0.2% at 100)
    assert abs(x18 - exact) / exact < 0.06
    assert abs(float(D.heun_sample(Oracle(), z, steps=100)) - exact) / exact < 2e-3


def test_denoising_loss_is_per_sample_and_weighted():
    class Zero(torch.nn.Module):
        def forward(self, x, c):
            return torch.zeros_like(x)

    den = D.Denoiser(Zero(), 0.5)
    x = torch.zeros(5, 1, 2, 2)
    loss = D.denoising_loss(den, x, sigma=torch.full((5,), 1.0))
    assert loss.shape == (5,)
    # D = c_skip (x + n) with x = 0: loss = lambda c_skip^2 E n^2 ~ lambda c_skip^2
    assert torch.all(loss > 0)


def test_ema_beta_half_life():
    beta = D.ema_beta(64, 0.64)  # 10 steps per half-life
    assert math.isclose(beta**10, 0.5, rel_tol=1e-12)
