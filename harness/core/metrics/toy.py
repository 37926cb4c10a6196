"""toy2d metrics: RBF-kernel MMD^2 sums, sliced Wasserstein-1, ring-mode coverage."""
from __future__ import annotations

import numpy as np
import torch

TOY_DIRECTIONS = 128
TOY_MODE_RADIUS = 0.3
TOY_MODE_MIN_FRACTION = 0.01
TOY_BANDWIDTH_FACTORS = (0.1, 0.3, 1.0)


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
