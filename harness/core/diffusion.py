"""EDM diffusion (Karras et al. 2022, "Elucidating the Design Space...") and the one-step
generator ``G(z) = D(sigma_init z; sigma_init)``.

Preconditioning ``D(x; s) = c_skip x + c_out F(c_in x, c_noise)``, the denoising loss with its
log-normal noise distribution and weighting, the Heun sampler, and the SiD-convention noise
levels used by every generator loss.
"""
from __future__ import annotations

import math

import torch
from torch import nn

SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0
P_MEAN, P_STD = -1.2, 1.2


def c_skip(sigma, sd):
    return sd**2 / (sigma**2 + sd**2)


def c_out(sigma, sd):
    return sigma * sd / (sigma**2 + sd**2) ** 0.5


def c_in(sigma, sd):
    return 1 / (sigma**2 + sd**2) ** 0.5


def c_noise(sigma):
    return torch.log(torch.as_tensor(sigma)) / 4


def loss_weight(sigma, sd):
    """EDM's lambda(s) = (s^2 + sd^2) / (s sd)^2: unit-variance training target."""
    return (sigma**2 + sd**2) / (sigma * sd) ** 2


def _bcast(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    return sigma.reshape(-1, *([1] * (x.ndim - 1)))


class Denoiser(nn.Module):
    """EDM-preconditioned denoiser around a raw network ``net(x_in, c_noise) -> F``.

    ``sigma_cond`` (optional) feeds the network's noise conditioning from another noise level
    than the preconditioning uses: that is how ``feature_transplant`` pins the features.
    """

    def __init__(self, net: nn.Module, sigma_data: float):
        super().__init__()
        self.net = net
        self.sigma_data = float(sigma_data)

    def forward(self, x: torch.Tensor, sigma, sigma_cond=None) -> torch.Tensor:
        s = _bcast(sigma, x)
        sd = self.sigma_data
        cond = s if sigma_cond is None else _bcast(sigma_cond, x)
        f = self.net(c_in(s, sd) * x, c_noise(cond).reshape(-1))
        return c_skip(s, sd) * x + c_out(s, sd) * f.to(x.dtype)


def sample_sigma_train(n: int, device=None, generator=None) -> torch.Tensor:
    """ln s ~ N(P_mean, P_std): the teacher (and fake-score) training distribution."""
    return torch.exp(P_MEAN + P_STD * torch.randn(n, device=device, generator=generator))


def sample_sigma_band(n: int, lo: float, hi: float, device=None) -> torch.Tensor:
    """ln s ~ U(ln lo, ln hi): a band-limited teacher's training distribution, so
    it learns features for that band of noise levels only."""
    return torch.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * torch.rand(n, device=device))


def denoising_loss(denoiser, x: torch.Tensor, sigma: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample EDM loss ``lambda(s) ||D(x + s n; s) - x||^2`` (mean over dimensions)."""
    if sigma is None:
        sigma = sample_sigma_train(x.shape[0], device=x.device)
    s = _bcast(sigma, x)
    d = denoiser(x + s * torch.randn_like(x), sigma)
    per_dim = loss_weight(s, denoiser.sigma_data) * (d - x) ** 2
    return per_dim.flatten(1).mean(1)


def karras_sigmas(steps: int = 18, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO):
    """The Karras schedule s_0 = sigma_max ... s_{N-1} = sigma_min, then s_N = 0."""
    i = torch.arange(steps, dtype=torch.float64)
    s = (sigma_max ** (1 / rho) + i / (steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)])


@torch.no_grad()
def heun_sample(denoiser, z: torch.Tensor, steps: int = 18) -> torch.Tensor:
    """Deterministic Heun sampler (EDM Algorithm 1): 2*steps - 1 evaluations (35 for 18)."""
    sig = karras_sigmas(steps).tolist()
    x = z * sig[0]
    for i in range(steps):
        s, s_next = sig[i], sig[i + 1]
        d = (x - denoiser(x, s)) / s
        x_next = x + (s_next - s) * d
        if s_next > 0:
            d2 = (x_next - denoiser(x_next, s_next)) / s_next
            x_next = x + (s_next - s) * (0.5 * d + 0.5 * d2)
        x = x_next
    return x


def generator_sigma(u: torch.Tensor) -> torch.Tensor:
    """SiD convention: u in [0, 1] -> s; u = 0 gives sigma_min, u = 1 gives sigma_max."""
    a, b = SIGMA_MAX ** (1 / RHO), SIGMA_MIN ** (1 / RHO)
    return (a + (1 - u) * (b - a)) ** RHO


def sample_sigma_generator(n: int, t_max: float, device=None) -> torch.Tensor:
    """The generator losses' noise levels: u ~ U(0, t_max) -> s = ``generator_sigma(u)``;
    t_max = 0.8 reaches about 24.4."""
    return generator_sigma(t_max * torch.rand(n, device=device))


class OneStepGenerator(nn.Module):
    """G(z) = D(sigma_init z; sigma_init), conditioning optionally pinned at ``sigma_feat``."""

    def __init__(self, denoiser: Denoiser, sigma_init: float, sigma_feat: float | None = None):
        super().__init__()
        self.denoiser = denoiser
        self.sigma_init = float(sigma_init)
        self.sigma_feat = None if sigma_feat is None else float(sigma_feat)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.denoiser(self.sigma_init * z, self.sigma_init, sigma_cond=self.sigma_feat)


def ema_beta(batch: int, halflife_kimg: float) -> float:
    """Per-step EMA decay for a half-life counted in images (EDM)."""
    return 0.5 ** (batch / max(halflife_kimg * 1000, 1e-8))

