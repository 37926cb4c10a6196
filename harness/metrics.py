"""Sample-quality metrics (SPEC §6).

Images
    FID-style scores go through torch-fidelity (``calculate_metrics``):

    * ``metric: fd`` (the offline default, ``auto``): a small CNN classifier is trained once per
      dataset on its images and labels (the "domain extractor"), cached under
      ``<cache_dir>/extractors/`` and registered with torch-fidelity as a feature extractor whose
      name carries the sha256 of its weights. Metrics: ``fd_<dataset>_<n>`` (Frechet distance on
      its 128-d penultimate features, scaled to unit mean variance on the real data) and
      ``kid_<dataset>_<n>``. (k-NN precision/recall are left out: in this feature space pure
      noise scored precision 0.79 on mnist5k, since noise features collapse near real outliers.)
    * ``metric: fid``: torch-fidelity's ``inception-v3-compat`` with a local weights file.
      Metrics: ``fid_inception_<n>``, ``kid_inception_<n>``.

    The real reference is the whole dataset; its features are cached by torch-fidelity under
    ``<cache_dir>/fidelity/`` with a cache name holding the data fingerprint and the extractor's
    weight hash (torch-fidelity keys its cache on names only). Generated samples are never cached.

toy2d
    ``mmd_toy2d_<n>`` (unbiased RBF-kernel MMD^2, mean of three bandwidths set from the median
    pairwise distance of the reference), ``swd_toy2d_<n>`` (sliced Wasserstein-1 over 128 seeded
    directions) and, for the ring of 8 Gaussians only, ``modes_toy2d_<n>`` (fraction of the 8
    modes holding at least 1% of the samples within distance 0.3). The reference is a subset of
    ``min(n, N)`` real points drawn by a permutation seeded with the data fingerprint.

A corrupt extractor cache file raises :class:`MetricsError` naming the file; delete it to retrain.
Generated samples containing NaN/inf give NaN for every metric (a diverged run, not a crash).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
import threading
import time
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # POSIX advisory lock: concurrent workers train an extractor once, not once each
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None

INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
FEATURES_VERSION = 1  # bump when the extractor's outputs change for the same weights (cache names)
FEATURE_LAYER = "128"  # torch-fidelity feature name of the classifier's penultimate layer
KID_SUBSETS = 100
KID_MAX_SUBSET = 1000
TOY_DIRECTIONS = 128
TOY_MODE_RADIUS = 0.3
TOY_MODE_MIN_FRACTION = 0.01
TOY_BANDWIDTH_FACTORS = (0.1, 0.3, 1.0)

TRAIN_COUNT = 0  # how many domain classifiers this process trained (tests check cache reuse)


class MetricsError(ValueError):
    """A metric that cannot be set up: the message says what is missing and how to fix it."""


# ----------------------------------------------------------------------------------------------
# helpers


def n_tag(n: int) -> str:
    """1000 -> '1k', 50000 -> '50k', 500 -> '500', 1500 -> '1500'."""
    n = int(n)
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def to_uint8(samples) -> torch.Tensor:
    """Float images in [-1, 1] (NCHW) -> uint8 NCHW, rounded as EDM does: (x*127.5+128).clip(0,255)."""
    x = torch.as_tensor(samples).detach()
    if x.dtype == torch.uint8:
        return x.cpu()
    x = x.to(device="cpu", dtype=torch.float32)
    return (x * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def _u8_to_float(u8: torch.Tensor) -> torch.Tensor:
    return u8.float() / 127.5 - 1.0


def _short_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:8]


def state_dict_hash(state_dict: dict) -> str:
    """sha256 (first 8 hex) over the state dict's names, shapes, dtypes and bytes."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        t = state_dict[k].detach().cpu().contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:8]


def _fingerprint_seed(fingerprint: str, salt: int = 0) -> int:
    return (int(fingerprint[:8], 16) + salt) % (2 ** 31)


def _atomic_torch_save(obj, path: str) -> None:
    d = os.path.dirname(path)
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


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


def _torch_device(device) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise MetricsError(f"device {device!r} asked for but CUDA is not available; use device: cpu")
    return d


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
    dev = _torch_device(device)
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


def load_or_train_extractor(dataset, cache_dir: str, epochs: int | None = None, device="cpu"):
    """The dataset's classifier from ``cache_dir/extractors/`` (trained and cached on a miss).

    Returns a dict: state_dict, heldout_acc, recipe, weights (hash), path, trained (bool).
    """
    if dataset.labels is None:
        raise MetricsError(
            f"dataset {dataset.name!r} has no labels: the offline FD metric trains a domain "
            f"classifier on labels. Use 'metric: fid' with 'inception_weights: <path to "
            f"pt_inception-2015-12-05 weights>' instead (download: {INCEPTION_URL}).")
    n = len(dataset.x)
    epochs = default_epochs(n - max(1, int(round(0.2 * n)))) if epochs is None else int(epochs)
    arch_hash = _short_hash(_recipe(dataset, epochs))
    path = os.path.join(cache_dir, "extractors",
                        f"{dataset.name}-{dataset.fingerprint}-{arch_hash}.pt")
    with _file_lock(path + ".lock"):
        trained = not os.path.exists(path)
        if trained:
            state, acc, recipe, secs = train_domain_classifier(dataset, epochs, device)
            _atomic_torch_save({"format": 1, "state_dict": state, "heldout_acc": float(acc),
                                "recipe": json.dumps(recipe, sort_keys=True),
                                "train_seconds": float(secs), "dataset": dataset.name,
                                "fingerprint": dataset.fingerprint}, path)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        state, acc = blob["state_dict"], float(blob["heldout_acc"])
        recipe = json.loads(blob["recipe"])
        DomainNet(**recipe["arch"]).load_state_dict(state)
    except Exception as e:  # noqa: BLE001 - any failure means the file is not usable
        raise MetricsError(
            f"extractor cache file {path!r} is corrupt or does not match the classifier "
            f"({type(e).__name__}: {e}). Delete it; the classifier is retrained on the next "
            f"run.") from None
    return {"state_dict": state, "heldout_acc": acc, "recipe": recipe, "path": path,
            "weights": state_dict_hash(state), "trained": trained,
            "train_seconds": float(blob.get("train_seconds", float("nan")))}


# ----------------------------------------------------------------------------------------------
# torch-fidelity glue

_REGISTERED: dict[str, type] = {}
_REGISTER_LOCK = threading.Lock()


def _fidelity():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch_fidelity
    return torch_fidelity


def _make_extractor_base():
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.helpers import vassert

    class HarnessDomainExtractor(FeatureExtractorBase):
        """The harness's domain classifier as a torch-fidelity extractor (uint8 NCHW in).

        Subclassed once per weight hash: torch-fidelity instantiates the registered class with
        ``cls(name, features_list, **kwargs)``, so the weights live on the class.
        """
        _arch: dict = {}
        _state: dict = {}

        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)
            self.net = DomainNet(**self._arch)
            self.net.load_state_dict(self._state)
            self.requires_grad_(False)
            self.eval()

        @staticmethod
        def get_provided_features_list():
            return FEATURE_LAYER, "logits"

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"isc": "logits", "fid": FEATURE_LAYER, "kid": FEATURE_LAYER,
                    "prc": FEATURE_LAYER}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 1, 8, 8, dtype=torch.uint8)

        def forward(self, x):
            vassert(torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() == 4,
                    "Expecting uint8 NCHW images")
            f, logits = self.net.features(_u8_to_float(x))
            out = {FEATURE_LAYER: f, "logits": logits}
            return tuple(out[k] for k in self.features_list)

    return HarnessDomainExtractor


def register_extractor(dataset_name: str, weights: str, arch: dict, state_dict: dict) -> str:
    """Register the classifier with torch-fidelity (once per process); returns its name."""
    name = f"harness-{dataset_name}-{weights}"
    with _REGISTER_LOCK:
        if name in _REGISTERED:
            return name
        _fidelity()
        from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

        if name in FEATURE_EXTRACTORS_REGISTRY:  # e.g. this module re-imported: same name, same weights
            cls = FEATURE_EXTRACTORS_REGISTRY[name]
        else:
            base = _make_extractor_base()
            cls = type(f"HarnessDomainExtractor_{weights}", (base,),
                       {"_arch": dict(arch), "_state": dict(state_dict)})
            register_feature_extractor(name, cls)
        _REGISTERED[name] = cls
    return name


class _U8Images(torch.utils.data.Dataset):
    """uint8 NCHW tensor as a torch-fidelity input; 1-channel images repeated to RGB if asked."""

    def __init__(self, u8: torch.Tensor, rgb: bool = False):
        self.u8 = u8.contiguous()
        self.rgb = rgb and u8.shape[1] == 1

    def __len__(self):
        return self.u8.shape[0]

    def __getitem__(self, i):
        x = self.u8[i]
        return x.expand(3, -1, -1) if self.rgb else x


_FILE_HASHES: dict[tuple, str] = {}


def _file_hash(path: str) -> str:
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _FILE_HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        _FILE_HASHES[key] = h.hexdigest()[:8]
    return _FILE_HASHES[key]


# ----------------------------------------------------------------------------------------------
# toy2d


def _pair_kernel_sum(a: torch.Tensor, b: torch.Tensor, bandwidths, block: int = 4096) -> float:
    """sum_ij mean_h exp(-|a_i - b_j|^2 / (2 h^2)), blockwise in float64."""
    total = 0.0
    inv = torch.tensor([1.0 / (2.0 * h * h) for h in bandwidths], dtype=torch.float64)
    for i in range(0, a.shape[0], block):
        d2 = torch.cdist(a[i:i + block], b).pow(2)
        total += float(torch.exp(-d2[None] * inv[:, None, None]).mean(0).sum())
    return total


def _sliced_w1(a: np.ndarray, b: np.ndarray, directions: np.ndarray) -> float:
    pa, pb = np.sort(a @ directions.T, axis=0), np.sort(b @ directions.T, axis=0)
    m = max(len(pa), len(pb))
    u = (np.arange(m) + 0.5) / m  # inverted-CDF quantiles: exact when the sizes are equal
    qa, qb = pa[(u * len(pa)).astype(int)], pb[(u * len(pb)).astype(int)]
    return float(np.abs(qa - qb).mean())


def _modes_covered(x: np.ndarray, centers: np.ndarray) -> float:
    d = np.linalg.norm(x[:, None, :] - centers[None], axis=-1)
    frac = (d < TOY_MODE_RADIUS).mean(0)
    return float((frac >= TOY_MODE_MIN_FRACTION).mean())


# ----------------------------------------------------------------------------------------------
# the evaluator


class Evaluator:
    """Built once per cell; evaluates generated samples against the dataset.

    ``metric``: images ``auto``/``fd`` (domain classifier; needs labels) or ``fid`` (Inception,
    needs ``inception_weights``); toy2d ``auto``/``mmd``. ``extractor_epochs`` overrides the
    classifier's training length (it enters the cache key, so it never mixes with the default).
    """

    def __init__(self, dataset, n: int, cache_dir: str, metric: str = "auto",
                 inception_weights: str | None = None, device="cpu", *,
                 extractor_epochs: int | None = None):
        self.dataset = dataset
        self.n = int(n)
        if self.n < 2:
            raise MetricsError(f"metrics need n >= 2 samples, got n={n}")
        self.cache_dir = os.path.abspath(os.path.expanduser(cache_dir))
        self.metric = metric = (metric or "auto").lower()
        self.device = _torch_device(device)
        self.identity: dict = {"data_fingerprint": dataset.fingerprint}
        self.heldout_acc: float | None = None  # the domain classifier's, for metric fd
        self._floor = None
        self._x = np.asarray(dataset.x)
        tag = n_tag(self.n)
        if dataset.x.ndim == 4:
            if metric not in ("auto", "fd", "fid"):
                raise MetricsError(f"metric {metric!r} is not for images; use 'fd' (domain "
                                   f"classifier, the offline default) or 'fid' (Inception)")
            self.kind = "fid" if metric == "fid" else "fd"
            self._setup_images(tag, inception_weights, extractor_epochs)
        elif dataset.x.ndim == 2 and dataset.x.shape[1] == 2:
            if metric not in ("auto", "mmd"):
                raise MetricsError(f"metric {metric!r} is not for 2-D toy data; use 'mmd' (or 'auto')")
            self.kind = "toy"
            self._setup_toy(tag)
        else:
            raise MetricsError(f"dataset {dataset.name!r}: array shape {dataset.x.shape} is neither "
                               f"images (N,C,H,W) nor 2-D points (N,2)")

    # ---- images ------------------------------------------------------------------------------

    def _setup_images(self, tag, inception_weights, epochs):
        ds = self.dataset
        n_real = len(self._x)
        self._real_u8 = to_uint8(torch.from_numpy(self._x))
        self._kid_subset = min(KID_MAX_SUBSET, self.n, n_real)
        if self.kind == "fid":
            if not inception_weights:
                hub = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(INCEPTION_URL))
                found = f" A copy exists at {hub}: pass that path." if os.path.exists(hub) else ""
                raise MetricsError(
                    "metric 'fid' needs the Inception weights file (pt_inception-2015-12-05, "
                    f"torch-fidelity's inception-v3-compat): set inception_weights to its local "
                    f"path. There is no internet here; download {INCEPTION_URL} on a machine "
                    f"that has it and copy it over.{found} Without it, use metric 'fd' (the "
                    f"offline domain-classifier proxy).")
            path = os.path.abspath(os.path.expanduser(inception_weights))
            if not os.path.isfile(path):
                raise MetricsError(f"inception_weights {path!r} does not exist; expected the "
                                   f"pt_inception-2015-12-05 weights file ({INCEPTION_URL})")
            weights = _file_hash(path)
            self._fe_name, self._rgb = "inception-v3-compat", True
            self._fe_kwargs = {"feature_extractor_weights_path": path}
            self._batch = 64
            self.metric_name = f"fid_inception_{tag}"
            self._names = {"fid": self.metric_name, "kid": f"kid_inception_{tag}"}
            self.identity.update(extractor="inception-v3-compat", extractor_weights=weights)
            self.protocol = (
                f"torch-fidelity FID on inception-v3-compat pool3 features (weights {weights}), "
                f"{self.n} generated vs {n_real} real {ds.name} images; KID: poly kernel, "
                f"{KID_SUBSETS} subsets of {self._kid_subset}")
        else:
            ext = load_or_train_extractor(ds, self.cache_dir, epochs, self.device)
            weights = ext["weights"]
            self.heldout_acc = ext["heldout_acc"]
            self._fe_name = register_extractor(ds.name, weights, ext["recipe"]["arch"], ext["state_dict"])
            self._rgb, self._fe_kwargs, self._batch = False, {}, 256
            self.metric_name = f"fd_{ds.name}_{tag}"
            self._names = {"fid": self.metric_name, "kid": f"kid_{ds.name}_{tag}"}
            self.identity.update(extractor=self._fe_name, extractor_weights=weights,
                                 heldout_acc=round(self.heldout_acc, 4),
                                 extractor_file=ext["path"])
            self.protocol = (
                f"torch-fidelity FD on penultimate ({FEATURE_LAYER}-d) features of harness "
                f"{ds.name} classifier (held-out acc {self.heldout_acc:.3f}, weights {weights}), "
                f"{self.n} generated vs {n_real} real; KID: poly kernel, {KID_SUBSETS} subsets of "
                f"{self._kid_subset}")
        # torch-fidelity keys its cache on names only: put everything that fixes the features in it
        self._ref_cache_name = (f"{ds.name}-{ds.fingerprint}-{self._fe_name}-"
                                f"{self.identity['extractor_weights']}-f{FEATURES_VERSION}")
        self.metric_names = tuple(self._names.values())

    def _fidelity_metrics(self, u8_a, u8_b, cache_name_b, kid_subset):
        tf = _fidelity()
        kw = dict(
            input1=_U8Images(u8_a, self._rgb), input2=_U8Images(u8_b, self._rgb),
            feature_extractor=self._fe_name, fid=True, kid=True,
            kid_subsets=KID_SUBSETS, kid_subset_size=kid_subset, batch_size=self._batch,
            cuda=self.device.type == "cuda", save_cpu_ram=True, verbose=False, rng_seed=2020,
            **self._fe_kwargs)
        if cache_name_b is None:
            kw["cache"] = False
        else:  # only input2 (the real reference) is cached: input1 has no cache name
            kw.update(cache=True, cache_root=os.path.join(self.cache_dir, "fidelity", tf.__version__),
                      input2_cache_name=cache_name_b)
        pin = kw["cuda"] and self.device.index is not None
        with torch.cuda.device(self.device) if pin else contextlib.nullcontext():
            m = tf.calculate_metrics(**kw)  # torch-fidelity's .cuda() means the current device
        out = {self._names["fid"]: max(0.0, float(m[tf.KEY_METRIC_FID])),
               self._names["kid"]: float(m[tf.KEY_METRIC_KID_MEAN])}
        return out

    # ---- toy2d -------------------------------------------------------------------------------

    def _setup_toy(self, tag):
        from harness.data import TOY_CENTERS

        ds, x = self.dataset, self._x.astype(np.float64)
        rng = np.random.default_rng(_fingerprint_seed(ds.fingerprint))
        self._ref = x[rng.permutation(len(x))[:min(self.n, len(x))]]
        sub = torch.from_numpy(self._ref[:2000])
        iu = torch.triu_indices(len(sub), len(sub), 1)
        med = float(torch.cdist(sub, sub)[iu[0], iu[1]].median())  # median pairwise distance
        self._bw = tuple(f * med for f in TOY_BANDWIDTH_FACTORS)
        self._ref_t = torch.from_numpy(self._ref)
        self._ref_kk = _pair_kernel_sum(self._ref_t, self._ref_t, self._bw)
        g = np.random.default_rng(0)
        d = g.standard_normal((TOY_DIRECTIONS, 2))
        self._dirs = d / np.linalg.norm(d, axis=1, keepdims=True)
        near = np.linalg.norm(x[:, None] - TOY_CENTERS[None], axis=-1).min(1) < TOY_MODE_RADIUS
        self._ring = bool(near.mean() > 0.9 and _modes_covered(x, TOY_CENTERS) == 1.0)
        self._centers = TOY_CENTERS
        self.metric_name = f"mmd_toy2d_{tag}"
        self._names = {"mmd": self.metric_name, "swd": f"swd_toy2d_{tag}"}
        if self._ring:
            self._names["modes"] = f"modes_toy2d_{tag}"
        self.metric_names = tuple(self._names.values())
        bws = "/".join(f"{b:.3g}" for b in self._bw)
        self.protocol = (
            f"toy2d: unbiased RBF MMD^2 (mean kernel over bandwidths {bws} = "
            f"{'/'.join(map(str, TOY_BANDWIDTH_FACTORS))} x median pairwise distance), sliced "
            f"Wasserstein-1 over {TOY_DIRECTIONS} seeded directions"
            + (f", fraction of the 8 ring modes with >= {TOY_MODE_MIN_FRACTION:.0%} of samples "
               f"within {TOY_MODE_RADIUS}" if self._ring else "")
            + f"; {self.n} generated vs {len(self._ref)} real points (subset seeded by the data "
              f"fingerprint)")

    def _toy_metrics(self, a: np.ndarray, b: np.ndarray, bb: float | None = None):
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        m, k = len(a), len(b)
        aa = _pair_kernel_sum(ta, ta, self._bw)
        bb = _pair_kernel_sum(tb, tb, self._bw) if bb is None else bb
        ab = _pair_kernel_sum(ta, tb, self._bw)
        mmd = (aa - m) / (m * (m - 1)) + (bb - k) / (k * (k - 1)) - 2 * ab / (m * k)
        out = {self._names["mmd"]: float(mmd), self._names["swd"]: _sliced_w1(a, b, self._dirs)}
        if "modes" in self._names:
            out[self._names["modes"]] = _modes_covered(a, self._centers)
        return out

    # ---- public ------------------------------------------------------------------------------

    def _check(self, samples) -> torch.Tensor:
        s = torch.as_tensor(samples).detach()
        want = tuple(self._x.shape[1:])
        if tuple(s.shape[1:]) != want or s.shape[0] != self.n:
            raise MetricsError(
                f"{self.metric_name}: expected {self.n} samples of shape {want}, got "
                f"{tuple(s.shape)}; the metric name carries n, so evaluate exactly n samples")
        return s

    def __call__(self, samples) -> dict[str, float]:
        """samples: float in [-1, 1] NCHW (uint8 accepted), or (N, 2) toy points; exactly n."""
        s = self._check(samples)
        if s.dtype != torch.uint8 and not bool(torch.isfinite(s).all()):
            return {k: float("nan") for k in self.metric_names}
        if self.kind == "toy":
            return self._toy_metrics(s.cpu().double().numpy(), self._ref, self._ref_kk)
        return self._fidelity_metrics(to_uint8(s), self._real_u8, self._ref_cache_name,
                                      self._kid_subset)

    def real_vs_real(self) -> dict[str, float]:
        """The floor: two disjoint halves of the real data, each min(n, N//2), same metric names."""
        if self._floor is None:
            n_real = len(self._x)
            h = min(self.n, n_real // 2)
            perm = np.random.default_rng(_fingerprint_seed(self.dataset.fingerprint, 1)).permutation(n_real)
            ia, ib = perm[:h], perm[h:2 * h]
            if self.kind == "toy":
                x = self._x.astype(np.float64)
                self._floor = self._toy_metrics(x[ia], x[ib])
            else:
                ia, ib = torch.from_numpy(np.sort(ia)), torch.from_numpy(np.sort(ib))
                self._floor = self._fidelity_metrics(self._real_u8[ia], self._real_u8[ib], None,
                                                     min(KID_MAX_SUBSET, h))
        return dict(self._floor)

    def __repr__(self):
        return f"Evaluator({self.metric_name}: {self.protocol})"
