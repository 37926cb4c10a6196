"""The teacher: an EDM diffusion model trained once per teacher id and cached.

``<cache>/teachers/<teacher id>/`` holds ``ckpt.pt`` while training (complete, atomic,
resumable) and ``teacher.pt`` (the EMA weights and the config) when done. A teacher id hashes
the data fingerprint and the ``teacher`` section, so a second call with the same config reuses
it instantly, from any cell or node that sees the same cache folder.

Beside them, ``status.json`` (written atomically at the start, at every checkpoint and log line,
and at the end) says what the training is doing: ``state`` (training / stopped / failed / done),
``step`` of ``total``, the last loss, training seconds, when this attempt started and the file
was updated, host and pid. ``harness run`` prints the teachers' progress from it (they train as
Ray tasks, possibly on other nodes) and ``harness status`` shows it.
"""
from __future__ import annotations

import copy
import json
import os
import socket
import time

import torch

from harness import __version__
from harness.core import nets, perf
from harness.core.data import Dataset
from harness.core.diffusion import (
    Denoiser,
    denoising_loss,
    ema_beta,
    heun_sample,
    sample_sigma_band,
)
from harness.core.edm_ddpmpp import harness_teacher
from harness.core.edm_import import EDMImportError, load_edm_pickle
from harness.core.inits import derive_seed
from harness.core.io import ema_update, save_atomic, write_json_atomic
from harness.core.io import load_torch as load_checkpoint
from harness.declare.config import steps
from harness.declare.hashing import teacher_id
from harness.orchestrate.status import TEACHER_STATUS

LR_RAMP_FRACTION = 0.05  # linear warm-up over the first 5% of steps (EDM ramps over 10 Mimg)


def teacher_dir(cache: str, cfg: dict, dataset: Dataset) -> tuple[str, str]:
    tid = teacher_id(cfg, dataset.fingerprint)
    return tid, os.path.join(cache, "teachers", tid)


def _build(cfg: dict, dataset: Dataset) -> Denoiser:
    return Denoiser(nets.build(cfg["teacher"]["arch"], dataset.x.shape[1:],
                               cfg["teacher"].get("channels")), dataset.sigma_data)


def load_or_train(cfg: dict, dataset: Dataset, cache: str, device="cpu", log=print,
                  max_steps: int | None = None) -> tuple[Denoiser, dict]:
    """The teacher's EMA denoiser and its metadata, training (or resuming) it if needed."""
    if cfg["teacher"].get("import"):  # NVIDIA's published EDM teacher: loaded, never trained
        return load_imported(cfg["teacher"]["import"], dataset, device,
                             cfg["teacher"].get("channels"))
    tid, folder = teacher_dir(cache, cfg, dataset)
    final = os.path.join(folder, "teacher.pt")
    denoiser = _build(cfg, dataset)
    if os.path.exists(final):
        state = load_checkpoint(final)
        denoiser.net.load_state_dict(state["ema"])
        return denoiser.eval().requires_grad_(False), state["meta"]
    os.makedirs(folder, exist_ok=True)
    tc = cfg["teacher"]
    device = torch.device(device)
    batch = tc["batch"]
    total = steps(tc["kimg"], batch)
    save_every = max(1, total // 20)

    # Construct, then resume from the last checkpoint if one exists.
    torch.manual_seed(derive_seed(tc["seed"], "teacher-init"))
    denoiser = _build(cfg, dataset).to(device)
    run = perf.apply(tc, device, [denoiser])  # precision, layout, compile (harness.core.perf)
    ema = copy.deepcopy(denoiser).eval().requires_grad_(False)
    opt = torch.optim.Adam(denoiser.parameters(), lr=tc["lr"], betas=(0.9, 0.999), eps=1e-8)
    beta = ema_beta(batch, tc["ema_halflife_kimg"])
    ckpt = os.path.join(folder, "ckpt.pt")
    band = (tc.get("noise") or {}).get("band")  # a band-limited teacher: ln s ~ U(ln lo, ln hi)
    step, wall, resumed = 0, 0.0, None
    if os.path.exists(ckpt):
        state = load_checkpoint(ckpt)
        denoiser.net.load_state_dict(state["net"])
        ema.net.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        torch.set_rng_state(state["rng"])
        step, wall = state["step"], state["wall_s"]
        resumed = step
        log(f"teacher {tid}: resuming at step {step}/{total}")
    else:
        torch.manual_seed(derive_seed(tc["seed"], "teacher-train"))
        log(f"teacher {tid}: training {tc['arch']} on {dataset.name} for {tc['kimg']} kimg "
            f"({total} steps of {batch}); {nets.count_parameters(denoiser.net):,} parameters")
    data = torch.from_numpy(dataset.x).to(device)
    info = {"id": tid, "arch": tc["arch"], "data": dataset.name, "total": total,
            "resumed_at": resumed, "started_at": time.time(), "host": socket.gethostname(),
            "pid": os.getpid()}

    def status(state: str, loss=None, **extra):  # harness.orchestrate.status reads it
        write_json_atomic({**info, "state": state, "step": step, "wall_s": wall,
                           "loss": None if loss is None else float(loss),
                           "updated_at": time.time(), **extra},
                          os.path.join(folder, TEACHER_STATUS))

    def checkpoint():
        save_atomic({"net": denoiser.net.state_dict(), "ema": ema.net.state_dict(),
                     "opt": opt.state_dict(), "rng": torch.get_rng_state(), "step": step,
                     "wall_s": wall, "config": cfg["teacher"], "version": __version__}, ckpt)

    status("training")

    # Train: EDM denoising loss, Adam with warm-up, EMA; checkpoint every 5% of the run.
    t_log, loss = time.perf_counter(), None
    while step < total:
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = tc["lr"] * min(1.0, (step + 1) / max(1, LR_RAMP_FRACTION * total))
        x = data[torch.randint(data.shape[0], (batch,), device=device)]
        sigma = None if band is None else sample_sigma_band(batch, *band, device=device)
        with run.amp:
            loss = denoising_loss(run(denoiser), x, sigma).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if not torch.isfinite(loss):
            message = f"teacher {tid}: non-finite loss at step {step}; lower teacher.lr " \
                      f"(now {tc['lr']})"
            status("failed", message=message)
            raise FloatingPointError(message)
        ema_update(ema, denoiser, beta)
        step += 1
        wall += time.perf_counter() - t0
        if step % save_every == 0 or step == total:
            checkpoint()
            status("training", loss.item())
        if time.perf_counter() - t_log > 30 or step == total:
            t_log = time.perf_counter()
            log(f"teacher {tid}: step {step}/{total} loss {loss.item():.4f} "
                f"({wall:.0f} s, ETA {wall / step * (total - step):.0f} s)")
            status("training", loss.item())
        if max_steps is not None and step >= max_steps and step < total:
            checkpoint()
            status("stopped", loss.item())
            raise InterruptedError(f"teacher {tid}: stopped at step {step} (max_steps)")

    meta = {"id": tid, "arch": tc["arch"], "data": dataset.name,
            "data_fingerprint": dataset.fingerprint, "config": tc, "steps": step,
            "wall_s": wall, "parameters": nets.count_parameters(ema.net), "version": __version__}
    save_atomic({"ema": ema.net.state_dict(), "meta": meta}, final)
    os.remove(ckpt)
    status("done", None if loss is None else loss.item(), finished_at=time.time())
    # NCHW, as a teacher loaded from the cache is: the student's settings choose its layout
    ema = ema.cpu().to(memory_format=torch.contiguous_format)
    return ema.eval().requires_grad_(False), meta


def heun_quality(teacher: Denoiser, evaluate, shape: tuple, n: int, seed: int, device="cpu",
                 steps: int = 18) -> dict[str, float]:
    """The teacher's own sample quality: Heun, ``steps`` steps (35 evaluations for 18)."""
    gen = torch.Generator(device).manual_seed(derive_seed(seed, "teacher-samples") % 2**62)
    z = torch.randn(n, *shape, device=device, generator=gen)
    teacher = teacher.to(device)
    x = torch.cat([heun_sample(teacher, chunk, steps) for chunk in z.split(500)])
    return evaluate(x.float())


def cached_quality(folder: str, key: str, compute) -> dict:
    """Memoise a reference measurement (JSON) beside the teacher, keyed by its protocol."""
    path = os.path.join(folder, "quality.json")
    known = json.load(open(path)) if os.path.exists(path) else {}
    if key not in known:
        known[key] = compute()
        write_json_atomic(known, path)
    return known[key]


def load_imported(path: str, dataset: Dataset, device="cpu",
                  channels: int | None = None) -> tuple[Denoiser, dict]:
    """A teacher imported from one of NVIDIA's EDM pickles (``teacher: {import: PATH}``), read
    without running anything from it (``harness.core.edm_import``), as the harness's ``ddpmpp``.
    Its id is ``t-`` + the first 12 hex digits of the file's sha256."""

    state, edm = load_edm_pickle(path)
    net, info = harness_teacher(state, edm, tuple(dataset.x.shape[1:]), channels)
    sigma_data = info["sigma_data"]
    if sigma_data is None or abs(sigma_data - dataset.sigma_data) > 1e-9:
        raise EDMImportError(f"{path}: the teacher was trained with sigma_data {sigma_data}, the "
                             f"data have {dataset.sigma_data}")
    meta = {"id": "t-" + edm["sha256"][:12], "arch": "ddpmpp", "imported": str(path),
            "data": dataset.name, "data_fingerprint": dataset.fingerprint, "edm": info,
            "parameters": nets.count_parameters(net), "version": __version__}
    denoiser = Denoiser(net, sigma_data).to(device)
    return denoiser.eval().requires_grad_(False), meta
