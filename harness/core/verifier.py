"""The density-ratio network as a verifier for inference-time scaling.

A one-step generator G has drawn its samples from p = p_gen; the data follow q = q_data. The
``ratio`` loss family trains c_phi(x, s) by binary cross-entropy (label 1: noised generator
samples, label 0: noised data) so that at its optimum ``l = c_phi(x, s) = log p_s(x) / q_s(x)``,
with p_s, q_s the distributions noised by N(0, s^2 I). That logit is a *verifier*: spend n
generator evaluations per kept sample and let the ratio decide which one to keep.

Why weights exp(-l) target q
    If l is exact, w(x) = exp(-l(x)) = q(x) / p(x). Draw x_1..x_n ~ p i.i.d. and keep x_J with
    P(J = j) = w_j / sum_i w_i (self-normalised importance resampling, ``mode='resample'``). The
    kept sample has density ``q(x) * E[n / (w(x) + S_{n-1})]``, S_{n-1} the sum of n - 1 further
    i.i.d. weights. Since E_p[w] = int q = 1, S_{n-1}/n -> 1 and the factor -> 1: the kept samples
    converge in law to q as n grows. n = 1 is the generator itself. Nothing needs p or q
    normalised, and q must be covered by p (q > 0 => p > 0); a generator that misses a mode
    cannot be repaired by resampling, only reweighted inside its own support.

Bias at finite n
    The factor E[n / (w(x) + S_{n-1})] is < 1 where w(x) is large (Jensen): finite-n SIR
    under-represents the regions the generator under-covers most, and the law sits between p
    (n = 1) and q (n -> inf), with an O(1/n) bias. How large n must be is set by how far p is from
    q: the weights' variance is chi^2(q || p), and the sample size for self-normalised IS to be
    accurate grows like exp(KL(q || p)) (Chatterjee & Diaconis 2018). So the verifier helps most
    where the generator is already close; heavy-tailed weights (p narrower than q) converge slowly.
    ``mode='best'`` keeps the lowest-logit (highest q/p) candidate instead: not a sampler of q,
    it concentrates on the regions the ratio net rates most data-like (sharper, less diverse), and
    as n -> inf collapses onto the ratio's maximum; it is the "best-of-n" baseline beside SIR.

What the noise level sigma does
    The ratio net is trained on *noised* distributions: l_s = log p_s / q_s, s from the
    generator-loss schedule (u ~ U(0, t_max) mapped by ``diffusion.generator_sigma``). A
    candidate x is scored as ``l = c_phi(x + sigma * eps, sigma)`` with seeded eps ~ N(0, I). As
    sigma -> 0, p_s -> p and q_s -> q, so at small sigma l approximates the clean log ratio the
    derivation needs; as sigma grows both noised distributions approach the same Gaussian, l_s
    -> 0 and the weights become uniform: the verifier then does nothing (no gain, no harm).
    Small sigma is faithful but the clean ratio of two distributions near a data manifold is
    ill-conditioned and the net's estimate there is noisy; moderate sigma is smoother and better
    trained but a blurrier criterion. The noise eps adds variance to the weights (one draw per
    candidate). ``sigma`` is therefore a setting of the verifier (a grid axis if wanted); the
    family ``ratio[fixed]`` was trained at sigma_min only and is scored there.

Cost
    Per kept sample: n generator evaluations + n ratio-net evaluations (n = 1: one generator
    evaluation and no ratio evaluation). The default ratio net is the encoder half of the UNet
    plus a head, so one ratio evaluation costs roughly half a generator evaluation; the rows
    ``nfe_per_sample@<mode><n>`` count evaluations, ``verifier_s_per_sample@<mode><n>`` give the
    measured wall time (generation + scoring + selection) per kept sample, for comparison with the
    teacher's Heun sampler (35 evaluations per sample).

Which ratio net
    ``ratio`` family cells use their own, trained ratio net. It was trained against the *live*
    generator while the samples come from the EMA generator: l then estimates log p_live / q,
    off by log p_ema / p_live (small while the EMA half-life is short against the drift). The
    teacher-score families (``di``, ``sid``) have no ratio net: ``fit_post_hoc_ratio`` trains one
    of the same architecture and init rule with the ratio family's own BCE loss on the frozen EMA
    generator for a fixed budget, reported in seconds (``verifier_fit_s``). ``net: post_hoc``
    refits for every family (one criterion for all, and no live/EMA mismatch).

Seeds and the n = 1 identity
    Column 0 of the candidates is exactly the plain evaluation's draw (``train_student``'s
    ``evaluation()``: z ~ N(0, I) from ``derive_seed(seed, "eval") % 2**62``, generated in chunks
    of 500, cast to float32), so ``n = 1`` reproduces the plain samples and score bit for bit and
    every n > 1 contains the plain samples among its candidates (common random numbers: the n = 4
    vs n = 1 comparison is paired within a cell, not only by seed). The other n - 1 columns come
    from ``derive_seed(seed, f"verifier-{n}")``, the scoring noise from ``verifier-{n}-noise`` and
    the resampling uniforms from ``verifier-{n}-select``. The global RNG is left untouched.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Callable, Sequence

import torch

from harness.core import losses, nets
from harness.core.diffusion import SIGMA_MIN
from harness.core.inits import derive_seed, init_aux
from harness.declare import config as C

MODES = C.VERIFIER["mode"].choices
CHUNK = 500  # samples per generator call in train_student's evaluation()
DEFAULTS = {k: p.default for k, p in C.VERIFIER.items()}
resolve_verifier = C.resolve_verifier  # the one declaration: harness.declare.config.VERIFIER


def tag(mode: str, n: int) -> str:
    """``('resample', 4)`` -> ``'resample4'``: the suffix after ``@`` in verifier metric names."""
    return f"{mode}{int(n)}"


# ------------------------------------------------------------------------------------ select
def _seeded(seed: int, purpose: str, device="cpu") -> torch.Generator:
    return torch.Generator(torch.device(device)).manual_seed(derive_seed(seed, purpose) % 2**62)


def choose(logits: torch.Tensor, mode: str = "resample",
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Index (k,) of the kept candidate per row of ``logits`` (k, n), on the logits' device.

    ``resample``: P(j) proportional to exp(-l_j) (softmax of -l in float64; one uniform per row from
    ``generator``, inverse CDF). ``best``: argmin l (first on ties). A NaN logit gets weight 0; a
    row of NaNs is resampled uniformly (best: index 0).
    """
    if mode not in MODES:
        raise ValueError(f"verifier mode {mode!r} unknown; known: {', '.join(MODES)}")
    if logits.ndim != 2:
        raise ValueError(f"logits must be (k, n), got shape {tuple(logits.shape)}")
    k, n = logits.shape
    lw = -logits.detach().to(torch.float64)
    lw = torch.where(torch.isnan(lw), torch.full_like(lw, -math.inf), lw)
    if mode == "best":
        return lw.argmax(1)
    dev = generator.device if generator is not None else torch.device("cpu")
    lw = lw.to(dev).clamp(max=torch.finfo(torch.float64).max)  # l = -inf: the largest weight
    dead = torch.isneginf(lw).all(1, keepdim=True)
    lw = torch.where(dead, torch.zeros_like(lw), lw)
    cdf = torch.softmax(lw, 1).cumsum(1)
    u = torch.rand(k, 1, generator=generator, dtype=torch.float64, device=dev) * cdf[:, -1:]
    idx = torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_max(n - 1)
    return idx.to(logits.device)


def select(candidates: torch.Tensor, logits: torch.Tensor, mode: str = "resample",
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Keep one of n candidates per row: (k, n, *shape), logits (k, n) -> (k, *shape).

    ``logits``: l = log p_gen / q_data per candidate. ``mode='resample'``: self-normalised
    importance resampling with weights exp(-l) (targets q_data when l is exact); ``'best'``: the
    lowest logit. Deterministic given ``generator`` (a torch.Generator; the uniforms are drawn on
    its device, CPU by default). n = 1 returns ``candidates[:, 0]`` untouched, drawing nothing.
    """
    if candidates.ndim < 2 or tuple(logits.shape) != tuple(candidates.shape[:2]):
        raise ValueError(f"candidates (k, n, ...) and logits (k, n) disagree: "
                         f"{tuple(candidates.shape)} vs {tuple(logits.shape)}")
    if mode not in MODES:
        raise ValueError(f"verifier mode {mode!r} unknown; known: {', '.join(MODES)}")
    if candidates.shape[1] == 1:
        return candidates[:, 0]
    idx = choose(logits, mode, generator).to(candidates.device)
    return candidates[torch.arange(candidates.shape[0], device=candidates.device), idx]


# ------------------------------------------------------------------------------------ sampling
def _logits(ratio_net, x: torch.Tensor, sigma: float, g_eps: torch.Tensor, chunk: int):
    eps = torch.randn(x.shape, generator=g_eps, device=x.device, dtype=x.dtype)
    x_s = x + sigma * eps if sigma else x
    s = torch.full((x.shape[0],), float(sigma), device=x.device, dtype=x.dtype)
    return torch.cat([ratio_net(xc, sc).reshape(-1)
                      for xc, sc in zip(x_s.split(chunk), s.split(chunk))])


@torch.no_grad()
def verified_samples(sample_fn: Callable[[torch.Tensor], torch.Tensor], ratio_net, k: int, n: int,
                     mode: str = "resample", sigma: float = DEFAULTS["sigma"], seed: int = 0,
                     device="cpu", *, shape: Sequence[int], chunk: int = CHUNK) -> torch.Tensor:
    """k kept samples, each chosen among n one-step candidates by the ratio net: (k, *shape).

    Args:
        sample_fn: z -> samples (the EMA generator, wrapped in the run's autocast by the caller);
            called under no_grad on chunks of at most ``chunk`` latents; outputs are cast to
            float32 as the plain evaluation does.
        ratio_net: (x, sigma (N,)) -> logits (N,) = log p_gen / q_data at noise level sigma.
        sigma: candidates are scored at x + sigma * eps (sigma = 0: x itself; only for an exact
            ratio function, a RatioNet needs sigma > 0).
        seed: the cell's seed. shape: per-sample shape. chunk: 500 = train_student's chunking,
            which n = 1 needs to reproduce the plain samples bit for bit.
    Column 0 of the candidates is the plain evaluation's draw (see the module docstring), so n = 1
    returns exactly the plain samples and never calls ``ratio_net``.
    """
    if n < 1 or k < 1:
        raise ValueError(f"verifier needs k >= 1 and n >= 1, got k={k}, n={n}")
    if mode not in MODES:
        raise ValueError(f"verifier mode {mode!r} unknown; known: {', '.join(MODES)}")
    device = torch.device(device)
    shape = tuple(shape)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        z0 = torch.randn(k, *shape, device=device, generator=_seeded(seed, "eval", device))
        x0 = torch.cat([sample_fn(c) for c in z0.split(chunk)]).float()
        if n == 1:
            return x0
        g_z = _seeded(seed, f"verifier-{n}", device)
        g_eps = _seeded(seed, f"verifier-{n}-noise", device)
        g_sel = _seeded(seed, f"verifier-{n}-select")
        rows = max(1, chunk // n)
        out = []
        for r0 in range(0, k, rows):
            first = x0[r0:r0 + rows]
            r = first.shape[0]
            z = torch.randn(r * (n - 1), *shape, device=device, generator=g_z)
            more = torch.cat([sample_fn(c) for c in z.split(chunk)]).float()
            cand = torch.cat([first[:, None], more.reshape(r, n - 1, *shape)], 1)
            logits = _logits(ratio_net, cand.flatten(0, 1), sigma, g_eps, chunk).reshape(r, n)
            out.append(select(cand, logits, mode, g_sel))
        return torch.cat(out)


# ------------------------------------------------------------------------------------ post hoc
def fit_post_hoc_ratio(sample_fn: Callable[[torch.Tensor], torch.Tensor], data: torch.Tensor,
                       build_ratio: Callable[[], torch.nn.Module], teacher_state: dict | None,
                       sigma_data: float, aux_init: str = "teacher", steps: int = 500,
                       batch: int = 64, lr: float = 1e-4, t_max: float = 0.8, seed: int = 0,
                       device="cpu"):
    """A ratio net for a family that has none (di, sid), fitted on the FROZEN generator.

    Same architecture and init rule as the ratio family's aux (``build_ratio`` builds the raw
    backbone, e.g. ``lambda: nets.build_ratio(arch, shape)``; ``inits.init_aux(aux_init,
    teacher_state, build_ratio, seed)``; wrapped in ``nets.RatioNet``), same loss (the
    ``DensityRatio`` family's ``aux_loss``: BCE, label 1 for noised generator samples, 0 for noised
    data, one s per pair from the generator schedule with ``t_max``) and optimizer (Adam, beta1 =
    0) as ``train_student``, for ``steps`` updates of ``batch`` generator and data samples.
    ``sample_fn`` is only called under no_grad: the generator's weights are never touched.
    Runs on a forked RNG seeded from ``derive_seed(seed, 'verifier-fit')``.

    Returns: (the trained RatioNet in eval mode, wall seconds the fit took).
    """

    device = torch.device(device)
    t0 = time.perf_counter()
    data = torch.as_tensor(data).to(device)
    shape = tuple(data.shape[1:])
    net = build_ratio()
    net.load_state_dict(init_aux(aux_init, teacher_state, build_ratio, seed))
    aux = nets.RatioNet(net, sigma_data).to(device).train()
    family = losses.build(C.resolve_loss("ratio"), None, aux, t_max)  # its BCE aux loss
    opt = torch.optim.Adam(aux.parameters(), lr=lr, betas=(0.0, 0.999), eps=1e-8)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(derive_seed(seed, "verifier-fit"))
        for _ in range(int(steps)):
            with torch.no_grad():
                x_fake = sample_fn(torch.randn(batch, *shape, device=device)).float()
            x_real = data[torch.randint(data.shape[0], (batch,), device=device)]
            loss = family.aux_loss(x_fake, x_real).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"post-hoc ratio fit: non-finite BCE loss {loss.item()}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return aux.eval().requires_grad_(False), time.perf_counter() - t0


# ------------------------------------------------------------------------------------ rows
def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def evaluate(evaluator, sample_fn, ratio_net, ns: Sequence[int], mode: str, sigma: float,
             seed: int, device="cpu", *, shape: Sequence[int], plain: dict | None = None,
             fit_s: float | None = None, source: str = "the ratio net",
             chunk: int = CHUNK) -> list[dict]:
    """Score the verified samples for every n in ``ns``; result-row dicts (metric, value, protocol).

    ``evaluator``: a ``harness.core.metrics.Evaluator`` (called on exactly ``evaluator.n`` samples).
    Rows per n: ``<metric>@<mode><n>`` for every name in ``evaluator.metric_names``,
    ``nfe_per_sample@<mode><n>`` and ``verifier_s_per_sample@<mode><n>``; plus ``verifier_fit_s``
    when ``fit_s`` is given (a post-hoc ratio net was fitted). ``plain``: the plain evaluation's
    metrics; n = 1 rows then carry them without scoring again (its samples are identical).
    ``source``: words for the protocol naming which ratio net scored the candidates.
    The caller adds the cell's columns (study, cell, kimg, ...), as ``run_cell``'s report does.
    """
    k = int(evaluator.n)
    names = tuple(evaluator.metric_names)
    rows = []
    for n in sorted(set(int(v) for v in ns)):
        t = tag(mode, n)
        _sync(device)
        t0 = time.perf_counter()
        x = verified_samples(sample_fn, ratio_net, k, n, mode, sigma, seed, device, shape=shape,
                             chunk=chunk)
        _sync(device)
        dt = time.perf_counter() - t0
        scores = dict(plain) if (n == 1 and plain is not None) else evaluator(x)
        rule = ("self-normalised importance resampling, weights exp(-l)" if mode == "resample"
                else "lowest l kept")
        how = ("n=1: the plain one-step samples, no verifier" if n == 1 else
               f"ratio verifier: {rule} among n={n} one-step candidates per kept sample, "
               f"l = {source} at x + sigma*eps, sigma={sigma:g}")
        rows += [{"metric": f"{m}@{t}", "value": float(scores.get(m, math.nan)),
                  "protocol": f"{evaluator.protocol}; {how}"} for m in names]
        rows.append({"metric": f"nfe_per_sample@{t}", "value": float(n + (n if n > 1 else 0)),
                     "protocol": "function evaluations per kept sample: n generator + n ratio-net "
                                 "(n=1: 1 generator, no ratio net)"})
        rows.append({"metric": f"verifier_s_per_sample@{t}", "value": dt / k,
                     "protocol": f"wall seconds per kept sample ({k} kept): n candidates "
                                 f"generated, noised, scored and selected on "
                                 f"{torch.device(device).type}"})
    if fit_s is not None:
        rows.append({"metric": "verifier_fit_s", "value": float(fit_s),
                     "protocol": f"wall seconds to fit the post-hoc ratio net ({source})"})
    return rows


def cell_rows(cfg: dict, evaluator, sample_fn, aux, teacher_state: dict, data: torch.Tensor,
              sigma_data: float, device="cpu", *, plain: dict | None = None,
              amp=None) -> list[dict]:
    """The verifier rows of one cell at its final evaluation (``[]`` unless ``eval.verifier``).

    ``sample_fn``: z -> EMA generator samples (wrapped in the run's autocast by the caller).
    ``aux``: the cell's auxiliary nn.Module (its ratio net for the ``ratio`` family; ignored
    otherwise and with ``net: post_hoc``, where a ratio net is fitted on the frozen
    ``sample_fn``). ``teacher_state``: the teacher's weights (the post-hoc net's ``aux_init``).
    ``plain``: the plain evaluation's metrics (n = 1 rows reuse them). ``amp``: the run's autocast
    context (``perf.Step.amp``) to score candidates under; None: full precision.
    """

    vcfg = resolve_verifier(cfg["eval"].get("verifier"))
    if vcfg is None:
        return []
    st = cfg["student"]
    shape = tuple(data.shape[1:])
    sigma, fit_s = vcfg["sigma"], None
    own = losses.family_class(cfg["loss"]).aux_kind == "ratio" and vcfg["net"] == "auto"
    if own:
        net = aux
        if cfg["loss"].get("sigma") == "fixed":
            sigma = SIGMA_MIN  # ratio[fixed] learned its ratio at sigma_min only
        source = "the cell's own ratio net (trained against the live generator)"
    else:
        arch, width = cfg["teacher"]["arch"], cfg["teacher"].get("channels")
        batch, lr = vcfg["fit_batch"] or st["batch"], vcfg["fit_lr"] or st["aux_lr"]
        net, fit_s = fit_post_hoc_ratio(
            sample_fn, data, lambda: nets.build_ratio(arch, shape, width), teacher_state, sigma_data,
            st["aux_init"], vcfg["fit_steps"], batch, lr, st["t_max"], cfg["seed"], device)
        source = (f"a post-hoc ratio net ({vcfg['fit_steps']} BCE steps of batch {batch}, lr "
                  f"{lr:g}, aux_init {st['aux_init']}, on the frozen EMA generator)")
    def ratio_fn(x, s):
        with amp if amp is not None else contextlib.nullcontext():
            return net(x, s).float()

    was_training = net.training
    net.eval()
    try:
        return evaluate(evaluator, sample_fn, ratio_fn, vcfg["n"], vcfg["mode"], sigma,
                        cfg["seed"], device, shape=shape, plain=plain, fit_s=fit_s, source=source)
    finally:
        net.train(was_training)
