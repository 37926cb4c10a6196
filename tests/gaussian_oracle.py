"""Exact 1-D Gaussian oracles for the loss-family gradient tests (SPEC §7).

Data q = N(mu, S^2); generator G(z) = a + b z, so p_theta = N(a, b^2). At noise level s:
q_s = N(mu, S^2 + s^2), p_s = N(a, b^2 + s^2). Samples are shaped (N, 1); ``sigma`` may be a
python float or an (N,) tensor, exactly as the loss families pass it.

Everything is float64. The oracles stand in for frozen networks: they take (a, b) as *detached*
floats, so no gradient ever reaches theta through them, only through their input x_s.
"""
from __future__ import annotations

import math

import numpy as np
import torch

DT = torch.float64


def _sig(sigma, x: torch.Tensor) -> torch.Tensor:
    """sigma (float or (N,)) broadcast to x's shape (N, 1)."""
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if s.ndim == 0:
        s = s.expand(x.shape[0])
    return s.reshape(-1, *([1] * (x.ndim - 1)))


def gauss_score(x, mean, var):
    return -(x - mean) / var


def gauss_logpdf(x, mean, var):
    return -0.5 * (x - mean) ** 2 / var - 0.5 * torch.log(2 * math.pi * torch.as_tensor(var, dtype=DT))


def denoiser_oracle(mean: float, std: float):
    """Exact denoiser of N(mean, std^2) at noise s: D(x; s) = x + s^2 score_s(x)."""
    mean, std = float(mean), float(std)

    def d(x, sigma):
        s = _sig(sigma, x)
        return x + s**2 * gauss_score(x, mean, std**2 + s**2)

    return d


def logratio_oracle(a: float, b: float, mu: float, S: float):
    """Exact logit l(x; s) = log p_s(x) - log q_s(x), one per sample: shape (N,)."""
    a, b, mu, S = float(a), float(b), float(mu), float(S)

    def l(x, sigma):
        s2 = _sig(sigma, x) ** 2
        out = gauss_logpdf(x, a, b**2 + s2) - gauss_logpdf(x, mu, S**2 + s2)
        return out.flatten(1).sum(1)

    return l


def raising(*_args, **_kw):
    raise AssertionError("the teacher was called by a family that must never call it")


# ---- quadrature ------------------------------------------------------------------------------

def gh(n: int):
    """Probabilists' Gauss-Hermite nodes/weights for N(0, 1), weights normalised to sum 1."""
    x, w = np.polynomial.hermite_e.hermegauss(n)
    return torch.tensor(x, dtype=DT), torch.tensor(w / w.sum(), dtype=DT)


def gh2(n: int):
    """Tensor-product rule for (z, n) ~ N(0, I_2): flattened nodes z, n and weights w."""
    x, w = gh(n)
    z, e = torch.meshgrid(x, x, indexing="ij")
    return z.reshape(-1), e.reshape(-1), (w[:, None] * w[None, :]).reshape(-1)


# ---- divergences as differentiable functions of theta = (a, b) -------------------------------

def kl_gauss(m1, v1, m2, v2):
    """KL(N(m1, v1) || N(m2, v2)), variances v."""
    return 0.5 * (torch.log(v2 / v1) + (v1 + (m1 - m2) ** 2) / v2 - 1)


def kl_pq(a, b, mu, S, s):
    """KL(p_s || q_s)."""
    return kl_gauss(a, b**2 + s**2, torch.as_tensor(mu, dtype=DT), torch.as_tensor(S**2 + s**2, dtype=DT))


def kl_qp(a, b, mu, S, s):
    """KL(q_s || p_s)."""
    return kl_gauss(torch.as_tensor(mu, dtype=DT), torch.as_tensor(S**2 + s**2, dtype=DT), a, b**2 + s**2)


def _js_integrand_terms(x, a, b, mu, S, s):
    lp = gauss_logpdf(x, a, b**2 + s**2)
    lq = gauss_logpdf(x, mu, S**2 + s**2)
    return lp, lq


def js_gh(a, b, mu, S, s, n: int = 200):
    """JS(p_s, q_s) = 1/2 KL(p||m) + 1/2 KL(q||m), m = (p+q)/2, by Gauss-Hermite against p_s
    (reparameterised, so differentiable in (a, b)) and against q_s."""
    z, w = gh(n)
    xp = a + torch.sqrt(b**2 + s**2) * z
    lp, lq = _js_integrand_terms(xp, a, b, mu, S, s)
    term_p = (w * (math.log(2) + torch.nn.functional.logsigmoid(lp - lq))).sum()
    xq = mu + math.sqrt(S**2 + s**2) * z
    lp, lq = _js_integrand_terms(xq, a, b, mu, S, s)
    term_q = (w * (math.log(2) + torch.nn.functional.logsigmoid(lq - lp))).sum()
    return 0.5 * term_p + 0.5 * term_q


def js_grid(a, b, mu, S, s, lo: float = -40.0, hi: float = 40.0, n: int = 200001):
    """Same JS by the trapezoid rule on a fine x grid (an independent cross-check)."""
    x = torch.linspace(lo, hi, n, dtype=DT)
    lp, lq = _js_integrand_terms(x, a, b, mu, S, s)
    lm = torch.logaddexp(lp, lq) - math.log(2)
    f = 0.5 * torch.exp(lp) * (lp - lm) + 0.5 * torch.exp(lq) * (lq - lm)
    return torch.trapezoid(f, x)


def fisher(a, b, mu, S, s):
    """F = E_{p_s}[(score_p_s - score_q_s)^2], closed form: delta(x) = c (x - a) + (a - mu)/vq
    with c = 1/vq - 1/vp, so F = c^2 vp + (a - mu)^2 / vq^2."""
    vp = b**2 + s**2
    vq = S**2 + s**2
    c = 1 / vq - 1 / vp
    return c**2 * vp + (a - mu) ** 2 / vq**2
