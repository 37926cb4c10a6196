"""Shared fixtures: a tiny toy2d teacher trained once per test session."""
from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from harness.core import data
from harness.orchestrate import teacher as teachers
from harness.declare.config import resolve_cell

TOY_TEACHER = {"kimg": 12, "batch": 128, "lr": 2e-3, "ema_halflife_kimg": 1}


def toy_cfg(**sections) -> dict:
    """A resolved toy2d cell config with a tiny teacher and short student budget."""
    spec = {"data": {"name": "toy2d"}, "teacher": dict(TOY_TEACHER),
            "student": {"kimg": 1, "batch": 64, "ema_halflife_kimg": 0.2},
            "eval": {"n": 300, "every_kimg": 0.5, "samples": 16}}
    for key, value in sections.items():
        spec[key] = {**spec[key], **value} if isinstance(spec.get(key), dict) and isinstance(value, dict) else value
    return resolve_cell(spec)


@pytest.fixture(scope="session")
def toy_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("harness-cache"))


@pytest.fixture(scope="session")
def toy_teacher(toy_cache):
    """(denoiser, meta, dataset) for the toy2d ring, trained once (~10 s on 2 cores)."""
    torch.set_num_threads(2)
    dataset = data.load("toy2d")
    denoiser, meta = teachers.load_or_train(toy_cfg(), dataset, toy_cache, "cpu", log=lambda *_: None)
    return denoiser, meta, dataset


def ray_leftovers(tag: str) -> list[int]:
    """Pids of processes whose command line names ``tag`` (a killed driver's Ray temp dir)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    if tag.encode() in f.read():
                        out.append(int(d))
            except OSError:
                pass
    return out


def reap_ray(tag: str):
    """After a SIGKILLed driver: Ray's reaper takes its processes down; kill any it missed."""
    for _ in range(100):
        if not ray_leftovers(tag):
            return
        time.sleep(0.1)
    for pid in ray_leftovers(tag):
        os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def study_cache(tmp_path_factory):
    """A teacher cache holding the toy teacher the tiny sweep studies use (teacher kimg 4),
    trained once per test session (test_sweep, test_cli, test_tuning)."""
    folder = tmp_path_factory.getbasetemp() / "harness-cache"
    cfg = resolve_cell({"data": {"name": "toy2d"}, "teacher": {"kimg": 4}})
    teachers.load_or_train(cfg, data.from_config(cfg["data"]), str(folder), "cpu",
                           log=lambda *a: None)
    return str(folder)
