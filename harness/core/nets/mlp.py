"""A residual MLP for toy 2-D data with the same named parameter groups as the UNet."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from harness.core.nets.unet import positional_embedding


class MLPBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm, self.fc0 = nn.LayerNorm(width), nn.Linear(width, width)
        self.affine, self.fc1 = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, h, emb):
        r = self.fc0(F.silu(self.norm(h))) + self.affine(emb)
        return h + self.fc1(F.silu(r))


class MLP(nn.Module):
    """``F(x_in, c_noise)`` for (N, 2) inputs."""

    def __init__(self, dim: int = 2, width: int = 128, depth: int = 2):
        super().__init__()
        self.width = width
        self.embedding = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.input = nn.Linear(dim, width)
        self.encoder = nn.ModuleList(MLPBlock(width) for _ in range(depth))
        self.middle = nn.ModuleList([MLPBlock(width)])
        self.decoder = nn.ModuleList(MLPBlock(width) for _ in range(depth))
        self.output = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, dim))

    def encode(self, x, c_noise):
        emb = self.embedding(positional_embedding(c_noise, self.width))
        h = self.input(x)
        for block in list(self.encoder) + list(self.middle):
            h = block(h, emb)
        return h, emb

    def forward(self, x, c_noise):
        h, emb = self.encode(x, c_noise)
        for block in self.decoder:
            h = block(h, emb)
        return self.output(h)


class MLPClassifier(nn.Module):
    """Ratio network for toy data: the MLP's encoder half + a linear head -> one logit."""

    def __init__(self, dim: int = 2, width: int = 128, depth: int = 2):
        super().__init__()
        full = MLP(dim, width, depth)
        self.width = width
        self.embedding, self.input, self.encoder, self.middle = (
            full.embedding, full.input, full.encoder, full.middle)
        self.head = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, 1))

    encode = MLP.encode

    def forward(self, x, c_noise):
        h, _ = self.encode(x, c_noise)
        return self.head(h).squeeze(1)

