"""Sample-quality metrics, named with their protocol so proxies never mix with the real thing.

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

from harness.core.metrics import extractor as _extractor
from harness.core.metrics.common import MetricsError, n_tag, to_uint8
from harness.core.metrics.evaluator import FEATURES_VERSION, KID_MAX_SUBSET, KID_SUBSETS, Evaluator
from harness.core.metrics.extractor import (
    FEATURE_LAYER, INCEPTION_URL, DomainNet, default_epochs, load_or_train_extractor,
    state_dict_hash, train_domain_classifier)
from harness.core.metrics.fidelity import register_extractor
from harness.core.metrics.toy import (
    TOY_BANDWIDTH_FACTORS, TOY_DIRECTIONS, TOY_MODE_MIN_FRACTION, TOY_MODE_RADIUS)

__all__ = [
    "Evaluator", "MetricsError", "n_tag", "to_uint8",
    "DomainNet", "default_epochs", "train_domain_classifier", "load_or_train_extractor",
    "register_extractor", "state_dict_hash",
    "INCEPTION_URL", "FEATURES_VERSION", "FEATURE_LAYER", "KID_SUBSETS", "KID_MAX_SUBSET",
    "TOY_DIRECTIONS", "TOY_MODE_RADIUS", "TOY_MODE_MIN_FRACTION", "TOY_BANDWIDTH_FACTORS",
]


def __getattr__(name: str):
    # TRAIN_COUNT is incremented in .extractor; read it live there (a plain re-export would be a
    # stale copy): how many domain classifiers this process trained (tests check cache reuse).
    if name == "TRAIN_COUNT":
        return _extractor.TRAIN_COUNT
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
