"""The domain extractor for ``metric: fd``: the classifier DomainNet, its seeded training, the
on-disk cache under ``<cache_dir>/extractors/`` (locked, atomic, hashed) and the weights shipped
inside the package (sha256-checked). Its registration with torch-fidelity is in ``.fidelity``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from harness.base.digest import file_sha256, json_sha256
from harness.core.data import labels_problem
from harness.core.io import save_atomic
from harness.core.metrics.common import MetricsError, _u8_to_float, to_uint8
from harness.core.perf import pick_device

try:  # POSIX advisory lock: concurrent workers train an extractor once, not once each
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None

INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
FEATURE_LAYER = "128"  # torch-fidelity feature name of the classifier's penultimate layer

TRAIN_COUNT = 0  # how many domain classifiers this process trained (tests check cache reuse)


# ----------------------------------------------------------------------------------------------
# cache helpers: hashes, atomic save, file lock, thread cap


def _short_hash(obj) -> str:
    return json_sha256(obj)[:8]


def state_dict_hash(state_dict: dict) -> str:
    """sha256 (first 8 hex) over the state dict's names, shapes, dtypes and bytes."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        t = state_dict[k].detach().cpu().contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:8]


@contextlib.contextmanager
def _file_lock(path: str):
    if fcntl is None:
        yield
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def _num_threads(k: int):
    """Temporarily cap intra-op threads (tiny convolutions only lose from threading, badly so
    on a loaded machine)."""
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, min(k, old)))
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ----------------------------------------------------------------------------------------------
# the domain classifier


class DomainNet(nn.Module):
    """Size-agnostic CNN: 4 conv layers, max-pools down to ~4x4 (at most 3), adaptive 2x2 pool,
    a 128-d penultimate layer (the features) and a linear head."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int = 32, width: int = 16,
                 feat_dim: int = 128, max_side: int = 64):
        super().__init__()
        w = width
        self.max_side = max_side
        self.image_size = image_size  # smaller inputs are upsampled to it (not a weight)
        side = min(image_size, max_side)
        n_pool = max(0, min(3, int(math.log2(max(side, 1) / 4))))  # 8 -> 1 pool, 32 -> 3
        layers, c_in = [], in_channels
        for i, c in enumerate((w, 2 * w, 4 * w, 8 * w)):
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU()]
            if i < n_pool:
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            c_in = c
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(2))
        self.fc = nn.Linear(8 * w * 4, feat_dim)
        self.head = nn.Linear(feat_dim, num_classes)
        # Set after training so the real data's features have unit mean variance per dimension:
        # FD then reads in those units and KID's cubic kernel stays well conditioned.
        self.register_buffer("feat_scale", torch.ones(()))

    def features(self, x: torch.Tensor):
        """x: float in [-1, 1] NCHW -> (penultimate features, logits)."""
        h, w = x.shape[-2:]
        if max(h, w) > self.max_side:  # large images: classify a downsampled copy
            s = self.max_side / max(h, w)
            x = F.interpolate(x, size=(max(1, round(h * s)), max(1, round(w * s))), mode="area")
        elif max(h, w) < min(self.image_size, self.max_side):  # data.resolution below training's
            x = F.interpolate(x, scale_factor=self.image_size // max(h, w), mode="nearest")
        f = F.relu(self.fc(self.body(x).flatten(1)))
        return f * self.feat_scale, self.head(f)

    def forward(self, x):
        return self.features(x)[1]


def default_epochs(n_train: int) -> int:
    return 30 if n_train <= 3000 else 15 if n_train <= 20000 else 10


def _recipe(dataset, epochs: int) -> dict:
    return {"version": 2, "arch": {"in_channels": int(dataset.x.shape[1]),
                                   "num_classes": int(dataset.labels.max()) + 1,
                                   "image_size": int(max(dataset.x.shape[2:])),
                                   "width": 16, "feat_dim": 128, "max_side": 64},
            "epochs": int(epochs), "batch_size": 64, "lr": 5e-3, "schedule": "cosine",
            "optimizer": "adam", "holdout": 0.2, "seed": 0}


def train_domain_classifier(dataset, epochs: int | None = None, device="cpu"):
    """Train the classifier; returns (state_dict on CPU, held-out accuracy, recipe, seconds).

    Deterministic (seeded; the caller's global RNG state is left untouched): 20% of the images
    are held out by a seeded permutation and never trained on.
    """
    global TRAIN_COUNT
    t0 = time.perf_counter()
    dev = torch.device(pick_device(device))
    x = _u8_to_float(to_uint8(torch.from_numpy(np.asarray(dataset.x))))  # what the extractor sees
    y = torch.from_numpy(np.asarray(dataset.labels, dtype=np.int64))
    n = x.shape[0]
    n_hold = max(1, int(round(0.2 * n)))
    epochs = default_epochs(n - n_hold) if epochs is None else int(epochs)
    recipe = _recipe(dataset, epochs)
    tiny = x.shape[-1] * x.shape[-2] <= 16 * 16
    threads = 1 if tiny and dev.type == "cpu" else torch.get_num_threads()
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), _num_threads(threads):
        torch.manual_seed(recipe["seed"])
        g = torch.Generator().manual_seed(recipe["seed"])
        perm = torch.randperm(n, generator=g)
        hold, train = perm[:n_hold], perm[n_hold:]
        net = DomainNet(**recipe["arch"]).to(dev)
        bs = recipe["batch_size"]
        steps = max(1, epochs * math.ceil(len(train) / bs))
        opt = torch.optim.Adam(net.parameters(), lr=recipe["lr"])
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        xt, yt = x[train].to(dev), y[train].to(dev)
        net.train()
        for _ in range(epochs):
            order = torch.randperm(len(train), generator=g).to(dev)
            for i in range(0, len(train), bs):
                idx = order[i:i + bs]
                loss = F.cross_entropy(net(xt[idx]), yt[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        net.eval()
        correct, feats = 0, []
        with torch.no_grad():
            for i in range(0, n_hold, 1024):
                idx = hold[i:i + 1024]
                correct += int((net(x[idx].to(dev)).argmax(1).cpu() == y[idx]).sum())
            for i in range(0, len(train), 1024):
                feats.append(net.features(xt[i:i + 1024])[0].double().cpu())
            var = torch.cat(feats).var(0).mean()
            net.feat_scale.fill_(float(var.clamp_min(1e-12).rsqrt()))
    TRAIN_COUNT += 1
    state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    return state, correct / n_hold, recipe, time.perf_counter() - t0


SHIPPED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
SHIPPED = {  # dataset -> sha256 of harness/core/metrics/weights/<dataset>.pt (python -m harness.core.metrics.ship)
    "digits": "27b94a394a610aa9bdd3772fcb91c52ce3463ea831c415d37c00ad63b2a09de1",
    "mnist5k": "8ab0ce2c18ca5c1793ac984cb45b7fef04f1985d1453d2581fc68e4689aade5d",
}
"""Extractor weights shipped inside the package, trained once by ``harness.core.metrics.ship`` on the
dataset's training split: every machine scores with the same features, so scores from
different machines compare."""


def _extractor_blob(state, acc, recipe, secs, dataset) -> dict:
    return {"format": 1, "state_dict": state, "heldout_acc": float(acc),
            "recipe": json.dumps(recipe, sort_keys=True), "train_seconds": float(secs),
            "dataset": dataset.name, "fingerprint": dataset.fingerprint}


def _read_extractor(path: str, fix: str) -> dict:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        state, acc = blob["state_dict"], float(blob["heldout_acc"])
        recipe = json.loads(blob["recipe"])
        DomainNet(**recipe["arch"]).load_state_dict(state)
    except Exception as e:  # noqa: BLE001 - any failure means the file is not usable
        raise MetricsError(f"extractor file {path!r} is corrupt or does not match the classifier "
                           f"({type(e).__name__}: {e}). {fix}") from None
    return {"state_dict": state, "heldout_acc": acc, "recipe": recipe, "path": path,
            "weights": state_dict_hash(state), "fingerprint": blob.get("fingerprint"),
            "train_seconds": float(blob.get("train_seconds", float("nan")))}


def has_shipped(dataset_name: str) -> bool:
    return SHIPPED.get(dataset_name) is not None


def load_shipped_extractor(dataset) -> dict:
    """The packaged extractor of an embedded dataset, its file's sha256 verified; never trains.

    Returns the dict of :func:`load_or_train_extractor` with ``sha256`` and ``trained=False``."""
    want = SHIPPED.get(dataset.name)
    if want is None:
        raise MetricsError(f"no shipped extractor for dataset {dataset.name!r} (shipped: "
                           f"{', '.join(k for k, v in SHIPPED.items() if v)}); set eval.extractor: "
                           f"train to train one on this machine (its hash is recorded in the "
                           f"protocol)")
    path = os.path.join(SHIPPED_DIR, f"{dataset.name}.pt")
    rerun = "Reinstall the package, or rerun `python -m harness.core.metrics.ship` and update SHIPPED."
    if not os.path.isfile(path):
        raise MetricsError(f"the shipped extractor {path!r} is missing. {rerun}")
    got = file_sha256(path)
    if got != want:
        raise MetricsError(f"the shipped extractor {path!r} has sha256 {got[:16]}..., expected "
                           f"{want[:16]}...: the file was changed. {rerun}")
    ext = _read_extractor(path, rerun)
    if ext["fingerprint"] != (dataset.native_fingerprint or dataset.fingerprint):
        raise MetricsError(f"the shipped {dataset.name} extractor was trained on data with "
                           f"fingerprint {ext['fingerprint']}, this dataset is "
                           f"{dataset.fingerprint}. {rerun}")
    return {**ext, "sha256": got, "trained": False}


def ship_extractor(dataset, folder: str = SHIPPED_DIR, device="cpu") -> tuple[str, str, float]:
    """Train the dataset's classifier with the fixed recipe and write ``<folder>/<name>.pt``;
    returns (path, sha256, held-out accuracy)."""
    state, acc, recipe, _ = train_domain_classifier(dataset, None, device)
    path = os.path.join(folder, f"{dataset.name}.pt")  # no timing inside: the bytes repeat
    save_atomic(_extractor_blob(state, acc, recipe, float("nan"), dataset), path)
    return path, file_sha256(path), acc


def load_or_train_extractor(dataset, cache_dir: str, epochs: int | None = None, device="cpu"):
    """The dataset's classifier from ``cache_dir/extractors/`` (trained and cached on a miss).

    Returns a dict: state_dict, heldout_acc, recipe, weights (hash), path, trained (bool).
    """
    problem = labels_problem(dataset)
    if problem:
        raise MetricsError(f"{problem} (download: {INCEPTION_URL}).")
    n = len(dataset.x)
    epochs = default_epochs(n - max(1, int(round(0.2 * n)))) if epochs is None else int(epochs)
    arch_hash = _short_hash(_recipe(dataset, epochs))
    path = os.path.join(cache_dir, "extractors",
                        f"{dataset.name}-{dataset.fingerprint}-{arch_hash}.pt")
    with _file_lock(path + ".lock"):
        trained = not os.path.exists(path)
        if trained:
            state, acc, recipe, secs = train_domain_classifier(dataset, epochs, device)
            save_atomic(_extractor_blob(state, acc, recipe, secs, dataset), path)
    ext = _read_extractor(path, "Delete it; the classifier is retrained on the next run.")
    return {**ext, "trained": trained}
