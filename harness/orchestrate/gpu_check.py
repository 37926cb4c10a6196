"""``harness accept-gpu``: the once-per-machine acceptance of the CUDA path (about 10 minutes on
one GPU), run from a checkout with ``pip install -e ".[test]"``:

1. the ``gpu`` test tier (``python -m pytest -m gpu``: every precision trains, bf16 stays near
   fp32, peak memory and images/s reach the rows, a CUDA checkpoint resumes on the CPU);
2. the bench's GPU rows (``harness bench --rows perf,packing --quick``: the SiD iteration of the
   cluster config in fp32, TF32, bf16, bf16 + channels_last, bf16 + compile; fractional-GPU
   packing);
3. 200 steps of a cifar10-shaped cell: ``studies/cifar10.yaml``'s first ``sid`` cell (DDPM++
   at 3x32x32, batch 256, bf16), on random weights and data (``harness.orchestrate.warmup``), timed over its
   last 190 steps, with its peak memory.

Then one table (``--out FILE`` also writes it as markdown). Exit 0 when every check passed, 1
when one failed, 2 (before anything runs) on a machine without CUDA or with an --out in no folder.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness.declare.study import load_study
from harness.store import environment

CHECKOUT = Path(__file__).resolve().parents[2]
TIMEOUTS = {"tests": 240, "bench": 330}  # seconds; the cell runs a fixed 200 steps
CELL_STEPS, CELL_WARM = 200, 10


class AcceptError(RuntimeError):
    """The acceptance cannot run (no CUDA device, an --out that cannot be written): exit 2."""


def add_parser(sub) -> None:
    sp = sub.add_parser("accept-gpu", help="the GPU acceptance (one CUDA GPU, about 10 minutes): "
                        "gpu test tier, bench GPU rows, 200 bf16 steps of a cifar10-shaped cell")
    sp.add_argument("--out", default=None, help="also write the final table to this markdown file")
    sp.set_defaults(func=cmd_accept_gpu)


def _run(cmd: list[str], timeout: int) -> tuple[int | None, str, float]:
    """(exit code or None on timeout, stdout + stderr, seconds)."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=CHECKOUT, capture_output=True, text=True, timeout=timeout)
        return p.returncode, p.stdout + p.stderr, time.perf_counter() - t0
    except subprocess.TimeoutExpired as e:
        text = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) \
            else (e.stdout or "")
        return None, text, time.perf_counter() - t0


def pytest_summary(text: str) -> str:
    """pytest's final counts (``4 passed in 50.12s``), or the last line if there are none."""
    lines = [line.strip("= ") for line in text.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if re.search(r"\b\d+ (passed|failed|skipped|error|errors|deselected)\b", line):
            return line
    return lines[-1] if lines else "no output"


def bench_rows(markdown: str) -> list[tuple[str, str, str]]:
    """(row, measured, verdict) of each row of a ``harness bench --out`` table."""
    out = []
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 4 and cells[0] != "row":
            out.append((cells[0], cells[1], cells[3]))
    return out


def check_tests() -> list[tuple[str, str, float, bool]]:
    if not (CHECKOUT / "tests").is_dir():
        return [("gpu test tier", f"not run: no tests/ folder in {CHECKOUT} (run from a "
                 f"checkout)", 0.0, False)]
    code, text, s = _run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p",
                          "no:cacheprovider", "tests"], TIMEOUTS["tests"])
    summary = pytest_summary(text) if code is not None else f"timed out after {s:.0f} s"
    ok = code == 0 and "passed" in summary and "skipped" not in summary
    return [("gpu test tier (pytest -m gpu)", summary, s, ok)]


def check_bench(tmp: str) -> list[tuple[str, str, float, bool]]:
    out = os.path.join(tmp, "bench.md")
    code, text, s = _run([sys.executable, "-m", "harness.cli", "bench", "--rows", "perf,packing",
                          "--quick", "--out", out], TIMEOUTS["bench"])
    rows = bench_rows(Path(out).read_text()) if os.path.exists(out) else []
    result = [(f"bench: {row}", measured, 0.0, verdict != "MISSED")
              for row, measured, verdict in rows]
    if code != 0:
        last = (text.strip().splitlines() or [""])[-1][:200]
        why = "timed out" if code is None else f"exit {code}: {last}"
        result.append(("bench (harness bench --rows perf,packing --quick)",
                       f"{why} after {s:.0f} s", s, False))
    else:
        result.append(("bench (harness bench --rows perf,packing --quick)",
                       f"{len(rows)} rows", s, bool(rows)))
    return result


def cifar10_cell() -> tuple[dict, str]:
    """The first ``sid`` cell of ``studies/cifar10.yaml`` (its data files are not needed)."""

    study = load_study(str(CHECKOUT / "studies" / "cifar10.yaml"))
    cell = next(c for c in study.cells if c.config["loss"]["name"] == "sid")
    st = cell.config["student"]
    what = (f"cifar10-shaped cell: {cell.config['teacher']['arch']} 3x32x32, sid, batch "
            f"{st['batch']}, {st['precision']}"
            + (" + channels_last" if st["channels_last"] else ""))
    return cell.config, what


def check_cell(cfg: dict, what: str, device: str = "cuda", shape=(3, 32, 32),
               steps: int = CELL_STEPS, warm: int = CELL_WARM) -> list[tuple]:

    # torch only when a check runs: the CLI imports this module for its parser on every command
    from harness.orchestrate import warmup

    t0 = time.perf_counter()
    try:
        m = warmup.time_cell(cfg, shape, 0.5, device, threads=1, warm=warm, budget_s=0.0,
                             min_steps=steps - warm, max_steps=steps - warm)
    except Exception as e:  # noqa: BLE001  (an acceptance reports every failure as a row)
        return [(f"{what}: {steps} steps", f"failed: {type(e).__name__}: {e}"[:300],
                 time.perf_counter() - t0, False)]
    peak = f", peak {m['peak_mem_gib']:.1f} GiB" if "peak_mem_gib" in m else ""
    ok = m["status"] != "diverged" and m["steps"] == steps - warm
    return [(f"{what}: {steps} steps", f"{m['img_per_s']:.0f} img/s over the last {m['steps']} "
             f"steps{peak}, {m['status']}", time.perf_counter() - t0, ok)]


def table(head: str, rows) -> list[str]:
    lines = [head, "", "| check | result | seconds | verdict |", "|---|---|---|---|"]
    lines += [f"| {c} | {r} | {s:.0f} | {'ok' if ok else 'FAILED'} |" for c, r, s, ok in rows]
    failed = sum(not ok for *_, ok in rows)
    lines += ["", "accepted: every check passed" if not failed else
              f"NOT accepted: {failed} check{'s' if failed > 1 else ''} failed"]
    return lines


def cmd_accept_gpu(args) -> int:
    import torch

    if args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        raise AcceptError(f"--out {args.out}: its folder does not exist, so the table could not "
                          f"be written after the run; give a path in an existing folder. Nothing "
                          f"was run.")
    if not torch.cuda.is_available():
        raise AcceptError(
            f"harness accept-gpu needs a CUDA GPU and this machine has none (torch "
            f"{torch.__version__}, built for CUDA {torch.version.cuda or 'none'}): nothing was "
            f"run. Run it on a machine with one NVIDIA GPU and a CUDA build of torch (`python -c "
            f"\"import torch; print(torch.cuda.is_available())\"` prints True there).")
    head = (f"harness accept-gpu on {torch.cuda.get_device_name()}: "
            f"{environment.describe(environment.current())}")
    print(head, flush=True)
    rows, t0 = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name, stage in (("gpu test tier", check_tests),
                            ("bench GPU rows", lambda: check_bench(tmp)),
                            ("cifar10-shaped cell", lambda: check_cell(*cifar10_cell()))):
            print(f"{name} ...", flush=True)
            done = stage()
            for row in done:
                print(f"  {row[0]}: {row[1]} ({row[2]:.0f} s) {'ok' if row[3] else 'FAILED'}",
                      flush=True)
            rows += done
    lines = table(head, rows)
    lines.insert(-1, f"total: {time.perf_counter() - t0:.0f} s")
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0 if all(ok for *_, ok in rows) else 1
