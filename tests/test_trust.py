"""What the harness reads cannot run code, hang it or take a study down (fast tier).

Each hostile file carries a payload that would create a marker file if any code from it ran;
the tests assert the marker never appears, the harness's own refusal (exit 2 or a clean
carry-on), and that stored results that were intact stay byte-identical.
"""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from harness import data


class Payload:
    """Unpickling this runs ``open(marker, 'w')``: the proof that code from a file ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _cifar_folder(folder, batch):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(1, 6):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return folder


def test_cifar_batches_are_read_as_data_only(tmp_path):
    rng = np.random.default_rng(0)
    good = {b"batch_label": b"training batch 1 of 5", b"labels": list(range(10)) * 2,
            b"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8),
            b"filenames": [b"x.png"] * 20}
    ds = data.load("cifar10", str(_cifar_folder(tmp_path / "good", good)))
    assert ds.x.shape == (100, 3, 32, 32) and ds.labels.shape == (100,)
    marker = tmp_path / "ran"
    bad = _cifar_folder(tmp_path / "bad", {**good, b"labels": Payload(marker)})
    with pytest.raises(data.DataError, match="data_batch_1.*not allowed in a CIFAR-10 batch"):
        data.load("cifar10", str(bad))
    assert not marker.exists()
