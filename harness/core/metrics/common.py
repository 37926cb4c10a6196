"""Shared by the metrics modules: the error type, metric-name and uint8 conventions, seeds."""
from __future__ import annotations

import torch


class MetricsError(ValueError):
    """A metric that cannot be set up: the message says what is missing and how to fix it."""


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


def _fingerprint_seed(fingerprint: str, salt: int = 0) -> int:
    return (int(fingerprint[:8], 16) + salt) % (2 ** 31)
