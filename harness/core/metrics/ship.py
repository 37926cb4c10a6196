"""Train the extractors shipped inside the package: ``python -m harness.core.metrics.ship [NAME ...]``.

Writes ``harness/core/metrics/weights/<name>.pt`` for each embedded image dataset (default: all of
``extractor.SHIPPED``) with the fixed recipe of ``extractor.train_domain_classifier`` on the
dataset's training split, and prints the sha256 to record in ``extractor.SHIPPED``. Rerunning it
on another machine may give other weights (float rounding in training): that is why the weights
are shipped and verified by hash instead of retrained wherever the harness runs.
"""
from __future__ import annotations

import sys

import torch

from harness.core.data import load
from harness.core.metrics.extractor import SHIPPED, ship_extractor


def main(argv=None) -> int:
    names = (argv if argv is not None else sys.argv[1:]) or list(SHIPPED)
    torch.set_num_threads(1)
    for name in names:
        path, sha, acc = ship_extractor(load(name))
        print(f"{name}: {path} held-out accuracy {acc:.4f}\n    {name!r}: {sha!r},")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
