"""The ONE training loop for one-step generators ``G(z) = D(sigma_init z; sigma_init)``,
whatever the loss family.

Per iteration: ``aux_steps`` updates of the auxiliary network on fresh, detached generator
samples, then one generator update; EMA of the generator; progress counted in images (kimg).
Every evaluation (each ``eval.every_kimg``, and at the end) also writes a complete checkpoint
atomically, so a resumed run continues bit-for-bit where the last one stopped (the RNG state is
in the checkpoint and evaluation runs on a forked RNG). A non-finite loss ends the run with
status ``diverged``.

Data parallel (``resources.workers`` > 1): the same loop runs on every Ray Train worker with a
``parallel.Shard``; its three hooks (DDP-wrapped generator and auxiliary net, per-sample draws
cut to this rank's rows of the global batch, a collective divergence check) are all it takes,
and rank 0 alone evaluates and checkpoints (see ``harness.core.parallel``).
"""
from __future__ import annotations

import contextlib
import copy
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from harness import __version__
from harness.core import losses, nets, perf, verifier
from harness.core.diffusion import Denoiser, OneStepGenerator, ema_beta
from harness.core.inits import InitContext, derive_seed, init_aux, init_generator
from harness.core.io import CheckpointError, checkpoint_ok, ema_update, save_checkpoint
from harness.core.io import load_torch as load_checkpoint
from harness.core.parallel import SINGLE, Shard
from harness.declare.config import steps
from harness.declare.hashing import canonical_json, identity


@dataclass
class Evaluation:
    """What one evaluation reports to the caller (the cell turns it into result rows)."""

    kimg: float
    step: int
    metrics: dict[str, float]
    status: str  # running | done | diverged
    wall_s: float  # training compute seconds so far (all resumes together)
    samples: torch.Tensor | None = None  # the evaluation's samples (all eval.n), float, on CPU
    message: str | None = None
    extra_rows: list = field(default_factory=list)  # more metric rows (the verifier's, at the end)
    # The generator's optimisation at the step before this evaluation, per parameter group:
    # {"grad_norm/<group>": L2 norm of the gradient, "update_norm/<group>": L2 norm of the
    # parameter change Adam made, "param_norm/<group>": L2 norm of the weights after it}. A
    # generator whose updates are tiny against its weights is not learning, whatever its init.
    optim: dict[str, float] = field(default_factory=dict)


class GroupNorms:
    """Per-group gradient, update and weight norms of one optimiser step (``Evaluation.optim``)."""

    def __init__(self, module: torch.nn.Module):
        params = dict(module.named_parameters())
        self.groups = {g: [params[n] for n in names]
                       for g, names in nets.parameter_groups(module).items()}
        self.before: dict[str, list[torch.Tensor]] = {}
        self.norms: dict[str, float] = {}

    @staticmethod
    def _norm(tensors) -> float:
        return float(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(t.detach().float()) for t in tensors])))

    def before_step(self):
        self.norms = {}
        for g, ps in self.groups.items():
            grads = [p.grad for p in ps if p.grad is not None]
            self.norms[f"grad_norm/{g}"] = self._norm(grads) if grads else 0.0
        self.before = {g: [p.detach().clone() for p in ps] for g, ps in self.groups.items()}

    def after_step(self) -> dict[str, float]:
        for g, ps in self.groups.items():
            self.norms[f"update_norm/{g}"] = self._norm(
                [p.detach() - b for p, b in zip(ps, self.before[g])])
            self.norms[f"param_norm/{g}"] = self._norm(ps)
        self.before = {}
        return dict(self.norms)


@contextlib.contextmanager
def frozen(module: torch.nn.Module):
    """Parameters stop accumulating gradients; gradients still flow through the inputs."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(module.parameters(), flags):
            p.requires_grad_(f)


def build_student(cfg: dict, teacher_state: dict, shape: tuple, sigma_data: float,
                  init_extra: dict | None = None):
    """Generator and auxiliary network at step 0: G from the init scheme, the auxiliary network
    from ``aux_init``. ``init_extra``: more ``inits.InitContext`` fields (cache, teacher_id,
    source_state, device)."""
    arch, st, seed = cfg["teacher"]["arch"], cfg["student"], cfg["seed"]
    width = cfg["teacher"].get("channels")
    ctx = InitContext(teacher_state, lambda: nets.build(arch, shape, width), seed, st["sigma_init"],
                      sigma_data, shape, **(init_extra or {}))
    gen_init = init_generator(cfg["init"], ctx)
    net = nets.build(arch, shape, width)
    net.load_state_dict(gen_init.state)
    generator = OneStepGenerator(Denoiser(net, sigma_data), st["sigma_init"], gen_init.sigma_feat)

    family = losses.family_class(cfg["loss"])
    if family.aux_kind == "ratio":
        if st["ratio_net"] != "encoder":
            raise ValueError(f"student.ratio_net {st['ratio_net']!r} unknown; known: encoder")
        build_aux = lambda: nets.build_ratio(arch, shape, width)  # noqa: E731
        wrap = nets.RatioNet
    else:
        build_aux = lambda: nets.build(arch, shape, width)  # noqa: E731
        wrap = Denoiser
    aux_net = build_aux()
    aux_net.load_state_dict(init_aux(st["aux_init"], teacher_state, build_aux, seed))
    return generator, wrap(aux_net, sigma_data)


def train_student(cfg: dict, teacher: Denoiser, data: torch.Tensor, sigma_data: float,
                  evaluate: Callable[[torch.Tensor], dict], ckpt_path: str | None,
                  report: Callable[[Evaluation], None], device="cpu",
                  max_steps: int | None = None, init_extra: dict | None = None,
                  shard: Shard = SINGLE) -> Evaluation:
    """Train one cell's generator; resume from ``ckpt_path`` if it exists.

    Args:
        cfg: resolved cell config (``config.resolve_cell``).
        teacher: frozen teacher denoiser: its weights feed the init schemes; only the
            teacher-score families call it.
        data: the training set as one tensor on ``device``, float in data range.
        evaluate: ``eval.n`` generated samples -> {metric name: value}.
        ckpt_path: the checkpoint file (read at start if present, rewritten at every eval);
            None: no checkpoints (``harness bench`` times steps of nets of any size).
        report: called with every Evaluation (rows, samples, progress).
        max_steps: stop (checkpointed, status ``running``) after this many total steps:
            simulates an interruption in tests.
        init_extra: passed to ``build_student`` (what some init schemes need besides weights).
        shard: this worker's rank of a data-parallel cell (``harness.core.parallel``); other ranks
            than 0 get ``report`` calls with no metrics and no samples (``evaluate`` unused).
    Returns: the last Evaluation.
    """
    device = torch.device(device)
    st, ev = cfg["student"], cfg["eval"]
    batch = st["batch"]
    local = shard.local_batch(batch)  # this worker's share of the global batch
    total_steps = steps(st["kimg"], batch)
    eval_every = max(1, round(ev["every_kimg"] * 1000 / batch))
    n_eval = ev["n"]
    teacher.to(device).eval().requires_grad_(False)
    teacher_state = {k: v.detach().cpu() for k, v in teacher.net.state_dict().items()}

    # Construct nets, optimizers and the loss family.
    shape = tuple(data.shape[1:])
    generator, aux = build_student(cfg, teacher_state, shape, sigma_data,
                                   {"device": str(device), **(init_extra or {})})
    generator.to(device).train()
    aux.to(device).train()
    frozen_groups = set(cfg["init"].get("freeze") or ())  # init teacher, freeze: no updates
    for name, p in generator.denoiser.net.named_parameters():
        if nets.group_of(name) in frozen_groups:
            p.requires_grad_(False)
    # Precision, layout, compilation (harness.core.perf): `run(m)` is what to call for module m.
    run = perf.apply(st, device, [generator, aux, teacher])
    amp = run.amp
    gen_fn, aux_fn = run(generator), run(aux)
    if shard.world > 1:  # DDP (ray.train.torch.prepare_model) averages the gradients
        gen_fn, aux_fn = shard.wrap(generator, st), shard.wrap(aux, st)
    ema = copy.deepcopy(generator).eval().requires_grad_(False)
    # Adam with beta1 = 0, as SiD and DMD use for one-step distillation.
    opt_g = torch.optim.Adam([p for p in generator.parameters() if p.requires_grad], lr=st["lr"], betas=(0.0, 0.999), eps=1e-8)
    opt_a = torch.optim.Adam(aux.parameters(), lr=st["aux_lr"], betas=(0.0, 0.999), eps=1e-8)
    family = losses.build(cfg["loss"], run(teacher), aux_fn, st["t_max"])
    beta = ema_beta(batch, st["ema_halflife_kimg"])
    norms = GroupNorms(generator.denoiser.net)
    optim: dict[str, float] = {}  # the last measured step's GroupNorms

    # Resume, or start from the init scheme's weights.
    step, wall, last = 0, 0.0, None
    if ckpt_path and os.path.exists(ckpt_path) and not checkpoint_ok(ckpt_path):
        aside = ckpt_path + ".bad"
        os.replace(ckpt_path, aside)
        print(f"note: checkpoint {ckpt_path} does not match its recorded sha256 (damaged in "
              f"storage); moved to {aside}, and this cell starts again from step 0",
              file=sys.stderr)
    if ckpt_path and os.path.exists(ckpt_path):
        state = load_checkpoint(ckpt_path)
        if canonical_json(identity(state.get("config") or {})) != canonical_json(identity(cfg)):
            raise CheckpointError(f"checkpoint {ckpt_path!r} belongs to another cell config; "
                                  "move it aside or point this cell at its own checkpoint path")
        generator.load_state_dict(state["generator"])
        aux.load_state_dict(state["aux"])
        ema.load_state_dict(state["ema"])
        opt_g.load_state_dict(state["opt_g"])
        opt_a.load_state_dict(state["opt_aux"])
        torch.set_rng_state(state["rng"])
        if device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"], device)
        step, wall = state["step"], state["wall_s"]
    else:  # every rank of a data-parallel cell too: one stream, cut per rank (parallel.Shard)
        torch.manual_seed(derive_seed(cfg["seed"], "train"))

    def checkpoint():
        if not ckpt_path or not shard.lead:
            return
        save_checkpoint({"generator": generator.state_dict(), "aux": aux.state_dict(),
                     "ema": ema.state_dict(), "opt_g": opt_g.state_dict(),
                     "opt_aux": opt_a.state_dict(), "rng": torch.get_rng_state(),
                     "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                     "step": step, "wall_s": wall, "config": cfg, "version": __version__},
                    ckpt_path)

    def evaluation(status: str, message=None) -> Evaluation:
        if not shard.lead:  # rank 0 evaluates; the others only keep in step with its reports
            return Evaluation(step * batch / 1000, step, {}, status, wall, None, message)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            z = torch.randn(n_eval, *shape, device=device,
                            generator=torch.Generator(device).manual_seed(
                                derive_seed(cfg["seed"], "eval") % 2**62))
            with torch.no_grad(), amp:
                x = torch.cat([ema(chunk) for chunk in z.split(500)]).float()
            metrics = evaluate(x) if status != "diverged" else {}
            extra = []
            if status == "done":  # eval.verifier: best-of-n / resampled scores (harness.core.verifier)
                def sample_fn(zz):
                    with amp:
                        return ema(zz)

                extra = verifier.cell_rows(cfg, evaluate, sample_fn, aux, teacher_state, data,
                                           sigma_data, device, plain=metrics, amp=amp)
        return Evaluation(step * batch / 1000, step, metrics, status, wall, x.cpu(), message,
                          extra, optim)

    def emit(status: str, message=None) -> Evaluation:
        result = evaluation(status, message)
        if status != "diverged":
            checkpoint()
        report(result)
        return result

    if step == 0:
        last = emit("running")
    # Train: aux updates on detached samples, then one generator update, then EMA.
    n_data = data.shape[0]
    while step < total_steps:
        t0 = time.perf_counter()
        with shard.draws(local):
            for _ in range(st["aux_steps"]):
                with torch.no_grad(), amp:
                    x_fake = gen_fn(torch.randn(local, *shape, device=device))
                x_real = data[torch.randint(n_data, (local,), device=device)]
                with amp:
                    aux_loss = family.aux_loss(x_fake.float(), x_real).mean()
                opt_a.zero_grad(set_to_none=True)
                aux_loss.backward()
                opt_a.step()
            with frozen(aux), amp:
                x_gen = gen_fn(torch.randn(local, *shape, device=device))
                gen_loss = family.generator_loss(x_gen).mean()
            opt_g.zero_grad(set_to_none=True)
            gen_loss.backward()
            measure = shard.lead and ((step + 1) % eval_every == 0 or step + 1 == total_steps)
            if measure:  # only the step an evaluation reports: a copy of the weights is cheap once
                norms.before_step()
            opt_g.step()
            if measure:
                optim = norms.after_step()
        if not shard.all_finite(gen_loss, aux_loss):
            step += 1
            return emit("diverged", f"non-finite loss at step {step}: generator "
                                    f"{gen_loss.item():.3g}, aux {aux_loss.item():.3g}")
        ema_update(ema, generator, beta)
        step += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall += time.perf_counter() - t0
        if step == total_steps:
            return emit("done")
        if step % eval_every == 0:
            last = emit("running")
        if max_steps is not None and step >= max_steps:
            if step % eval_every:
                checkpoint()
            return last
    return emit("done")

