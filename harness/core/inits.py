"""Initialization schemes for the generator's weights at step 0, and the aux init.

Each scheme is a function ``(InitContext, params) -> GeneratorInit`` registered by the name
study files use. ``ctx.build()`` constructs a fresh network of the teacher's architecture; a
fresh network built under a seed is "the architecture's own initialization". Its output conv is
EDM-style near zero, so re-initializing a group with it (``reinit: fresh``) starves the body of
gradient at step 0; ``matched`` rescales each re-initialized tensor to the teacher's RMS.
Seeds come from the cell's seed and a purpose string, so ``random`` at seed 0 is the same
network for every loss family (a paired comparison).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from harness.base.digest import json_sha256
from harness.base.registry import Registry
from harness.core.diffusion import Denoiser, OneStepGenerator
from harness.core.io import load_torch, save_atomic
from harness.core.nets import group_of
from harness.declare.config import declare_init

INITS = Registry("init scheme")


def register_init(name: str, params: dict | None = None):
    """Decorator for a new init scheme, a function ``(InitContext, params) -> GeneratorInit``:
    declares ``name`` and its parameters (``{name: harness.declare.config.param(...)}``) for
    study files and registers the function."""
    def deco(fn):
        declare_init(name, params or {})
        return INITS.register(name)(fn)
    return deco


class InitError(ValueError):
    pass


@dataclass
class GeneratorInit:
    state: dict[str, torch.Tensor]
    sigma_feat: float | None = None  # pinned noise conditioning (feature_transplant)


@dataclass
class InitContext:
    """What a scheme may use: the teacher's weights, the architecture and the generator's setup."""

    teacher_state: dict  # the study's teacher (EMA weights)
    build: Callable[[], nn.Module]  # a fresh raw network of the teacher's architecture
    seed: int  # the cell's seed
    sigma_init: float = 2.5
    sigma_data: float = 0.5
    shape: tuple = ()
    cache: str | None = None  # where mapping_match keeps its regressed networks
    teacher_id: str = ""
    source_state: dict | None = None  # init: {name: teacher, source: ...}: that teacher's weights
    device: str = "cpu"


def derive_seed(seed: int, purpose: str) -> int:
    """A 63-bit seed from an explicit seed and what it is for."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{purpose}".encode()).digest()[:8], "big") >> 1


def fresh_state(build: Callable[[], nn.Module], seed: int) -> dict[str, torch.Tensor]:
    """The architecture's own initialization under ``seed`` (global RNG left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return {k: v.detach().clone() for k, v in build().state_dict().items()}


def _check_same_architecture(teacher_state: dict, fresh: dict):
    if teacher_state.keys() != fresh.keys() or any(
            teacher_state[k].shape != fresh[k].shape for k in fresh):
        missing = sorted(set(fresh) - set(teacher_state))[:3]
        raise InitError("the teacher's weights do not fit the generator's architecture "
                        f"(e.g. missing {missing or 'none'}); train or point to a teacher of "
                        "the same teacher.arch as the study")


def _copy(state: dict) -> dict:
    return {k: v.detach().clone() for k, v in state.items()}


def _fresh(ctx: InitContext) -> dict:
    fresh = fresh_state(ctx.build, derive_seed(ctx.seed, "generator-init"))
    _check_same_architecture(ctx.teacher_state, fresh)
    return fresh


def matched(fresh: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The fresh tensor rescaled to the teacher tensor's RMS; a constant fresh init (norm gains,
    zero biases) is kept as it is."""
    if fresh.numel() < 2 or bool((fresh == fresh.reshape(-1)[0]).all()):
        return fresh.clone()
    rms_fresh = fresh.double().pow(2).mean().sqrt()
    rms_teacher = teacher.double().pow(2).mean().sqrt()
    return (fresh.double() * (rms_teacher / rms_fresh)).to(fresh.dtype)


def _reset(ctx: InitContext, groups, reinit: str) -> dict:
    """Teacher weights with ``groups`` re-initialized: ``fresh`` (the architecture's own init) or
    ``matched`` (that init rescaled to each teacher tensor's RMS)."""
    fresh = _fresh(ctx)
    out = {}
    for k, v in ctx.teacher_state.items():
        if group_of(k) not in groups:
            out[k] = v.detach().clone()
        elif reinit == "fresh":
            out[k] = fresh[k]
        else:
            out[k] = matched(fresh[k], v)
    return out


@INITS.register("teacher")
def teacher_init(ctx: InitContext, params) -> GeneratorInit:
    """An exact copy of the teacher's weights, or of the ``source`` teacher's."""
    state = ctx.teacher_state if params.get("source") is None else ctx.source_state
    if state is None:
        raise InitError("init teacher with a source: the source teacher's weights were not given")
    _check_same_architecture(state, ctx.build().state_dict())
    return GeneratorInit(_copy(state))


@INITS.register("random")
def random_init(ctx: InitContext, params) -> GeneratorInit:
    """The architecture's fresh initialization, seeded from the cell's seed."""
    return GeneratorInit(_fresh(ctx))


@INITS.register("reset_layers")
def reset_layers(ctx: InitContext, params) -> GeneratorInit:
    """Teacher weights with the named parameter groups re-initialized (``reinit``)."""
    return GeneratorInit(_reset(ctx, set(params["groups"]), params["reinit"]))


@INITS.register("feature_transplant")
def feature_transplant(ctx: InitContext, params) -> GeneratorInit:
    """Every teacher weight kept, the conditioning pinned to c_noise(sigma_feat); with
    ``reset_output`` the output group is also re-initialized (``reinit``)."""
    sigma_feat = params.get("sigma_feat")
    if sigma_feat is None or not sigma_feat > 0:
        raise InitError(f"feature_transplant needs sigma_feat > 0, got {sigma_feat!r}")
    state = (_reset(ctx, {"output"}, params["reinit"]) if params["reset_output"]
             else _copy(ctx.teacher_state))
    return GeneratorInit(state, float(sigma_feat))


def mapping_id(ctx: InitContext, params) -> str:
    doc = {"teacher": ctx.teacher_id, "seed": ctx.seed, "sigma_init": ctx.sigma_init,
           "sigma_data": ctx.sigma_data, "shape": list(ctx.shape),
           **{k: params[k] for k in ("steps", "lr", "batch")}}
    return "m-" + json_sha256(doc)[:12]


@INITS.register("mapping_match")
def mapping_match(ctx: InitContext, params) -> GeneratorInit:
    """A ``random`` network regressed (MSE, Adam) onto the teacher-init generator's outputs
    ``D_T(sigma_init z; sigma_init)`` on fresh z: the teacher's latent-to-output mapping without
    its features. Cached under ``<cache>/mappings/<id>.pt`` (id: teacher, seed, setup, params)."""

    path = None
    if ctx.cache:
        path = os.path.join(ctx.cache, "mappings", mapping_id(ctx, params) + ".pt")
        if os.path.exists(path):
            return GeneratorInit(load_torch(path)["state"])
    device = torch.device(ctx.device)
    target_net = ctx.build()
    target_net.load_state_dict(ctx.teacher_state)
    target = OneStepGenerator(Denoiser(target_net, ctx.sigma_data), ctx.sigma_init).to(device)
    target.eval().requires_grad_(False)
    net = ctx.build()
    net.load_state_dict(_fresh(ctx))
    student = OneStepGenerator(Denoiser(net, ctx.sigma_data), ctx.sigma_init).to(device).train()
    opt = torch.optim.Adam(student.parameters(), lr=params["lr"])
    gen = torch.Generator(device).manual_seed(derive_seed(ctx.seed, "mapping-match") % 2**62)
    for _ in range(params["steps"]):
        z = torch.randn(params["batch"], *ctx.shape, device=device, generator=gen)
        with torch.no_grad():
            want = target(z)
        loss = (student(z) - want).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    if path:
        save_atomic({"state": state, "final_mse": float(loss.detach())}, path)
    return GeneratorInit(state)


def init_generator(init_cfg: dict, ctx: InitContext) -> GeneratorInit:
    params = {k: v for k, v in init_cfg.items() if k != "name"}
    return INITS.get(init_cfg["name"])(ctx, params)


def probe_gradients(generator: nn.Module, shape: tuple, seed: int = 0, n: int = 16) -> dict:
    """Gradient norm per parameter group at step 0 under a fixed linear probe ``<G(z), v>``:
    how much gradient reaches each group through the network, whatever the loss (at step 0 with
    ``aux_init: teacher`` the di/sid gradients are exactly zero, so a probe is what can compare
    schemes). Returns {group: norm}."""
    gen = torch.Generator().manual_seed(derive_seed(seed, "probe"))
    z = torch.randn(n, *shape, generator=gen)
    v = torch.randn(n, *shape, generator=gen)
    generator.zero_grad(set_to_none=True)
    (generator(z) * v).sum().div(n).backward()
    norms: dict[str, float] = {}
    for name, p in generator.denoiser.net.named_parameters():
        if p.grad is not None:
            g = group_of(name)
            norms[g] = norms.get(g, 0.0) + float(p.grad.double().pow(2).sum())
    generator.zero_grad(set_to_none=True)
    return {g: v ** 0.5 for g, v in norms.items()}


def init_aux(aux_init: str, teacher_state, build_aux, seed: int) -> dict[str, torch.Tensor]:
    """Aux-network weights: ``teacher`` copies every tensor the teacher has under the same name
    (all of a fake score; the encoder half of a ratio net, whose head stays fresh), ``random``
    keeps the fresh init."""
    fresh = fresh_state(build_aux, derive_seed(seed, "aux-init"))
    if aux_init == "random":
        return fresh
    if aux_init != "teacher":
        raise InitError(f"unknown aux_init {aux_init!r}; known: teacher, random")
    shared = [k for k in fresh if k in teacher_state]
    if not shared or any(teacher_state[k].shape != fresh[k].shape for k in shared):
        raise InitError("the teacher's weights do not fit the auxiliary network; use a teacher "
                        "of the study's teacher.arch")
    return {k: (teacher_state[k].detach().clone() if k in teacher_state else v)
            for k, v in fresh.items()}
