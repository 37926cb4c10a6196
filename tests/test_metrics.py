"""harness.core.metrics: protocol-carrying names, FD sanity, extractor cache, toy metrics (SPEC §6)."""
import os

import numpy as np
import pytest
import torch

from harness.core import data, metrics

EPOCHS = 10  # fewer than the default (it enters the cache key, so tests never share its cache)


@pytest.fixture(scope="session")
def digits():
    return data.load("digits")


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory, digits):
    """A cache dir in which the digits classifier has been trained once for the session."""
    d = str(tmp_path_factory.mktemp("metrics_cache"))
    metrics.load_or_train_extractor(digits, d, epochs=EPOCHS)
    return d


@pytest.fixture(scope="session")
def ev_1k(digits, digits_cache):
    return metrics.Evaluator(digits, 1000, digits_cache, extractor_epochs=EPOCHS)


def _subset(x, n, seed):
    return torch.from_numpy(x[np.random.default_rng(seed).permutation(len(x))[:n]])


def test_n_tag_and_to_uint8():
    assert [metrics.n_tag(n) for n in (1000, 2000, 500, 50000, 1500)] == ["1k", "2k", "500", "50k", "1500"]
    u8 = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16)
    x = torch.from_numpy(u8.astype(np.float32) / 127.5 - 1.0)  # how harness.core.data scales images
    assert torch.equal(metrics.to_uint8(x), torch.from_numpy(u8))  # exact round trip
    assert metrics.to_uint8(torch.tensor([-2.0, 2.0])).tolist() == [0, 255]


def test_names_carry_protocol(ev_1k, digits):
    assert ev_1k.metric_name == "fd_digits_1k"
    r = ev_1k(_subset(digits.x, 1000, 0))
    assert set(r) == {"fd_digits_1k", "kid_digits_1k"} == set(ev_1k.metric_names)
    w = ev_1k.identity["extractor_weights"]
    assert len(w) == 8 and w in ev_1k.protocol and "1000 generated vs 597 held-out real" in ev_1k.protocol
    assert ev_1k.identity["extractor"] == f"harness-digits-{w}"
    assert ev_1k.identity["data_fingerprint"] == digits.fingerprint
    with pytest.raises(ValueError, match="expected 1000 samples"):
        ev_1k(_subset(digits.x, 999, 0))


def test_heldout_accuracy(ev_1k):
    assert ev_1k.heldout_acc > 0.9
    assert f"held-out acc {ev_1k.heldout_acc:.3f}" in ev_1k.protocol


def test_fd_real_small_noise_large(ev_1k, digits):
    real = ev_1k(_subset(digits.x, 1000, 1))["fd_digits_1k"]
    floor = ev_1k.real_vs_real()
    assert set(floor) == set(ev_1k.metric_names)
    noise = ev_1k(torch.rand(1000, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    assert 0.0 <= real < 2.0 and 0.0 <= floor["fd_digits_1k"] < 3.0
    assert noise["fd_digits_1k"] > 20 * max(real, floor["fd_digits_1k"])
    assert noise["kid_digits_1k"] > 1.0 and abs(floor["kid_digits_1k"]) < 0.2
    assert ev_1k.real_vs_real() == floor  # deterministic (memoised, but also seeded)
    bad = torch.full((1000, 1, 8, 8), float("nan"))
    assert all(np.isnan(v) for v in ev_1k(bad).values())


def test_fd_real_vs_itself_deterministic(digits, digits_cache):
    ev = metrics.Evaluator(digits, len(digits.reference), digits_cache, extractor_epochs=EPOCHS)
    assert ev.metric_name == f"fd_digits_{len(digits.reference)}"
    x = torch.from_numpy(digits.reference)  # the held-out reference against itself
    shuffled = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(3))]
    a, b = ev(shuffled), ev(shuffled)
    assert a == b
    assert a[ev.metric_name] < 1e-6  # same set, other order: clamped at 0 up to round-off


def test_extractor_cache_reused_and_corrupt_file(tmp_path, digits, digits_cache):
    before = metrics.TRAIN_COUNT
    ext = metrics.load_or_train_extractor(digits, digits_cache, epochs=EPOCHS)
    assert not ext["trained"] and metrics.TRAIN_COUNT == before
    mtime = os.path.getmtime(ext["path"])
    ev = metrics.Evaluator(digits, 500, digits_cache, extractor_epochs=EPOCHS)
    assert metrics.TRAIN_COUNT == before and os.path.getmtime(ext["path"]) == mtime
    assert ev.metric_name == "fd_digits_500" and ev.identity["extractor_weights"] == ext["weights"]
    assert ev.identity["extractor_file"] == ext["path"]
    assert ext["path"].startswith(os.path.join(digits_cache, "extractors", f"digits-{digits.fingerprint}-"))
    # a corrupt cache file: a clear error naming the file and the fix
    bad_dir = tmp_path / "bad"
    bad = os.path.join(str(bad_dir), "extractors", os.path.basename(ext["path"]))
    os.makedirs(os.path.dirname(bad))
    with open(bad, "wb") as fh:
        fh.write(b"not a torch file")
    with pytest.raises(metrics.MetricsError, match="Delete it") as e:
        metrics.Evaluator(digits, 500, str(bad_dir), extractor_epochs=EPOCHS)
    assert bad in str(e.value)
    assert metrics.TRAIN_COUNT == before


def test_fid_needs_weights(digits, tmp_path):
    with pytest.raises(ValueError, match="inception_weights") as e:
        metrics.Evaluator(digits, 1000, str(tmp_path), metric="fid")
    assert "pt_inception-2015-12-05" in str(e.value) and "http" in str(e.value)
    with pytest.raises(ValueError, match="does not exist"):
        metrics.Evaluator(digits, 1000, str(tmp_path), metric="fid",
                          inception_weights=str(tmp_path / "missing.pth"))


def test_unlabelled_images_need_fid(tmp_path):
    x = np.random.default_rng(0).uniform(-1, 1, (64, 1, 8, 8)).astype(np.float32)
    ds = data.Dataset("npz", x, None, 0.5)
    with pytest.raises(ValueError, match="no labels.*metric: fid"):
        metrics.Evaluator(ds, 32, str(tmp_path))


def test_wrong_metric_for_data(digits, tmp_path):
    with pytest.raises(ValueError, match="not for images"):
        metrics.Evaluator(digits, 100, str(tmp_path), metric="mmd")
    with pytest.raises(ValueError, match="not for 2-D"):
        metrics.Evaluator(data.load("toy2d"), 100, str(tmp_path), metric="fd")


def test_toy_metrics(tmp_path):
    ds = data.load("toy2d", kind="ring8")
    ev = metrics.Evaluator(ds, 1000, str(tmp_path))
    assert ev.metric_name == "mmd_toy2d_1k"
    assert set(ev.metric_names) == {"mmd_toy2d_1k", "swd_toy2d_1k", "modes_toy2d_1k"}
    same = ev(torch.from_numpy(ev._ref))  # the reference itself
    assert abs(same["mmd_toy2d_1k"]) < 1e-2 and same["swd_toy2d_1k"] < 1e-9
    real = ev(_subset(ds.x, 1000, 7))
    assert abs(real["mmd_toy2d_1k"]) < 5e-3 and real["modes_toy2d_1k"] == 1.0
    shifted = ev(_subset(ds.x, 1000, 7) + 1.0)
    assert shifted["mmd_toy2d_1k"] > 20 * abs(real["mmd_toy2d_1k"]) + 0.05
    assert shifted["swd_toy2d_1k"] > 5 * real["swd_toy2d_1k"]
    rng = np.random.default_rng(0)
    one = torch.from_numpy(data.TOY_CENTERS[3] + 0.1 * rng.standard_normal((1000, 2)))
    assert ev(one)["modes_toy2d_1k"] == 0.125
    floor = ev.real_vs_real()
    assert set(floor) == set(ev.metric_names) and floor["modes_toy2d_1k"] == 1.0
    assert abs(floor["mmd_toy2d_1k"]) < 5e-3
    # deterministic: a second evaluator picks the same reference and gives the same numbers
    assert metrics.Evaluator(ds, 1000, str(tmp_path))(one) == ev(one)


def test_toy_modes_only_for_ring(tmp_path):
    ev = metrics.Evaluator(data.load("toy2d", kind="checkerboard"), 500, str(tmp_path))
    assert set(ev.metric_names) == {"mmd_toy2d_500", "swd_toy2d_500"}
    assert "modes" not in ev.protocol
