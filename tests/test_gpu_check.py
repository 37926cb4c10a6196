"""``harness accept-gpu`` (harness.orchestrate.gpu_check): refused without CUDA (exit 2, nothing run); its
parts checked on the CPU: the cifar10-shaped cell's step, the parsing of pytest's and the
bench's output, the table and its verdict."""
from __future__ import annotations

import pytest
import torch

from harness.orchestrate import gpu_check
from harness.declare.config import resolve_cell

from test_cli import cli


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs the whole acceptance on a GPU")
def test_accept_gpu_without_cuda_exits_2_and_runs_nothing(tmp_path):
    code, out, err = cli("accept-gpu", "--out", tmp_path / "gpu.md", cwd=tmp_path)
    assert code == 2, out + err
    assert "needs a CUDA GPU and this machine has none" in err and "nothing was run" in err
    assert out == "" and not (tmp_path / "gpu.md").exists()
    code, out, err = cli("accept-gpu", "--out", tmp_path / "no" / "gpu.md", cwd=tmp_path)
    assert code == 2 and f"--out {tmp_path / 'no' / 'gpu.md'}: its folder does not exist" in err


def test_the_cifar10_cell_is_the_study_s_sid_cell_in_bf16():
    cfg, what = gpu_check.cifar10_cell()
    assert cfg["teacher"]["arch"] == "ddpmpp" and cfg["loss"]["name"] == "sid"
    assert cfg["student"]["precision"] == "bf16" and cfg["student"]["batch"] == 256
    assert what.startswith("cifar10-shaped cell: ddpmpp 3x32x32, sid, batch 256, bf16")


def test_cell_check_times_the_steps_after_the_warm_up_on_cpu():
    cfg = resolve_cell({"data": {"name": "digits"}, "loss": "sid", "student": {"batch": 8}})
    ((check, result, seconds, ok),) = gpu_check.check_cell(cfg, "tiny", device="cpu",
                                                           shape=(1, 8, 8), steps=4, warm=1)
    assert ok and check == "tiny: 4 steps" and "img/s over the last 3 steps" in result
    assert seconds > 0


def test_a_failing_cell_is_a_failed_row_not_a_crash():
    cfg = resolve_cell({"data": {"name": "digits"}, "loss": "sid", "student": {"batch": 8}})
    ((_, result, _, ok),) = gpu_check.check_cell(cfg, "wrong shape", device="cpu",
                                                 shape=(3, 7, 7), steps=3, warm=1)
    assert not ok and result.startswith("failed: ")


def test_pytest_summary_and_bench_rows_are_read_from_their_output():
    text = "....\n==== 4 passed, 1 skipped in 50.12s ====\n"
    assert gpu_check.pytest_summary(text) == "4 passed, 1 skipped in 50.12s"
    assert gpu_check.pytest_summary("ERROR: file not found: tests\n") == \
        "ERROR: file not found: tests"
    md = ("harness bench on NVIDIA H200 (...)\n\n| row | measured | target | verdict |\n"
          "|---|---|---|---|\n| SiD iteration [fp32] | 300 img/s | (target >= 355) | |\n"
          "| sweep | 3 s/cell | (target <= 2 s) | MISSED |\n")
    assert gpu_check.bench_rows(md) == [("SiD iteration [fp32]", "300 img/s", ""),
                                        ("sweep", "3 s/cell", "MISSED")]


def test_the_table_says_whether_the_machine_is_accepted():
    rows = [("gpu test tier", "4 passed", 50.0, True), ("cell", "failed: boom", 2.0, False)]
    lines = gpu_check.table("head", rows)
    assert "| cell | failed: boom | 2 | FAILED |" in lines and lines[-1] == \
        "NOT accepted: 1 check failed"
    assert gpu_check.table("head", rows[:1])[-1] == "accepted: every check passed"
