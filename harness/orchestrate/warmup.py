"""Short warm-ups of real training steps, timed: what ``harness plan`` measures throughput with
and what ``harness accept-gpu`` runs its cifar10-shaped cell with.

A cell's step is ``train.train_student`` itself (auxiliary update, generator update, EMA, with
the cell's loss, network, batch, precision, layout and compilation) on random weights and random
data of the dataset's shape: speed does not depend on either. A teacher's step is
``teacher.load_or_train`` itself, in a temporary cache. Times are training seconds as the cells
count them (``wall_s``: checkpoints and evaluations excluded).
"""
from __future__ import annotations

import math
import tempfile

import numpy as np
import torch

from harness.core.data import Dataset
from harness.core.diffusion import Denoiser
from harness.core.nets import build as build_net
from harness.core.train import train_student
from harness.declare.config import resolve_cell
from harness.orchestrate.teacher import load_or_train


class _Enough(Exception):
    """Raised from the report callback once the timing has what it needs."""


def _threads(device: str, threads: int | None):
    old = torch.get_num_threads()
    if torch.device(device).type == "cpu" and threads:
        torch.set_num_threads(max(1, int(threads)))
    return old


def time_cell(cfg: dict, shape: tuple, sigma_data: float, device: str, *,
              threads: int | None = None, warm: int = 2, budget_s: float = 3.0,
              min_steps: int = 3, max_steps: int = 50, batch: int | None = None) -> dict:
    """Train ``cfg``'s step on random weights: ``warm`` steps untimed (compilation, cuDNN
    autotuning), then steps until ``budget_s`` of training seconds and at least ``min_steps``,
    at most ``max_steps``. ``batch`` replaces the cell's batch (one data-parallel worker's share).
    Returns {img_per_s, steps, warm_s, status, peak_mem_gib (CUDA)}."""
    batch = batch or cfg["student"]["batch"]
    total = warm + max_steps
    run_cfg = resolve_cell({
        "data": cfg["data"], "teacher": {"arch": cfg["teacher"]["arch"]}, "loss": cfg["loss"],
        "init": "teacher", "seed": cfg["seed"],
        "student": {**cfg["student"], "batch": batch, "kimg": total * batch / 1000},
        "eval": {"n": 2, "every_kimg": batch / 1000, "samples": 0, "verifier": None}})
    cuda = torch.device(device).type == "cuda"
    old = _threads(device, threads)
    torch.manual_seed(0)
    teacher = Denoiser(build_net(run_cfg["teacher"]["arch"], tuple(shape)), sigma_data)
    data = torch.randn(max(4 * batch, 64), *shape, device=device).clamp(-1, 1)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    walls: dict[int, float] = {}
    last = {"status": "running"}

    def report(ev):
        walls[ev.step] = ev.wall_s
        last["status"] = ev.status
        done = ev.step - warm
        if ev.step > warm and done >= min_steps and (ev.wall_s - walls[warm] >= budget_s):
            raise _Enough

    try:
        train_student(run_cfg, teacher, data, sigma_data, lambda x: {}, None, report, device=device)
    except _Enough:
        pass
    finally:
        torch.set_num_threads(old)
    end = max(walls)
    steps = end - warm
    out = {"img_per_s": steps * batch / (walls[end] - walls[warm]), "steps": steps,
           "warm_s": walls[warm], "status": last["status"]}
    if cuda:
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def time_teacher(cfg: dict, shape: tuple, sigma_data: float, device: str, *,
                 threads: int | None = None, budget_s: float = 3.0, max_steps: int = 50) -> dict:
    """Train the teacher of ``cfg`` (its arch, batch and execution settings) on random data in a
    temporary cache: 2 steps untimed, then as many as fit ``budget_s`` (3 to ``max_steps``).
    Returns {img_per_s, steps}."""
    tc = {**cfg["teacher"], "import": None}
    batch = tc["batch"]
    x = np.random.default_rng(0).standard_normal((max(4 * batch, 64), *shape)).clip(-1, 1)
    dataset = Dataset(cfg["data"]["name"], x.astype(np.float32), None, sigma_data)
    old = _threads(device, threads)
    try:
        with tempfile.TemporaryDirectory() as cache:
            def run(steps):
                c = resolve_cell({"data": cfg["data"],
                                  "teacher": {**tc, "kimg": steps * batch / 1000}})
                return load_or_train(c, dataset, cache, device, log=lambda *a: None)[1]

            first = run(2)  # compilation, cuDNN autotuning; sets the measured run's length
            steps = min(max_steps, max(3, math.ceil(budget_s / max(first["wall_s"] / 2, 1e-6))))
            meta = run(steps)
    finally:
        torch.set_num_threads(old)
    return {"img_per_s": meta["steps"] * batch / meta["wall_s"], "steps": meta["steps"]}

