"""The metric protocol (issue: the same study gives the same metric on every machine): shipped
extractor weights verified by hash, a held-out reference, and a data floor on the same terms."""
import numpy as np
import pytest
import torch

from harness.core import data, metrics
from harness.core.metrics.extractor import SHIPPED, SHIPPED_DIR, DomainNet, load_shipped_extractor

# Features of the first 4 held-out images, summed over the 128 dimensions, as recorded when the
# weights were shipped (python -m harness.core.metrics.ship on the development machine).
RECORDED = {"digits": [58.33902062475681, 74.64938183454797, 67.53594028949738, 61.45159048400819],
            "mnist5k": [90.19554063677788, 90.3193919621408, 96.76203346252441, 81.31395129859447]}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_weights_load_match_their_hash_and_features(name):
    ds = data.load(name)
    ext = load_shipped_extractor(ds)
    assert ext["sha256"] == SHIPPED[name] and not ext["trained"]
    net = DomainNet(**ext["recipe"]["arch"])
    net.load_state_dict(ext["state_dict"])
    with torch.no_grad():
        feats, _ = net.eval().features(torch.from_numpy(ds.reference[:4]))
    assert np.allclose(feats.double().sum(1).numpy(), RECORDED[name], rtol=1e-5)


def test_a_changed_shipped_file_is_refused(tmp_path, monkeypatch):
    import shutil

    from harness.core.metrics import extractor

    folder = tmp_path / "weights"
    folder.mkdir()
    shutil.copy(f"{SHIPPED_DIR}/digits.pt", folder / "digits.pt")
    with open(folder / "digits.pt", "ab") as fh:
        fh.write(b"\0")
    monkeypatch.setattr(extractor, "SHIPPED_DIR", str(folder))
    with pytest.raises(metrics.MetricsError, match="has sha256 .* expected"):
        load_shipped_extractor(data.load("digits"))
    with pytest.raises(metrics.MetricsError, match="no shipped extractor for dataset 'toy2d'"):
        load_shipped_extractor(data.load("toy2d"))


def test_held_out_split_is_fixed_and_disjoint():
    ds = data.load("digits")
    assert len(ds.x) == 1200 and len(ds.reference) == 597 and len(ds.labels) == 1200
    full = np.concatenate([ds.x, ds.reference])
    assert len(np.unique(full.reshape(len(full), -1), axis=0)) == len(np.unique(
        data._digits()[0].reshape(1797, -1), axis=0))  # together they are the whole set
    again = data.split_held_out("digits", *data._digits())
    assert np.array_equal(again[2], ds.reference)


@pytest.fixture(scope="module")
def ev():
    return metrics.Evaluator(data.load("digits"), 1000, "/nonexistent-cache-never-written")


def test_evaluator_uses_shipped_weights_without_training(ev):
    before = metrics.TRAIN_COUNT
    assert ev.identity["extractor_origin"] == "shipped"
    assert f"shipped weights sha256 {SHIPPED['digits'][:12]}" in ev.protocol
    assert "1000 generated vs 597 held-out real digits images" in ev.protocol
    assert metrics.TRAIN_COUNT == before


def test_floor_is_on_the_terms_of_generated_samples(ev):
    """Real training images (what a perfect, non-memorising generator's samples look like to the
    reference) score at the floor within draw-to-draw noise; real images with noise above it."""
    torch.set_num_threads(1)
    ds = data.load("digits")
    floor = ev.real_vs_real()["fd_digits_1k"]
    draws = [ev(torch.from_numpy(ds.x[np.random.default_rng(s).choice(1200, 1000, replace=False)]))
             ["fd_digits_1k"] for s in (11, 12, 13)]
    spread = max(draws) - min(draws)
    assert all(abs(d - floor) <= max(2 * spread, 0.25 * floor) for d in draws), (floor, draws)
    noisy = ds.x[np.random.default_rng(0).choice(1200, 1000, replace=False)]
    # sigma 0.3 (a third of the image range): at 0.1 the score is within the floor's draw noise
    noisy = noisy + 0.3 * np.random.default_rng(1).standard_normal(noisy.shape).astype(np.float32)
    assert ev(torch.from_numpy(noisy))["fd_digits_1k"] > 1.5 * max(draws + [floor])
    assert "1000 real training images (drawn without replacement)" in ev.floor_protocol()


def test_a_reduced_resolution_keeps_the_split_and_the_shipped_extractor(tmp_path):
    native, small = data.load("mnist5k"), data.load("mnist5k", resolution=16)
    assert small.x.shape == (4000, 1, 16, 16) and small.reference.shape == (1000, 1, 16, 16)
    # area averages of the same held-out images, under a fingerprint of their own
    assert np.allclose(small.reference[3, 0, 2, 5], native.reference[3, 0, 4:6, 10:12].mean())
    assert small.fingerprint != native.fingerprint
    assert small.native_fingerprint == native.fingerprint and small.tag == "mnist5k16"
    assert data.load("mnist5k", resolution=32).fingerprint == native.fingerprint
    for bad in (12, 64):
        with pytest.raises(data.DataError, match=f"data.resolution {bad} does not fit"):
            data.load("mnist5k", resolution=bad)
    with pytest.raises(data.DataError, match="not an image dataset"):
        data.load("toy2d", resolution=2)
    ev = metrics.Evaluator(small, 1000, str(tmp_path / "cache"))  # the shipped 32x32 weights
    assert ev.metric_name == "fd_mnist5k16_1k" and "upsampled 16 -> 32" in ev.protocol
    floor = ev.real_vs_real()["fd_mnist5k16_1k"]
    noise = ev(torch.rand(1000, 1, 16, 16) * 2 - 1)["fd_mnist5k16_1k"]
    assert 0 <= floor < noise / 10
