"""Exact-gradient checks of the loss families on 1-D Gaussians (SPEC §7).

Data q = N(mu, S^2), generator G(z) = a + b z with theta = (a, b). At a fixed noise level s the
noised densities, scores and log-ratios are exact (``gaussian_oracle``), and they stand in for
the trained networks: the teacher denoiser of q_s, the fake-score denoiser of p_s and the
log-ratio logit log p_s/q_s, the last two built from the *current* (a, b) as frozen numbers.
The expectation over (z, n) ~ N(0, I_2) is a tensor-product Gauss-Hermite rule, so the
"expected gradient" of a family is grad_theta sum_i w_i L_i, computed to machine precision.

- di (weighting sigma2) and ratio kl: grad KL(p_s || q_s) (closed form).
- ratio rkl: grad KL(q_s || p_s) (closed form).
- ratio js: grad JS(p_s, q_s), JS by 1-D quadrature (cross-checked on a fine grid).
- sid: no divergence; it vanishes at p = q and is a descent direction for the Fisher divergence
  F = E_{p_s}[(score_p_s - score_q_s)^2] where that holds (see the SiD tests for where it does
  not, and why).
"""
from __future__ import annotations

import math

import pytest
import torch

from harness.core import losses
from harness.declare.config import resolve_loss
from gaussian_oracle import (
    DT, denoiser_oracle, fisher, gh2, js_gh, js_grid, kl_pq, kl_qp, logratio_oracle, raising,
)

T_MAX = 0.8
N_NODES = 70  # per dimension: 4900 (z, n) nodes
REL_TOL = 1e-3

# (mu, S, a, b, s): generator differs from the data in mean and/or width; two noise levels.
SETTINGS = [
    (0.3, 1.1, -0.4, 0.7, 0.7),
    (0.3, 1.1, -0.4, 0.7, 2.0),
    (-1.0, 0.5, 0.5, 1.5, 0.7),
    (0.0, 1.0, 0.2, 1.0, 0.3),   # same width, shifted mean
    (1.0, 0.6, 0.0, 1.0, 0.7),
    (0.3, 1.1, -0.4, 0.7, 0.2),
]
SETTING_IDS = [f"mu{m}_S{S}_a{a}_b{b}_s{s}" for m, S, a, b, s in SETTINGS]

# family config -> the divergence its expected gradient must equal
DIVERGENCE_CASES = [
    ({"name": "di", "weighting": "sigma2"}, kl_pq),
    ({"name": "ratio", "divergence": "kl", "sigma": "schedule"}, kl_pq),
    ({"name": "ratio", "divergence": "rkl", "sigma": "schedule"}, kl_qp),
    ({"name": "ratio", "divergence": "js", "sigma": "schedule"}, js_gh),
]
DIVERGENCE_IDS = ["di_sigma2-KL(p||q)", "ratio_kl-KL(p||q)", "ratio_rkl-KL(q||p)", "ratio_js-JS"]


# ---- helpers ---------------------------------------------------------------------------------

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small float64 tensors: one intra-op thread is faster and immune to a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def theta(a0: float, b0: float):
    return (torch.tensor(a0, dtype=DT, requires_grad=True),
            torch.tensor(b0, dtype=DT, requires_grad=True))


def oracle_family(cfg: dict, mu: float, S: float, a0: float, b0: float, teacher=None):
    """The family with exact oracles in place of the networks (aux frozen at the current theta)."""
    if cfg["name"] == "ratio":
        aux = logratio_oracle(a0, b0, mu, S)
        teacher = raising if teacher is None else teacher
    else:
        aux = denoiser_oracle(a0, b0)
        teacher = denoiser_oracle(mu, S) if teacher is None else teacher
    return losses.build(cfg, teacher, aux, T_MAX)


def quad_samples(a, b, n_nodes: int = N_NODES):
    """Generator samples x = a + b z (N, 1) at the (z, n) nodes, the noise (N, 1), the weights."""
    z, e, w = gh2(n_nodes)
    return (a + b * z)[:, None], e[:, None], w


def expected_grad(cfg, mu, S, a0, b0, s, *, sigma_float=False, undo_dmd_weight=False,
                  n_nodes=N_NODES):
    """grad_theta E_{z,n}[L(G(z), s, n)] by Gauss-Hermite, with the family's own surrogate.

    ``undo_dmd_weight`` multiplies each per-sample loss by w = mean|x - D_T(x_s)| recomputed
    here (w carries no gradient in the family), giving SiD's *unnormalised* estimator.
    """
    a, b = theta(a0, b0)
    fam = oracle_family(cfg, mu, S, a0, b0)
    x, e, w = quad_samples(a, b, n_nodes)
    sigma = s if sigma_float else torch.full((x.shape[0],), s, dtype=DT)
    loss = fam.generator_loss(x, sigma=sigma, noise=e)
    assert loss.shape == (x.shape[0],), f"per-sample loss expected, got {tuple(loss.shape)}"
    if undo_dmd_weight:
        with torch.no_grad():
            d_t = denoiser_oracle(mu, S)(x + s * e, s)
            w_dmd = (x - d_t).abs().flatten(1).mean(1).clamp_min(1e-8)
        loss = loss * w_dmd
    ga, gb = torch.autograd.grad((w * loss).sum(), (a, b))
    return torch.stack([ga, gb])


def grad_of(fn, mu, S, a0, b0, s):
    a, b = theta(a0, b0)
    ga, gb = torch.autograd.grad(fn(a, b, mu, S, s), (a, b))
    return torch.stack([ga, gb])


def rel_err(g, ref):
    return float((g - ref).norm() / ref.norm())


def fisher_at(a0, b0, mu, S, s):
    return float(fisher(torch.tensor(a0, dtype=DT), torch.tensor(b0, dtype=DT), mu, S, s))


def assert_descent(g, mu, S, a0, b0, s, what):
    """dot(g, grad F) > 0 and a small step theta - eta g lowers F."""
    gF = grad_of(fisher, mu, S, a0, b0, s)
    assert float(gF.norm()) > 1e-6, "setting has a vanishing Fisher gradient"
    cos = float(g @ gF / (g.norm() * gF.norm()))
    assert cos > 0, f"{what}: not a descent direction for the Fisher divergence, cos(g, grad F) = {cos:.4f}"
    eta = 1e-3 * math.sqrt(a0**2 + b0**2) / float(g.norm())
    f0 = fisher_at(a0, b0, mu, S, s)
    f1 = fisher_at(a0 - eta * float(g[0]), b0 - eta * float(g[1]), mu, S, s)
    assert f1 < f0, f"{what}: step against the estimator raised F from {f0:.6g} to {f1:.6g}"
    return cos


# ---- di / ratio: expected gradient == gradient of the family's divergence -------------------

@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("cfg,divergence", DIVERGENCE_CASES, ids=DIVERGENCE_IDS)
def test_expected_gradient_equals_divergence_gradient(cfg, divergence, setting):
    mu, S, a0, b0, s = setting
    g = expected_grad(cfg, *setting)
    ref = grad_of(divergence, *setting)
    assert float(ref.norm()) > 1e-3, "reference gradient is trivially small: pick another setting"
    assert float(g.norm()) > 1e-3, f"{cfg}: expected gradient vanishes although p != q"
    err = rel_err(g, ref)
    assert err < REL_TOL, (f"{cfg} at {setting}: expected gradient {g.tolist()} != grad of its "
                           f"divergence {ref.tolist()} (relative error {err:.3g})")


@pytest.mark.parametrize("cfg", [c for c, _ in DIVERGENCE_CASES]
                         + [{"name": "di", "weighting": "dmd"}, {"name": "sid", "alpha": 1.2}],
                         ids=DIVERGENCE_IDS + ["di_dmd", "sid"])
def test_python_float_sigma_matches_tensor_sigma(cfg):
    setting = SETTINGS[0]
    g_t = expected_grad(cfg, *setting, n_nodes=30)
    g_f = expected_grad(cfg, *setting, sigma_float=True, n_nodes=30)
    torch.testing.assert_close(g_f, g_t, rtol=1e-12, atol=1e-12)


def test_js_reference_quadrature_agrees_with_fine_grid():
    """The JS reference (Gauss-Hermite against p_s and q_s) vs a trapezoid rule on a fine grid."""
    for mu, S, a0, b0, s in SETTINGS[:3]:
        a, b = theta(a0, b0)
        v_gh, v_grid = js_gh(a, b, mu, S, s), js_grid(a, b, mu, S, s, lo=-30.0, hi=30.0, n=20001)
        assert 0 < v_gh.item() < math.log(2)
        assert abs((v_gh - v_grid).item()) < 1e-8 * v_grid.item()
        g1 = torch.stack(torch.autograd.grad(v_gh, (a, b)))
        g2 = torch.stack(torch.autograd.grad(v_grid, (a, b)))
        assert rel_err(g1, g2) < 1e-7


def test_kl_closed_forms_are_consistent_with_quadrature():
    """The closed-form KLs, checked against E_p[l] and E_q[-l] with the log-ratio oracle."""
    from gaussian_oracle import gh
    z, w = gh(80)
    for mu, S, a0, b0, s in SETTINGS:
        l = logratio_oracle(a0, b0, mu, S)
        xp = (a0 + math.sqrt(b0**2 + s**2) * z)[:, None]
        xq = (mu + math.sqrt(S**2 + s**2) * z)[:, None]
        a, b = torch.tensor(a0, dtype=DT), torch.tensor(b0, dtype=DT)
        assert abs(float((w * l(xp, s)).sum() - kl_pq(a, b, mu, S, s))) < 1e-12
        assert abs(float((w * -l(xq, s)).sum() - kl_qp(a, b, mu, S, s))) < 1e-12


# ---- sid ------------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [1.2, 1.0])
@pytest.mark.parametrize("mu,S,s", [(0.3, 1.1, 0.7), (-1.0, 0.5, 2.0), (0.0, 1.0, 0.2)])
def test_sid_gradient_vanishes_when_generator_equals_data(alpha, mu, S, s):
    g = expected_grad({"name": "sid", "alpha": alpha}, mu, S, mu, S, s)
    assert float(g.abs().max()) < 1e-8, f"sid gradient at p = q is {g.tolist()}, not 0"


@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
def test_sid_unnormalised_alpha_half_is_exact_fisher_gradient(setting):
    """Without the DMD normalisation, SiD's surrogate is L1 - alpha L2 with
    L1 = delta . (D_T - x), L2 = |delta|^2, delta = D_T - D_psi (networks frozen). With
    L(theta) = E_{p_s}|D_T - D_theta|^2 = s^4 F, the score identity gives
    grad L = 2 grad(L1) - grad(L2), so alpha = 1/2 is exactly (s^4 / 2) grad F: this pins the
    sign and form of the implemented formula."""
    mu, S, a0, b0, s = setting
    g = expected_grad({"name": "sid", "alpha": 0.5}, *setting, undo_dmd_weight=True)
    ref = 0.5 * s**4 * grad_of(fisher, *setting)
    err = rel_err(g, ref)
    assert err < REL_TOL, f"sid(alpha=0.5, unnormalised) {g.tolist()} != s^4/2 grad F {ref.tolist()} ({err:.3g})"


@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("alpha", [1.2, 1.0])
def test_sid_unnormalised_is_descent_direction(alpha, setting):
    """Exact 1-D expectation of the estimator with the per-sample weight 1/w undone."""
    g = expected_grad({"name": "sid", "alpha": alpha}, *setting, undo_dmd_weight=True)
    assert float(g.norm()) > 1e-8
    assert_descent(g, *setting, what=f"sid(alpha={alpha}, unnormalised)")


def test_sid_alpha_1p2_is_not_always_a_descent_direction():
    """Documents a property of SiD itself (not of the code): the expected (unnormalised)
    estimator is (s^4/2) grad F + (1/2 - alpha) grad_reparam E|delta|^2, so only alpha = 1/2 is
    the exact gradient. For a generator much wider than the data at a small noise level,
    alpha = 1.2 points *uphill* in b (it widens the generator) while alpha = 1.0 still descends.
    SPEC §7's "descent direction otherwise" therefore holds only in part of the parameter space."""
    setting = (0.0, 0.3, 0.0, 1.5, 0.2)
    gF = grad_of(fisher, *setting)
    cos = {}
    for alpha in (0.5, 1.0, 1.2):
        g = expected_grad({"name": "sid", "alpha": alpha}, *setting, undo_dmd_weight=True)
        cos[alpha] = float(g @ gF / (g.norm() * gF.norm()))
    assert cos[0.5] > 1 - 1e-9 and cos[1.0] > 0.99
    assert cos[1.2] < -0.99, cos


def _sid_mc_grad(alpha, mu, S, a0, b0, s, d, n=5000, seed=0):
    """As-implemented sid (with the DMD normalisation) in d isotropic dimensions, Monte Carlo
    with antithetic pairs; theta = (a, b) shared by all dimensions, so F_d = d F."""
    gen = torch.Generator().manual_seed(seed)
    a, b = theta(a0, b0)
    fam = oracle_family({"name": "sid", "alpha": alpha}, mu, S, a0, b0)
    z = torch.randn(n, d, generator=gen, dtype=DT)
    e = torch.randn(n, d, generator=gen, dtype=DT)
    z, e = torch.cat([z, -z]), torch.cat([e, -e])
    loss = fam.generator_loss(a + b * z, sigma=s, noise=e)
    return torch.stack(torch.autograd.grad(loss.mean(), (a, b)))


@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("alpha", [1.2, 1.0])
def test_sid_as_implemented_is_descent_direction_in_4d(alpha, setting):
    """With w = mean_d |x - D_T(x_s)| over d >= 2 dimensions, E[grad / w] exists (in 1-D it
    does not, see below) and w concentrates as d grows; checked in d = 4 by Monte Carlo."""
    g = _sid_mc_grad(alpha, *setting, d=4)
    assert_descent(g, *setting, what=f"sid(alpha={alpha}) in 4-D")


@pytest.mark.xfail(strict=True, reason=(
    "DMD normalisation in 1-D: w = |x - D_T(x_s)| is linear in (z, n) and vanishes on a line "
    "where the per-sample gradient does not, so E[grad / w] diverges (1/|y| is not integrable); "
    "the finite-quadrature estimate at this setting is an ascent direction for F, while the "
    "unnormalised estimator (test_sid_unnormalised_is_descent_direction) and the 4-D "
    "normalised one are descent directions. Not a code bug: SiD's own weighting."))
def test_sid_as_implemented_1d_descent_direction():
    setting = (-1.0, 0.5, 0.5, 1.5, 0.7)
    g = expected_grad({"name": "sid", "alpha": 1.2}, *setting)
    assert_descent(g, *setting, what="sid(alpha=1.2, DMD-normalised, 1-D)")


# ---- stop-gradient structure of the surrogates ----------------------------------------------

def _per_sample_dx(fam, x0, sigma, noise):
    x = x0.clone().requires_grad_(True)
    loss = fam.generator_loss(x, sigma=sigma, noise=noise)
    (gx,) = torch.autograd.grad(loss.sum(), x)
    return gx


@pytest.fixture
def samples():
    gen = torch.Generator().manual_seed(1)
    mu, S, a0, b0 = 0.3, 1.1, -0.4, 0.7
    n = 257
    x = a0 + b0 * torch.randn(n, 1, generator=gen, dtype=DT)
    e = torch.randn(n, 1, generator=gen, dtype=DT)
    sigma = torch.exp(torch.randn(n, generator=gen, dtype=DT))  # per-sample noise levels
    return (mu, S, a0, b0), x, e, sigma


@pytest.mark.parametrize("weighting", ["sigma2", "dmd"])
def test_di_surrogate_gradient_is_g_per_sample(samples, weighting):
    (mu, S, a0, b0), x, e, sigma = samples
    fam = oracle_family({"name": "di", "weighting": weighting}, mu, S, a0, b0)
    gx = _per_sample_dx(fam, x, sigma, e)
    s = sigma[:, None]
    x_s = x + s * e
    d_t, d_f = denoiser_oracle(mu, S)(x_s, sigma), denoiser_oracle(a0, b0)(x_s, sigma)
    scale = s**2 if weighting == "sigma2" else (x - d_t).abs()
    torch.testing.assert_close(gx, (d_f - d_t) / scale, rtol=1e-10, atol=1e-12)
    if weighting == "sigma2":  # = score_p_s - score_q_s at x_s
        sp = -(x_s - a0) / (b0**2 + s**2)
        sq = -(x_s - mu) / (S**2 + s**2)
        torch.testing.assert_close(gx, sp - sq, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("divergence", ["kl", "js", "rkl"])
def test_ratio_surrogate_gradient_flows_through_x_s_only(samples, divergence):
    """d L / d x = f''(r) r * d l / d x_s at x_s (for kl: exactly d l / d x_s)."""
    (mu, S, a0, b0), x, e, sigma = samples
    fam = oracle_family(resolve_loss(f"ratio_{divergence}"), mu, S, a0, b0)
    gx = _per_sample_dx(fam, x, sigma, e)
    logit = logratio_oracle(a0, b0, mu, S)
    x_s = (x + sigma[:, None] * e).detach().requires_grad_(True)
    l = logit(x_s, sigma)
    (dl,) = torch.autograd.grad(l.sum(), x_s)
    l = l.detach()[:, None]
    chain = {"kl": torch.ones_like(l), "js": 0.5 * torch.sigmoid(-l), "rkl": torch.exp(-l)}[divergence]
    torch.testing.assert_close(gx, chain * dl, rtol=1e-10, atol=1e-12)
    if divergence == "kl":  # d l / d x_s = score_p_s - score_q_s
        s = sigma[:, None]
        sp = -(x_s - a0) / (b0**2 + s**2)
        sq = -(x_s - mu) / (S**2 + s**2)
        torch.testing.assert_close(gx, (sp - sq).detach(), rtol=1e-10, atol=1e-12)


# ---- ratio: score-free, and its aux loss has the right optimum ------------------------------

@pytest.mark.parametrize("sigma_mode", ["schedule", "fixed"])
@pytest.mark.parametrize("divergence", ["kl", "js", "rkl"])
def test_ratio_never_calls_the_teacher(divergence, sigma_mode):
    mu, S, a0, b0 = 0.3, 1.1, -0.4, 0.7
    cfg = {"name": "ratio", "divergence": divergence, "sigma": sigma_mode}
    fam = losses.build(cfg, raising, logratio_oracle(a0, b0, mu, S), T_MAX)
    assert fam.uses_teacher_score is False
    a, b = theta(a0, b0)
    torch.manual_seed(0)
    x = a + b * torch.randn(64, 1, dtype=DT)
    real = mu + S * torch.randn(64, 1, dtype=DT)
    aux = fam.aux_loss(x, real)
    gen = fam.generator_loss(x)                       # schedule sigma, sampled noise
    gen2 = fam.generator_loss(x, sigma=0.5, noise=torch.randn_like(x))
    for out in (aux, gen, gen2):
        assert out.shape == (64,) and torch.isfinite(out).all()
    (gen.sum() + gen2.sum()).backward()
    assert torch.isfinite(a.grad) and torch.isfinite(b.grad)


@pytest.mark.parametrize("sigma_mode", ["schedule", "fixed"])
def test_ratio_aux_loss_is_minimised_by_the_true_log_ratio(sigma_mode):
    """BCE with label 1 = generator, 0 = data: the optimum logit is log p_s/q_s, so scaling or
    shifting the exact logit (or flipping its sign: swapped labels) must raise the loss.
    Common random numbers: every variant sees the same sigma and noise."""
    mu, S, a0, b0 = 0.3, 1.1, -0.4, 0.7
    exact = logratio_oracle(a0, b0, mu, S)
    gen = torch.Generator().manual_seed(2)
    n = 20000
    x_fake = a0 + b0 * torch.randn(n, 1, generator=gen, dtype=DT)
    x_real = mu + S * torch.randn(n, 1, generator=gen, dtype=DT)

    def bce(transform):
        fam = losses.build({"name": "ratio", "divergence": "kl", "sigma": sigma_mode}, raising,
                           lambda xs, sig: transform(exact(xs, sig)), T_MAX)
        torch.manual_seed(3)
        return float(fam.aux_loss(x_fake, x_real).mean())

    best = bce(lambda l: l)
    for name, tf in {"+0.2": lambda l: l + 0.2, "-0.2": lambda l: l - 0.2,
                     "x1.2": lambda l: 1.2 * l, "x0.8": lambda l: 0.8 * l, "flipped": lambda l: -l}.items():
        other = bce(tf)
        assert other > best, f"aux BCE with logit {name} ({other:.6f}) <= with the exact log-ratio ({best:.6f})"
