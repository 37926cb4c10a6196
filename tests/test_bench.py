"""harness bench: the perf and packing rows run end to end (CPU here; CUDA uses the same code)."""
import pytest

from harness.orchestrate import bench

from test_cli import cli


def test_perf_row_measures_the_harness_step_per_variant(tmp_path):
    config = ("test config", "unet-xs", (1, 8, 8), 8,
              [("fp32", {}), ("channels_last", {"channels_last": True})])
    out = bench.bench_perf("cpu", steps=2, warm=1, config=config)
    assert [name for name, _ in out] == ["fp32", "channels_last"]
    assert all(ips > 0 for _, ips in out)
    assert "test config, batch 8 [channels_last]" in bench.ROWS[-1][0]


def test_unknown_bench_row_exits_2(tmp_path):
    code, out, err = cli("bench", "--rows", "step,speed", cwd=tmp_path)
    assert code == 2 and "unknown row 'speed'" in err


@pytest.mark.slow
def test_packing_row_runs_both_sweeps(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    walls = bench.bench_packing("cpu", n=2, kimg=0.5)
    assert set(walls) == {"packed", "serial"} and all(w > 0 for w in walls.values())
