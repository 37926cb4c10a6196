"""Stand-ins for the three files ``studies/cifar10.yaml`` reads, to rehearse it on a CPU:

- ``cifar-10-batches-py/``: ``data_batch_1..5`` and ``test_batch`` in the CIFAR-10 python format
  (a pickled dict: ``b"data"`` uint8 (N, 3072) rows of R, G, B planes, ``b"labels"``,
  ``b"filenames"``, ``b"batch_label"``), ``--per-batch`` smooth random 32x32 images each;
- ``edm-rehearsal-32x32-uncond.pkl``: an NVIDIA-format EDM snapshot (``tests/edm_pickles.py``)
  of an unconditional DDPM++ with EDM's CIFAR-10 settings at ``--channels`` base width (the real
  network has 128), random weights;
- ``weights-inception-rehearsal.pth``: a state dict in torch-fidelity's ``pt_inception`` layout
  (the keys and shapes of ``FeatureExtractorInceptionV3``), random weights.

The numbers such files give are meaningless; every loading and training path is the real one.

    python tests/rehearsal_files.py OUT [--channels 16] [--per-batch 40]

prints the three ``--set`` options that point a run of ``studies/cifar10.yaml`` at them.
"""
from __future__ import annotations

import argparse
import os
import pickle
import sys
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from edm_pickles import write_snapshot  # noqa: E402
from harness.core.nets import ddpmpp_settings  # noqa: E402
from harness.core.nets.ddpmpp import DDPMpp  # noqa: E402

CIFAR = "cifar-10-batches-py"
TEACHER = "edm-rehearsal-32x32-uncond.pkl"
INCEPTION = "weights-inception-rehearsal.pth"


def write_cifar(folder: str, per_batch: int, seed: int = 0) -> str:
    """``folder/cifar-10-batches-py`` with five training batches and a test batch."""
    out = os.path.join(folder, CIFAR)
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        coarse = rng.integers(0, 256, (per_batch, 3, 4, 4)).astype(np.float64)
        img = coarse.repeat(8, axis=2).repeat(8, axis=3) + rng.normal(0, 12, (per_batch, 3, 32, 32))
        data = np.clip(img, 0, 255).astype(np.uint8).reshape(per_batch, 3072)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        batch = {b"batch_label": f"rehearsal {name}".encode(), b"labels": labels,
                 b"data": data, b"filenames": [f"img_{i:05d}.png".encode()
                                               for i in range(per_batch)]}
        with open(os.path.join(out, name), "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return out


def write_teacher(folder: str, channels: int, seed: int = 0) -> str:
    """An EDM snapshot of a random unconditional 32x32 DDPM++ of ``channels`` base width."""
    settings = {k: list(v) if isinstance(v, tuple) else v
                for k, v in ddpmpp_settings(channels).items()}
    torch.manual_seed(seed)
    net = DDPMpp(32, 3, 3, augment_dim=9, **ddpmpp_settings(channels)).eval()
    with torch.no_grad():  # random everywhere (the architecture's own init is ~0 in places)
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    path = os.path.join(folder, TEACHER)
    write_snapshot(path, net, song_kwargs={"img_resolution": 32, "augment_dim": 9, **settings})
    return path


def write_inception(folder: str, seed: int = 0) -> str:
    """torch-fidelity's InceptionV3 state dict layout with the architecture's random init."""
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    torch.manual_seed(seed)
    cls = fe.FeatureExtractorInceptionV3
    with mock.patch.object(fe.torch, "load", return_value={}), \
            mock.patch.object(cls, "load_state_dict", return_value=None):
        net = cls("inception-v3-compat", ["2048"], feature_extractor_weights_path="unused")
    path = os.path.join(folder, INCEPTION)
    torch.save({k: v.contiguous() for k, v in net.state_dict().items()}, path)
    return path


def write_all(folder: str, channels: int = 16, per_batch: int = 40) -> dict[str, str]:
    """The three files; returns the ``--set`` keys of ``studies/cifar10.yaml`` -> their paths."""
    os.makedirs(folder, exist_ok=True)
    return {"data.path": write_cifar(folder, per_batch),
            "teacher.import": write_teacher(folder, channels),
            "eval.inception_weights": write_inception(folder)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="folder to write the files into")
    p.add_argument("--channels", type=int, default=16, help="teacher base width (default 16)")
    p.add_argument("--per-batch", type=int, default=40, help="images per CIFAR batch (default 40)")
    args = p.parse_args(argv)
    paths = write_all(args.out, args.channels, args.per_batch)
    print(" ".join(f"--set {k}={v}" for k, v in paths.items())
          + f" --set teacher.channels={args.channels}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
