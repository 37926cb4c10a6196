"""``harness bench``: what the harness costs beyond the training itself, as ratios in one run.

Rows (each measured here, on this machine, in this process):

1. ``step``: the student step inside the harness (``train.train_student``: loop, EMA, progress,
   checkpoint at each evaluation as configured) vs a bare PyTorch loop doing the same aux and
   generator forward/backward on the same nets and loss. Target ratio <= 1.05.
2. ``sweep``: seconds of overhead per cell when a grid of short cells runs through Ray Tune
   (``harness run``) vs the same cells called one after another in one process. Target <= 2 s.
3. ``eval``: one evaluation (FD through torch-fidelity, or toy MMD) vs the training time between
   two evaluations at the configured ``every_kimg``.
4. ``gpu`` (``--gpu``, CUDA only): step time and peak memory of the cluster-scale SiD iteration
   under fp32, TF32, bf16 autocast, channels_last and torch.compile; several fractional-GPU
   cells packed on one GPU vs the same cells one after another.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import time

import torch

from . import data as datasets, losses, metrics
from .config import resolve_cell
from .diffusion import Denoiser
from .teacher import load_or_train
from .train import build_student, frozen, train_student

ROWS: list[tuple[str, str, str, str]] = []  # (row, measured, reference, verdict)


def _row(name, measured, reference="", verdict=""):
    ROWS.append((name, measured, reference, verdict))
    print(f"  {name}: {measured} {reference} {verdict}".rstrip(), flush=True)


def _digits_setup(cache: str, device: str, cfg_over: dict | None = None):
    cfg = resolve_cell({"data": {"name": "digits"}, **(cfg_over or {})})
    dataset = datasets.from_config(cfg["data"])
    teacher, _ = load_or_train(cfg, dataset, cache, device)
    return cfg, dataset, teacher


def bare_loop(cfg, teacher: Denoiser, x: torch.Tensor, sigma_data: float, steps: int, device):
    """The same math as train_student's inner loop, with nothing around it."""
    shape = tuple(x.shape[1:])
    state = {k: v.cpu() for k, v in teacher.net.state_dict().items()}
    gen, aux = build_student(cfg, state, shape, sigma_data)
    gen.to(device), aux.to(device), teacher.to(device)
    st = cfg["student"]
    opt_g = torch.optim.Adam(gen.parameters(), lr=st["lr"], betas=(0.0, 0.999))
    opt_a = torch.optim.Adam(aux.parameters(), lr=st["aux_lr"], betas=(0.0, 0.999))
    family = losses.build(cfg["loss"], teacher, aux, st["t_max"])
    b = st["batch"]
    for _ in range(steps):
        with torch.no_grad():
            fake = gen(torch.randn(b, *shape, device=device))
        la = family.aux_loss(fake, x[torch.randint(len(x), (b,), device=device)]).mean()
        opt_a.zero_grad(set_to_none=True)
        la.backward()
        opt_a.step()
        with frozen(aux):
            lg = family.generator_loss(gen(torch.randn(b, *shape, device=device))).mean()
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


def _sweep_once(tmp: str, n_cells: int, name: str) -> tuple[float, float, object]:
    """One ``harness run`` of ``n_cells`` tiny toy2d cells: (wall s, cells' compute s, study)."""
    from .results import load_rows
    from .study import load_study
    from .sweep import run_study

    path = os.path.join(tmp, f"{name}.yaml")
    with open(path, "w") as f:
        f.write(f"study: {name}\nresults: {tmp}/{name}\ndata: {{name: toy2d}}\n"
                "teacher: {kimg: 4}\nstudent: {kimg: 1, batch: 64}\n"
                "eval: {n: 200, every_kimg: 0.5, samples: 8}\nloss: ratio_kl\n"
                f"grid: {{seed: [{', '.join(map(str, range(n_cells)))}]}}\nresources: {{cpu: 1}}\n")
    study = load_study(path)
    first = study.cells[0].config  # the teacher is trained before, outside every timing
    load_or_train(first, datasets.from_config(first["data"]), os.environ["HARNESS_CACHE"], "cpu",
                  log=lambda *_: None)
    with contextlib.redirect_stdout(open(os.devnull, "w")):
        t0 = time.perf_counter()
        run_study(path, device="cpu")
        wall = time.perf_counter() - t0
    rows = load_rows(f"{tmp}/{name}")
    return wall, rows[rows.status != "reference"].groupby("cell").wall_s.max().sum(), study


def bench_sweep(sizes=(4, 12)):
    """Row 2: Ray Tune sweep overhead per cell (toy2d, tiny cells), split into the fixed cost of
    one ``harness run`` (Ray start, teacher load, Tune start/stop) and the marginal cost per
    cell (from two grid sizes); and the same cells one after another in one process."""
    from .cell import run_cell
    from .results import load_rows

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


def bench_gpu():
    """Row 4: the cluster-scale SiD iteration under precisions/layouts, and GPU packing."""
    if not torch.cuda.is_available():
        _row("gpu", "not measured: no CUDA device on this machine")
        return
    from . import nets
    from .diffusion import OneStepGenerator

    shape, batch = (3, 32, 32), 64
    results = []
    for name, prec, layout, compile_ in [("fp32", "fp32", False, False), ("tf32", "tf32", False, False),
                                         ("bf16", "bf16", False, False), ("bf16+cl", "bf16", True, False),
                                         ("bf16+cl+compile", "bf16", True, True)]:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = prec != "fp32"
        mk = lambda: Denoiser(nets.build("unet-edm", shape), 0.5).cuda()  # noqa: E731
        teacher, fake = mk().requires_grad_(False), mk()
        gen = OneStepGenerator(mk(), 2.5)
        if layout:
            for m in (teacher, fake, gen):
                m.to(memory_format=torch.channels_last)
        fam = losses.build({"name": "sid", "alpha": 1.2}, torch.compile(teacher) if compile_ else teacher,
                           torch.compile(fake) if compile_ else fake, 0.8)
        g = torch.compile(gen) if compile_ else gen
        opt_g, opt_a = torch.optim.Adam(gen.parameters()), torch.optim.Adam(fake.parameters())
        amp = torch.autocast("cuda", torch.bfloat16) if prec == "bf16" else contextlib.nullcontext()
        torch.cuda.reset_peak_memory_stats()

        def it():
            with amp:
                with torch.no_grad():
                    x = g(torch.randn(batch, *shape, device="cuda"))
                la = fam.aux_loss(x.float(), x.float()).mean()
            opt_a.zero_grad()
            la.backward()
            opt_a.step()
            with frozen(fake), amp:
                lg = fam.generator_loss(g(torch.randn(batch, *shape, device="cuda")).float()).mean()
            opt_g.zero_grad()
            lg.backward()
            opt_g.step()

        for _ in range(5):
            it()
        torch.cuda.synchronize()
        t0, n = time.perf_counter(), 20
        for _ in range(n):
            it()
        torch.cuda.synchronize()
        ips = n * batch / (time.perf_counter() - t0)
        results.append((name, ips))
        _row(f"gpu SiD iteration unet-edm batch {batch} [{name}]", f"{ips:.0f} img/s, peak "
             f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", "(target >= 355 img/s on H200)")


def main(args) -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cache = os.environ.get("HARNESS_CACHE", os.path.expanduser("~/.cache/harness"))
    print(f"harness bench on {device} ({os.cpu_count()} cpus, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads); teachers cached in {cache}")
    steps = 60 if args.quick else 200
    cfg, dataset, teacher = bench_step(cache, device, steps, repeats=2 if args.quick else 3)
    bench_eval(cfg, dataset, teacher, cache, device)
    bench_sweep((2, 6) if args.quick else (4, 12))
    if args.gpu:
        bench_gpu()
    else:
        _row("gpu", "not measured (run with --gpu on a CUDA machine)")
    print("\n| row | measured | target | verdict |\n|---|---|---|---|")
    for row in ROWS:
        print("| " + " | ".join(row) + " |")
    return 0
