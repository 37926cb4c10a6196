"""The CUDA path (``-m gpu``; skipped without CUDA): every precision trains, bf16 stays close to
fp32, peak memory and images/s reach the results, and a CUDA checkpoint resumes on the CPU."""
import pytest
import torch

from harness.orchestrate import bench
from harness.orchestrate.cell import run_cell
from harness.declare.config import resolve_cell
from harness.store.results import load_rows

from test_perf import SHAPE, _image_cfg, _train_image

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _cfg(**student):  # 20 steps of batch 32
    return _image_cfg(kimg=0.64, batch=32, **student)


def _train(cfg, ckpt, device="cuda", max_steps=None):
    return _train_image(cfg, ckpt, max_steps=max_steps, device=device)


def test_every_precision_and_layout_trains_and_bf16_stays_near_fp32(tmp_path):
    runs = {}
    nchw = {"channels_last": False}
    for name, student in [("fp32", nchw), ("tf32", {"precision": "tf32", **nchw}),
                          ("bf16", {"precision": "bf16", **nchw}),
                          ("bf16-cl", {"precision": "bf16", "channels_last": True})]:
        state = _train(_cfg(**student), tmp_path / f"{name}.pt")
        assert state["step"] == 20
        runs[name] = state["generator"]
    for name in ("tf32", "bf16", "bf16-cl"):
        worst = max((runs[name][k] - runs["fp32"][k]).abs().max().item() for k in runs["fp32"])
        assert worst < 5e-2, name  # 20 Adam steps of lr 1e-4 move a weight by at most 2e-3


def test_cuda_checkpoint_resumes_on_cpu(tmp_path):
    _train(_cfg(), tmp_path / "c.pt", max_steps=7)
    state = _train(_cfg(), tmp_path / "c.pt", device="cpu")
    assert state["step"] == 20


def test_cell_rows_carry_peak_memory_and_throughput(tmp_path):
    cfg = resolve_cell({"data": {"name": "digits"}, "teacher": {"kimg": 4}, "loss": "sid",
                        "student": {"kimg": 0.64, "batch": 32, "precision": "bf16"},
                        "eval": {"n": 100, "every_kimg": 0.32, "samples": 2}})
    run_cell(cfg, str(tmp_path / "res"), str(tmp_path / "cache"), str(tmp_path / "c.pt"),
             device="cuda", log=lambda *_: None)
    rows = load_rows(str(tmp_path / "res"))
    assert (rows[rows.metric == "peak_mem_mb"].value > 0).all()
    assert (rows[rows.metric == "img_per_s"].value > 0).all()


def test_bench_perf_runs_on_cuda():
    config = ("test", "unet-xs", SHAPE, 16, [("fp32", {}), ("bf16 + compile",
                                                          {"precision": "bf16", "compile": True})])
    out = bench.bench_perf("cuda", steps=2, warm=2, config=config)
    assert len(out) == 2 and all(ips > 0 for _, ips in out)
