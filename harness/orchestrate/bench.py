"""``harness bench``: what the harness costs beyond the training itself, as ratios in one run.

Rows (each measured here, on this machine, in this process):

1. ``step``: the student step inside the harness (``train.train_student``: loop, EMA, progress,
   checkpoint at each evaluation as configured) vs a bare PyTorch loop doing the same aux and
   generator forward/backward on the same nets and loss. Target ratio <= 1.05.
2. ``sweep``: seconds of overhead per cell when a grid of short cells runs through Ray Tune
   (``harness run``) vs the same cells called one after another in one process. Target <= 2 s.
3. ``eval``: one evaluation (FD through torch-fidelity, or toy MMD) vs the training time between
   two evaluations at the configured ``every_kimg``.
4. ``perf``: images/s (and peak memory on CUDA) of the harness's own SiD iteration under each
   ``harness.core.perf`` variant: on CUDA the cluster config (unet-edm, 3x32x32, batch 64) in fp32,
   TF32, bf16 autocast, channels_last and torch.compile; on a CPU the digits config.
5. ``packing``: several short cells through Ray with a fraction of the device each vs one at a
   time with the whole device (a fraction of one GPU on CUDA).
6. ``init``: the gradient reaching each parameter group at step 0 under every init scheme of
   ``studies/c3-digits.yaml`` (its 600-kimg digits teacher), relative to teacher init
   (``inits.probe_gradients``): a scheme should keep the gradient reaching the groups it keeps
   within a factor of 10 of teacher init's, or its cells measure the optimiser, not the features.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import time

import torch

from harness.core import data as datasets
from harness.core import losses, metrics, perf
from harness.core.diffusion import Denoiser, OneStepGenerator
from harness.core.inits import InitContext, init_generator, probe_gradients
from harness.core.nets import GROUPS
from harness.core.nets import build as build_net
from harness.core.train import build_student, frozen, train_student
from harness.declare.config import ConfigError, init_label, resolve_cell, resolve_init
from harness.declare.hashing import teacher_id
from harness.declare.study import load_study
from harness.orchestrate.cell import run_cell
from harness.orchestrate.sweep import run_study
from harness.orchestrate.teacher import load_or_train
from harness.store.cache import cache_for
from harness.store.results import load_rows

ROWS: list[tuple[str, str, str, str]] = []  # (row, measured, reference, verdict)
OUT: list[str] = []  # a markdown file each row is appended to as soon as it is measured


def _row(name, measured, reference="", verdict=""):
    ROWS.append((name, measured, reference, verdict))
    print(f"  {name}: {measured} {reference} {verdict}".rstrip(), flush=True)
    for path in OUT:
        with open(path, "a") as f:
            f.write("| " + " | ".join((name, measured, reference, verdict)) + " |\n")


def _digits_setup(cache: str, device: str, cfg_over: dict | None = None):
    """Digits with a 20-kimg teacher: the teacher's quality does not change what a step costs."""
    cfg = resolve_cell({"data": {"name": "digits"}, "teacher": {"kimg": 20}, **(cfg_over or {})})
    dataset = datasets.from_config(cfg["data"])
    teacher, _ = load_or_train(cfg, dataset, cache, device)
    return cfg, dataset, teacher


def bare_loop(cfg, teacher: Denoiser, x: torch.Tensor, sigma_data: float, steps: int, device):
    """The same math as train_student's inner loop (same perf settings), with nothing around it."""
    shape = tuple(x.shape[1:])
    state = {k: v.cpu() for k, v in teacher.net.state_dict().items()}
    gen, aux = build_student(cfg, state, shape, sigma_data)
    gen.to(device), aux.to(device), teacher.to(device)
    st = cfg["student"]
    run = perf.apply(st, device, [gen, aux, teacher])
    opt_g = torch.optim.Adam(gen.parameters(), lr=st["lr"], betas=(0.0, 0.999))
    opt_a = torch.optim.Adam(aux.parameters(), lr=st["aux_lr"], betas=(0.0, 0.999))
    family = losses.build(cfg["loss"], run(teacher), run(aux), st["t_max"])
    b = st["batch"]
    for _ in range(steps):
        with torch.no_grad(), run.amp:
            fake = run(gen)(torch.randn(b, *shape, device=device))
        with run.amp:
            la = family.aux_loss(fake, x[torch.randint(len(x), (b,), device=device)]).mean()
        opt_a.zero_grad(set_to_none=True)
        la.backward()
        opt_a.step()
        with frozen(aux), run.amp:
            lg = family.generator_loss(run(gen)(torch.randn(b, *shape, device=device))).mean()
        opt_g.zero_grad(set_to_none=True)
        lg.backward()
        opt_g.step()
    if device == "cuda":
        torch.cuda.synchronize()


def bench_step(cache: str, device: str, steps: int, loss: str = "sid", repeats: int = 3):
    """Row 1: harness loop vs bare loop, interleaved repeats, best of each (noisy machines)."""
    batch, every = 64, 20.0
    kimg = steps * batch / 1000
    cfg, dataset, teacher = _digits_setup(cache, device, {
        "loss": loss, "student": {"kimg": kimg, "batch": batch},
        "eval": {"every_kimg": every, "n": 100, "samples": 16}})
    x = torch.from_numpy(dataset.x).to(device)
    harness_t, bare_t = [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            last = train_student(cfg, teacher, x, dataset.sigma_data, lambda s: {},
                                 os.path.join(tmp, "c.pt"), lambda ev: None, device=device)
            harness_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        bare_loop(cfg, teacher, x, dataset.sigma_data, last.step, device)
        bare_t.append(time.perf_counter() - t0)
    h, b = min(harness_t), min(bare_t)
    _row(f"step ({loss}, digits, batch {batch}, {last.step} steps, eval+checkpoint every "
         f"{every:g} kimg)", f"harness {h / last.step * 1e3:.1f} ms/step, bare "
         f"{b / last.step * 1e3:.1f} ms/step, ratio {h / b:.3f}", "(target <= 1.05)",
         "ok" if h / b <= 1.05 else "MISSED")
    return cfg, dataset, teacher


def bench_eval(cfg, dataset, teacher, cache: str, device: str):
    """Row 3: one evaluation vs the training time between two evaluations."""
    defaults = resolve_cell({})["eval"]  # the step row used a tiny eval; measure the default one
    evaluator = metrics.Evaluator(dataset, n=defaults["n"], cache_dir=cache,
                                  metric=defaults["metric"], device=device)
    z = torch.randn(evaluator.n, *dataset.x.shape[1:])
    evaluator(z.clamp(-1, 1))  # warm: reference statistics are computed and cached once
    t0 = time.perf_counter()
    evaluator(z.clamp(-1, 1))
    t_eval = time.perf_counter() - t0
    x = torch.from_numpy(dataset.x).to(device)
    steps = 30
    t0 = time.perf_counter()
    bare_loop(cfg, teacher, x, dataset.sigma_data, steps, device)
    per_step = (time.perf_counter() - t0) / steps
    every = defaults["every_kimg"]
    between = per_step * every * 1000 / cfg["student"]["batch"]
    _row(f"eval ({evaluator.metric_name})", f"{t_eval:.2f} s per evaluation vs {between:.0f} s "
         f"of training between evaluations (every {every:g} kimg): {t_eval / between:.1%}")


def _timed_study(tmp: str, name: str, body: str, device: str):
    """Write study ``name`` (YAML ``body``, results under ``tmp/name``), train its teacher outside
    the timing, then time one quiet ``harness run``: (wall s, study). Raises if a cell is left."""

    path = os.path.join(tmp, f"{name}.yaml")
    with open(path, "w") as f:
        f.write(f"study: {name}\nresults: {tmp}/{name}\n{body}")
    study = load_study(path)
    first = study.cells[0].config
    load_or_train(first, datasets.from_config(first["data"]), os.environ["HARNESS_CACHE"], device,
                  log=lambda *_: None)
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
        t0 = time.perf_counter()
        code = run_study(path, device=device)
        wall = time.perf_counter() - t0
    if code != 0:
        raise RuntimeError(f"bench: study {name} did not finish every cell (exit {code}); "
                           f"see {tmp}/{name}")
    return wall, study


def _sweep_once(tmp: str, n_cells: int, name: str) -> tuple[float, float, object]:
    """One ``harness run`` of ``n_cells`` tiny toy2d cells: (wall s, cells' compute s, study)."""

    wall, study = _timed_study(tmp, name, "data: {name: toy2d}\nteacher: {kimg: 4}\n"
                               "student: {kimg: 1, batch: 64}\n"
                               "eval: {n: 200, every_kimg: 0.5, samples: 8}\nloss: ratio_kl\n"
                               f"grid: {{seed: [{', '.join(map(str, range(n_cells)))}]}}\n"
                               "resources: {cpu: 1}\n", "cpu")
    rows = load_rows(f"{tmp}/{name}")
    return wall, rows[rows.status != "reference"].groupby("cell").wall_s.max().sum(), study


def bench_sweep(sizes=(4, 12)):
    """Row 2: Ray Tune sweep overhead per cell (toy2d, tiny cells), split into the fixed cost of
    one ``harness run`` (Ray start, teacher load, Tune start/stop) and the marginal cost per
    cell (from two grid sizes); and the same cells one after another in one process."""

    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("HARNESS_CACHE", os.path.join(tmp, "cache"))
        over = {}
        for n in sizes:
            wall, compute, study = _sweep_once(tmp, n, f"bench{n}")
            over[n] = wall - compute
        t0 = time.perf_counter()
        for i, cell in enumerate(study.cells):
            run_cell(cell.config, os.path.join(tmp, "seq"), os.environ["HARNESS_CACHE"],
                     os.path.join(tmp, f"seq-{i}.pt"), device="cpu", log=lambda *_: None)
        t_seq = time.perf_counter() - t0
        seq_compute = load_rows(os.path.join(tmp, "seq")).groupby("cell").wall_s.max().sum()
    small, big = sizes
    marginal = (over[big] - over[small]) / (big - small)
    per_cell = over[big] / big
    _row(f"sweep ({small} and {big} toy2d cells, 1 cpu each, 2 at a time)",
         f"Ray {per_cell:.2f} s/cell at {big} cells ({over[small] / small:.2f} at {small}): fixed "
         f"{over[small] - marginal * small:.1f} s per run + {marginal:.2f} s per cell; one process "
         f"without Ray {(t_seq - seq_compute) / big:.2f} s/cell", "(target <= 2 s)",
         "ok" if per_cell <= 2 else "MISSED")


NCHW, NHWC = {"channels_last": False}, {"channels_last": True}
PERF_CONFIGS = {
    # device type -> (what, arch, image shape, batch, variants as student settings)
    "cuda": ("cluster config: unet-edm, 3x32x32", "unet-edm", (3, 32, 32), 64, [
        ("fp32", NCHW), ("tf32", {"precision": "tf32", **NCHW}),
        ("bf16", {"precision": "bf16", **NCHW}),
        ("bf16 + channels_last", {"precision": "bf16", **NHWC}),
        ("bf16 + compile", {"precision": "bf16", "compile": True, **NCHW}),
        ("bf16 + channels_last + compile", {"precision": "bf16", "compile": True, **NHWC})]),
    # tf32 and bf16 are CUDA-only settings (the same float32 arithmetic on a CPU)
    "cpu": ("digits config: unet-xs, 1x8x8", "unet-xs", (1, 8, 8), 64, [
        ("fp32", NCHW), ("channels_last", NHWC), ("channels_last + compile",
                                                   {"compile": True, **NHWC})]),
}


def bench_perf(device: str, steps: int = 20, warm: int = 5, config: tuple | None = None):
    """Row 4: the harness's own SiD iteration (``train.train_student``: aux update, generator
    update, EMA) under each precision/layout/compile variant, on random weights and data (speed
    does not depend on them), without checkpoints (they are outside a step's time anyway). Images/s over ``steps`` after ``warm`` steps (compilation and
    cuDNN autotuning happen there); peak memory on CUDA."""
    what, arch, shape, batch, variants = config or PERF_CONFIGS[torch.device(device).type]
    cuda = torch.device(device).type == "cuda"
    out = []
    for name, student in variants:
        cfg = resolve_cell({"data": {"name": "digits"}, "teacher": {"arch": arch}, "loss": "sid",
                            "student": {"kimg": (warm + steps) * batch / 1000, "batch": batch,
                                        **student},
                            "eval": {"n": batch, "every_kimg": warm * batch / 1000, "samples": 0}})
        torch.manual_seed(0)
        teacher = Denoiser(build_net(arch, shape), 0.5)
        data = torch.randn(16 * batch, *shape, device=device).clamp(-1, 1)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        walls = {}
        train_student(cfg, teacher, data, 0.5, lambda x: {}, None,
                      lambda ev: walls.__setitem__(ev.step, ev.wall_s), device=device)
        ips = steps * batch / (walls[warm + steps] - walls[warm])
        peak = f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if cuda else ""
        out.append((name, ips))
        rate = f"{ips:.0f}" if ips >= 100 else f"{ips:.3g}"
        _row(f"SiD iteration, {what}, batch {batch} [{name}]", f"{rate} img/s "
             f"({walls[warm]:.1f} s for the first {warm} steps){peak}",
             "(target >= 355 img/s on an H200)" if cuda else "")
    return out


def bench_packing(device: str, n: int = 4, kimg: float = 8):
    """Row 5: ``n`` short digits cells through Ray with 1/n of the device each (packed) vs one
    at a time with the whole device (serial). On CUDA the fraction is of one GPU; on a CPU it is
    of the cores. Wall time of ``harness run`` each, teacher trained before."""
    cuda = torch.device(device).type == "cuda"
    cpus = os.cpu_count() or 1
    share = max(1, cpus // n)
    modes = {"packed": {"gpu": 1 / n, "cpu": share} if cuda else {"cpu": share},
             "serial": {"gpu": 1, "cpu": share} if cuda else {"cpu": cpus}}
    walls = {}
    with tempfile.TemporaryDirectory() as tmp:
        # Ray workers read the cache folder from the environment
        os.environ.setdefault("HARNESS_CACHE", os.path.join(tmp, "cache"))
        for mode, res in modes.items():
            walls[mode], _ = _timed_study(
                tmp, f"pack-{mode}", "data: {name: digits}\nteacher: {kimg: 20}\n"
                f"student: {{kimg: {kimg}, batch: 64}}\neval: {{n: 500, every_kimg: {kimg / 2}}}\n"
                f"loss: sid\ngrid: {{seed: [{', '.join(map(str, range(n)))}]}}\n"
                f"resources: {{{', '.join(f'{k}: {v:g}' for k, v in res.items())}}}\n", device)
    each = ", ".join(f"{k} {v:g}" for k, v in modes["packed"].items())
    _row(f"packing, {n} digits sid cells of {kimg:g} kimg through Ray", f"{each} each: "
         f"{walls['packed']:.0f} s; one at a time with the whole device: {walls['serial']:.0f} s; "
         f"speedup {walls['serial'] / walls['packed']:.2f}x")
    return walls


C3_INITS = ("teacher", "random", {"name": "reset_layers", "groups": ["output"]},
            {"name": "reset_layers", "groups": ["output"], "reinit": "fresh"},
            {"name": "reset_layers", "groups": ["encoder", "middle", "decoder"]},
            {"name": "feature_transplant", "sigma_feat": 0.02},
            {"name": "feature_transplant", "sigma_feat": 20.0},
            {"name": "feature_transplant", "sigma_feat": 0.2, "reset_output": True},
            "mapping_match")


def bench_init(cache: str, device: str):
    """Gradient norm per group at step 0 (linear probe), each scheme / teacher init."""

    cfg = resolve_cell({"data": {"name": "digits"}, "teacher": {"kimg": 600}})
    dataset = datasets.from_config(cfg["data"])
    teacher, _ = load_or_train(cfg, dataset, cache, "cpu")
    state = {k: v.detach().cpu() for k, v in teacher.net.state_dict().items()}
    shape = tuple(dataset.x.shape[1:])
    ctx = InitContext(state, lambda: build_net("unet-xs", shape), 0, 2.5, dataset.sigma_data,
                      shape, cache=cache, teacher_id=teacher_id(cfg, dataset.fingerprint))
    ref = None
    for spec in C3_INITS:
        init = resolve_init(spec)
        out = init_generator(init, ctx)
        net = build_net("unet-xs", shape)
        net.load_state_dict(out.state)
        g = probe_gradients(OneStepGenerator(Denoiser(net, dataset.sigma_data), 2.5,
                                             out.sigma_feat).train(), shape, seed=0, n=64)
        ref = g if ref is None else ref
        _row(f"init {init_label(init)}", " ".join(
            f"{k} {g[k]:.2g} ({g[k] / ref[k]:.2g}x)" for k in GROUPS if k in g),
            "gradient norm at step 0 (x teacher init)")


ALL_ROWS = ("step", "eval", "sweep", "perf", "packing", "init")


def main(args) -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"

    rows = list(ALL_ROWS) if args.rows is None else [r.strip() for r in args.rows.split(",")]
    unknown = sorted(set(rows) - set(ALL_ROWS))
    if unknown:
        raise ConfigError("--rows", f"unknown row {unknown[0]!r}; known: {', '.join(ALL_ROWS)} "
                                    f"(leave --rows out for all of them)")
    if args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        raise ConfigError("--out", f"{args.out}: its folder does not exist (or is a file), so the "
                                   f"table could not be written; give a path in an existing "
                                   f"folder. Nothing was run.")
    cache = os.environ.setdefault("HARNESS_CACHE", cache_for(None))  # sub-runs share it
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    head = (f"harness bench on {name} ({os.cpu_count()} cpus, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads); teachers cached in {cache}")
    print(head)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"{head}\n\n| row | measured | target | verdict |\n|---|---|---|---|\n")
        OUT.append(args.out)
    quick = args.quick
    step_setup = None
    for row in rows:  # in the order asked: put the most wanted first on a rented machine
        if row in ("step", "eval") and step_setup is None:
            step_setup = bench_step(cache, device, 60 if quick else 200, repeats=2 if quick else 3)
        if row == "eval":
            bench_eval(*step_setup, cache, device)
        elif row == "sweep":
            bench_sweep((2, 6) if quick else (4, 12))
        elif row == "perf":
            bench_perf(device, steps=8 if quick else 20)
        elif row == "packing":
            bench_packing(device, kimg=2 if quick else 8)
        elif row == "init":
            bench_init(cache, device)
    print(f"\n{name}\n\n| row | measured | target | verdict |\n|---|---|---|---|")
    for row in ROWS:
        print("| " + " | ".join(row) + " |")
    return 0
