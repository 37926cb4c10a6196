"""The Evaluator: built once per cell, it scores generated samples against the dataset
with protocol-carrying metric names (images through torch-fidelity, toy2d in closed form)."""
from __future__ import annotations

import contextlib
import os

import numpy as np
import torch

from harness.core.data import TOY_CENTERS
from harness.core.metrics.common import (
    MetricsError,
    _fingerprint_seed,
    n_tag,
    to_uint8,
)
from harness.core.metrics.extractor import (
    FEATURE_LAYER,
    INCEPTION_URL,
    has_shipped,
    load_or_train_extractor,
    load_shipped_extractor,
)
from harness.core.metrics.fidelity import (
    _fidelity,
    _file_hash,
    _U8Images,
    load_inception_weights,
    register_extractor,
    register_inception,
)
from harness.core.metrics.toy import (
    TOY_BANDWIDTH_FACTORS,
    TOY_DIRECTIONS,
    TOY_MODE_MIN_FRACTION,
    TOY_MODE_RADIUS,
    _modes_covered,
    _pair_kernel_sum,
    _sliced_w1,
)
from harness.core.perf import pick_device

FEATURES_VERSION = 1  # bump when the extractor's outputs change for the same weights (cache names)
KID_SUBSETS = 100
KID_MAX_SUBSET = 1000
_REFERENCE: dict[str, tuple] = {}  # reference cache name -> (features, FID statistics), per process


class Evaluator:
    """Built once per cell; evaluates generated samples against the dataset.

    ``metric``: images ``auto``/``fd`` (domain classifier; needs labels) or ``fid`` (Inception,
    needs ``inception_weights``); toy2d ``auto``/``mmd``. ``extractor``: ``auto`` (the shipped
    weights where the package has them, else trained), ``shipped`` or ``train``.
    ``extractor_epochs`` overrides the trained classifier's length (it enters the cache key).

    The reference set is ``dataset.reference`` (held-out images, see ``harness.core.data``) where the
    dataset has one, else the training images. The data floor (:meth:`real_vs_real`) is measured
    on the same terms as generated samples: ``n`` real training images against the same
    reference, with the same KID subsets.
    """

    def __init__(self, dataset, n: int, cache_dir: str, metric: str = "auto",
                 inception_weights: str | None = None, device="cpu", *,
                 extractor: str = "auto", extractor_epochs: int | None = None):
        self.dataset = dataset
        self.n = int(n)
        if self.n < 2:
            raise MetricsError(f"metrics need n >= 2 samples, got n={n}")
        self.cache_dir = os.path.abspath(os.path.expanduser(cache_dir))
        self.metric = metric = (metric or "auto").lower()
        self.device = torch.device(pick_device(device))
        self.identity: dict = {"data_fingerprint": dataset.fingerprint}
        self.heldout_acc: float | None = None  # the domain classifier's, for metric fd
        self._floor = None
        self._fe = None  # (torch-fidelity extractor, FID layer, KID layer), built on first use
        self._x = np.asarray(dataset.x)
        tag = n_tag(self.n)
        if dataset.x.ndim == 4:
            if metric not in ("auto", "fd", "fid"):
                raise MetricsError(f"metric {metric!r} is not for images; use 'fd' (domain "
                                   f"classifier, the offline default) or 'fid' (Inception)")
            self.kind = "fid" if metric == "fid" else "fd"
            self._setup_images(tag, inception_weights, extractor, extractor_epochs)
        elif dataset.x.ndim == 2 and dataset.x.shape[1] == 2:
            if metric not in ("auto", "mmd"):
                raise MetricsError(f"metric {metric!r} is not for 2-D toy data; use 'mmd' (or 'auto')")
            self.kind = "toy"
            self._setup_toy(tag)
        else:
            raise MetricsError(f"dataset {dataset.name!r}: array shape {dataset.x.shape} is neither "
                               f"images (N,C,H,W) nor 2-D points (N,2)")

    # ---- images ------------------------------------------------------------------------------

    def _setup_images(self, tag, inception_weights, extractor, epochs):
        ds = self.dataset
        held_out = getattr(ds, "reference", None)
        self._held_out = held_out is not None
        ref = np.asarray(held_out if self._held_out else self._x)
        n_real = len(ref)
        self._real_u8 = to_uint8(torch.from_numpy(ref))
        self._kid_subset = min(KID_MAX_SUBSET, self.n, n_real)
        against = (f"{self.n} generated vs {n_real} held-out real {ds.tag} images (never trained "
                   f"on)" if self._held_out else
                   f"{self.n} generated vs {n_real} real {ds.tag} images (the training set)")
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
                raise MetricsError(f"inception_weights {path!r} "
                                   f"{'is not a file' if os.path.exists(path) else 'does not exist'}"
                                   f"; expected the "
                                   f"pt_inception-2015-12-05 weights file ({INCEPTION_URL})")
            weights = _file_hash(path)
            self._fe_name = register_inception(weights, load_inception_weights(path))
            self._rgb = True
            self._batch = 64
            self.metric_name = f"fid_inception_{tag}"
            self._names = {"fid": self.metric_name, "kid": f"kid_inception_{tag}"}
            self.identity.update(extractor="inception-v3-compat", extractor_weights=weights)
            self.protocol = (
                f"torch-fidelity FID on inception-v3-compat pool3 features (weights {weights}), "
                f"{against}; KID: poly kernel, {KID_SUBSETS} subsets of {self._kid_subset}")
        else:
            if extractor not in ("auto", "shipped", "train"):
                raise MetricsError(f"eval.extractor {extractor!r} unknown; known: auto, shipped, "
                                   f"train")
            shipped = extractor == "shipped" or (extractor == "auto" and has_shipped(ds.name)
                                                 and epochs is None)
            if shipped:
                ext = load_shipped_extractor(ds)
                origin = f"shipped weights sha256 {ext['sha256'][:12]}"
            else:
                ext = load_or_train_extractor(ds, self.cache_dir, epochs, self.device)
                origin = f"trained on this machine, weights {ext['weights']}"
            weights = ext["weights"]
            self.heldout_acc = ext["heldout_acc"]
            self._fe_name = register_extractor(ds.name, weights, ext["recipe"]["arch"], ext["state_dict"])
            self._rgb, self._batch = False, 256
            self.metric_name = f"fd_{ds.tag}_{tag}"
            self._names = {"fid": self.metric_name, "kid": f"kid_{ds.tag}_{tag}"}
            self.identity.update(extractor=self._fe_name, extractor_weights=weights,
                                 heldout_acc=round(self.heldout_acc, 4),
                                 extractor_file=ext["path"])
            self.identity["extractor_origin"] = "shipped" if shipped else "trained"
            upsampled = (f", images upsampled {ds.x.shape[-1]} -> {ext['recipe']['arch']['image_size']}"
                         f" (nearest) for the classifier trained at that size"
                         if ds.x.shape[-1] < ext["recipe"]["arch"]["image_size"] else "")
            self.protocol = (
                f"torch-fidelity FD on penultimate ({FEATURE_LAYER}-d) features of harness "
                f"{ds.name} classifier ({origin}, held-out acc {self.heldout_acc:.3f}{upsampled}), "
                f"{against}; KID: poly kernel, {KID_SUBSETS} subsets of {self._kid_subset}")
        # torch-fidelity keys its cache on names only: put everything that fixes the features in it
        self._ref_cache_name = (f"{ds.name}-{ds.fingerprint}-{self._fe_name}-"
                                f"{self.identity['extractor_weights']}-f{FEATURES_VERSION}")
        self.metric_names = tuple(self._names.values())

    def _fidelity_metrics(self, u8_a, u8_b, cache_name_b, kid_subset):
        """FD and KID through torch-fidelity's feature and metric functions. Its own file cache
        (``calculate_metrics(cache=True)``) is never used: it unpickles whatever sits in the cache
        folder with ``weights_only=False``, so a planted file there would run code in every
        evaluating process. The reference features (``cache_name_b``) are kept in this process's
        memory instead, computed once per extractor and reference."""
        from torch_fidelity.metric_fid import (
            fid_featuresdict_to_statistics,
            fid_statistics_to_metric,
        )
        from torch_fidelity.metric_kid import kid_featuresdict_to_metric
        from torch_fidelity.utils import get_featuresdict_from_dataset

        tf = _fidelity()
        cuda = self.device.type == "cuda"
        pin = cuda and self.device.index is not None
        with torch.cuda.device(self.device) if pin else contextlib.nullcontext():
            fe, layer_fid, layer_kid = self._feature_extractor(cuda)  # .cuda(): the current device

            def features(u8):
                return get_featuresdict_from_dataset(_U8Images(u8, self._rgb), fe, self._batch,
                                                     cuda, True, False)

            f_a = features(u8_a)
            if cache_name_b is None:
                f_b = features(u8_b)
                stats_b = fid_featuresdict_to_statistics(f_b, layer_fid)
            else:
                key = f"{cache_name_b}@{self.device}"
                if key not in _REFERENCE:
                    f_b = features(u8_b)
                    _REFERENCE[key] = (f_b, fid_featuresdict_to_statistics(f_b, layer_fid))
                f_b, stats_b = _REFERENCE[key]
        fid = fid_statistics_to_metric(fid_featuresdict_to_statistics(f_a, layer_fid), stats_b,
                                       False)
        kid = kid_featuresdict_to_metric(f_a, f_b, layer_kid, kid_subsets=KID_SUBSETS,
                                         kid_subset_size=kid_subset, rng_seed=2020, verbose=False)
        return {self._names["fid"]: max(0.0, float(fid[tf.KEY_METRIC_FID])),
                self._names["kid"]: float(kid[tf.KEY_METRIC_KID_MEAN])}

    def _feature_extractor(self, cuda: bool):
        """(torch-fidelity extractor, FID layer, KID layer), built once per Evaluator."""
        if self._fe is None:
            from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
            from torch_fidelity.utils import create_feature_extractor

            cls = FEATURE_EXTRACTORS_REGISTRY[self._fe_name]
            layers = (cls.get_default_feature_layer_for_metric("fid"),
                      cls.get_default_feature_layer_for_metric("kid"))
            self._fe = (create_feature_extractor(self._fe_name, sorted(set(layers)), cuda=cuda,
                                                 verbose=False), *layers)
        return self._fe

    # ---- toy2d -------------------------------------------------------------------------------

    def _setup_toy(self, tag):

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

    def floor_protocol(self) -> str:
        """In words, what :meth:`real_vs_real` computes (true to the numbers)."""
        n_train = len(self._x)
        if self.kind != "toy" and self._held_out:
            drawn = (f"drawn with replacement: the training split has only {n_train}, fewer "
                     f"than n" if self.n > n_train else "drawn without replacement")
            return (f"data floor: {self.n} real training images ({drawn}) scored exactly as "
                    f"generated samples")
        h = min(self.n, n_train // 2)
        return (f"data floor: two disjoint halves of {h} real images each"
                + (f" (fewer than n = {self.n}: the dataset is too small for this protocol; "
                   f"a lower bound on other terms)" if h < self.n else ""))

    def real_vs_real(self) -> dict[str, float]:
        """The data floor under the metric's names: real images in place of generated ones.

        With a held-out reference: ``n`` training images (seeded by the fingerprint) against the
        same reference and KID subsets as generated samples. Otherwise two disjoint halves of
        ``min(n, N//2)`` images each (see :meth:`floor_protocol`)."""
        if self._floor is None:
            n_train = len(self._x)
            rng = np.random.default_rng(_fingerprint_seed(self.dataset.fingerprint, 1))
            if self.kind != "toy" and self._held_out:
                idx = np.sort(rng.choice(n_train, self.n, replace=self.n > n_train))
                real = to_uint8(torch.from_numpy(self._x[idx]))
                self._floor = self._fidelity_metrics(real, self._real_u8, self._ref_cache_name,
                                                     self._kid_subset)
                return dict(self._floor)
            h = min(self.n, n_train // 2)
            perm = rng.permutation(n_train)
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
