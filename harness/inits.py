"""Initialization schemes for the generator's weights at step 0 (SPEC §4), and the aux init.

Each scheme is a function ``(teacher_state, build, params, seed) -> GeneratorInit`` registered
by the name study files use. ``build()`` constructs a fresh network of the teacher's
architecture; a fresh network built under a seed is "the architecture's own initialization".
Seeds come from the cell's seed and a purpose string, so ``random`` at seed 0 is the same
network for every loss family (a paired comparison).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .nets import group_of
from .registry import Registry

INITS = Registry("init scheme")


class InitError(ValueError):
    pass


@dataclass
class GeneratorInit:
    state: dict[str, torch.Tensor]
    sigma_feat: float | None = None  # pinned noise conditioning (feature_transplant)


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


def _reset(teacher_state: dict, build, groups, seed: int) -> dict:
    fresh = fresh_state(build, derive_seed(seed, "generator-init"))
    _check_same_architecture(teacher_state, fresh)
    return {k: (fresh[k] if group_of(k) in groups else v.detach().clone())
            for k, v in teacher_state.items()}


@INITS.register("teacher")
def teacher_init(teacher_state, build, params, seed) -> GeneratorInit:
    """An exact copy of the teacher's weights."""
    _check_same_architecture(teacher_state, build().state_dict())
    return GeneratorInit(_copy(teacher_state))


@INITS.register("random")
def random_init(teacher_state, build, params, seed) -> GeneratorInit:
    """The architecture's fresh initialization, seeded from the cell's seed."""
    fresh = fresh_state(build, derive_seed(seed, "generator-init"))
    _check_same_architecture(teacher_state, fresh)
    return GeneratorInit(fresh)


@INITS.register("reset_layers")
def reset_layers(teacher_state, build, params, seed) -> GeneratorInit:
    """Teacher weights with the named parameter groups re-initialized."""
    return GeneratorInit(_reset(teacher_state, build, set(params["groups"]), seed))


@INITS.register("feature_transplant")
def feature_transplant(teacher_state, build, params, seed) -> GeneratorInit:
    """Teacher weights, ``output`` re-initialized, conditioning pinned to c_noise(sigma_feat)."""
    sigma_feat = params.get("sigma_feat")
    if sigma_feat is None or not sigma_feat > 0:
        raise InitError(f"feature_transplant needs sigma_feat > 0, got {sigma_feat!r}")
    return GeneratorInit(_reset(teacher_state, build, {"output"}, seed), float(sigma_feat))


def init_generator(init_cfg: dict, teacher_state, build, seed: int) -> GeneratorInit:
    params = {k: v for k, v in init_cfg.items() if k != "name"}
    return INITS.get(init_cfg["name"])(teacher_state, build, params, seed)


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
