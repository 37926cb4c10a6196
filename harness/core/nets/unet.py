"""A compact DDPM++-style UNet (Song et al. 2021 as used by EDM) with named parameter groups.

Top-level children are exactly the parameter groups the init schemes act on, so a parameter's
group is the first component of its name: ``input`` (stem conv), ``encoder`` (down blocks),
``middle``, ``decoder`` (up blocks), ``output`` (final norm and conv), ``embedding``
(noise-level MLP).
The ratio network reuses the encoder half (``EncoderClassifier``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class UNetSize:
    channels: int  # base width
    mult: tuple  # width multiplier per resolution level
    blocks: int  # residual blocks per level
    attn_levels: tuple  # levels (0 = full resolution) with self-attention
    dropout: float = 0.0


SIZES = {
    # 8x8 digits on 2 CPU cores: 0.65M parameters; attention only in the middle (4x4)
    "unet-xs": UNetSize(32, (1, 2), 1, ()),
    # 32x32 mnist on CPU / small GPU studies
    "unet-s": UNetSize(64, (1, 2, 2), 2, (2,)),
    "unet-m": UNetSize(96, (1, 2, 2), 2, (2,)),
    # EDM's DDPM++ CIFAR-10 shape (128 ch, mult 2-2-2, 4 blocks, attention at 16x16): ~56M
    "unet-edm": UNetSize(128, (2, 2, 2), 4, (1,), 0.13),
}


def positional_embedding(c_noise: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of the noise conditioning (parameter-free)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=c_noise.device) / half)
    ang = 1000 * c_noise.float()[:, None] * freqs[None]  # c_noise = ln(s)/4 is O(1)
    return torch.cat([ang.cos(), ang.sin()], 1)


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, ch // 4), ch, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, attn: bool, dropout: float):
        super().__init__()
        self.norm0, self.conv0 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.affine = nn.Linear(emb_dim, cout)
        self.norm1, self.conv1 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.dropout = dropout
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else None
        self.attn = attn
        if attn:
            self.norm2, self.qkv = _norm(cout), nn.Conv2d(cout, 3 * cout, 1)
            self.proj = nn.Conv2d(cout, cout, 1)
        with torch.no_grad():  # residual branches start near identity (EDM: init_weight 1e-5)
            self.conv1.weight.mul_(1e-5)
            if attn:
                self.proj.weight.mul_(1e-5)

    def forward(self, x, emb):
        h = self.conv0(F.silu(self.norm0(x)))
        h = h + self.affine(emb)[:, :, None, None]
        h = F.dropout(F.silu(self.norm1(h)), self.dropout, self.training)
        x = (self.conv1(h) + (x if self.skip is None else self.skip(x))) / math.sqrt(2)
        if self.attn:
            n, c, hh, ww = x.shape
            heads = max(1, c // 64)
            q, k, v = self.qkv(self.norm2(x)).reshape(n, 3, heads, c // heads, hh * ww).unbind(1)
            a = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2),
                                               v.transpose(-1, -2))
            x = (x + self.proj(a.transpose(-1, -2).reshape(n, c, hh, ww))) / math.sqrt(2)
        return x


class Down(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x, emb):
        return self.conv(x)


class Up(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, emb):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def _encoder_parts(in_ch: int, size: UNetSize):
    """input, embedding, encoder, middle, and the channel count of every skip."""
    ch = size.channels
    emb_dim = 4 * ch
    embedding = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
    stem = nn.Conv2d(in_ch, ch, 3, padding=1)
    encoder, skips, cur = nn.ModuleList(), [ch], ch
    for level, m in enumerate(size.mult):
        for _ in range(size.blocks):
            encoder.append(ResBlock(cur, ch * m, emb_dim, level in size.attn_levels, size.dropout))
            cur = ch * m
            skips.append(cur)
        if level < len(size.mult) - 1:
            encoder.append(Down(cur))
            skips.append(cur)
    middle = nn.ModuleList([ResBlock(cur, cur, emb_dim, True, size.dropout),
                            ResBlock(cur, cur, emb_dim, False, size.dropout)])
    return stem, embedding, encoder, middle, skips, cur


class UNet(nn.Module):
    """``F(x_in, c_noise)``: the raw network inside the EDM preconditioning."""

    def __init__(self, in_ch: int, size: UNetSize):
        super().__init__()
        self.size = size
        self.input, self.embedding, self.encoder, self.middle, skips, cur = _encoder_parts(in_ch, size)
        ch, emb_dim = size.channels, 4 * size.channels
        self.decoder = nn.ModuleList()
        for level in reversed(range(len(size.mult))):
            m = size.mult[level]
            for _ in range(size.blocks + 1):
                self.decoder.append(ResBlock(cur + skips.pop(), ch * m, emb_dim,
                                             level in size.attn_levels, size.dropout))
                cur = ch * m
            if level > 0:
                self.decoder.append(Up(cur))
        self.output = nn.Sequential(_norm(cur), nn.SiLU(), nn.Conv2d(cur, in_ch, 3, padding=1))
        with torch.no_grad():
            self.output[2].weight.mul_(1e-5)

    def encode(self, x, c_noise):
        emb = self.embedding(positional_embedding(c_noise, self.size.channels))
        h = self.input(x)
        skips = [h]
        for block in self.encoder:
            h = block(h, emb)
            skips.append(h)
        for block in self.middle:
            h = block(h, emb)
        return h, skips, emb

    def forward(self, x, c_noise):
        h, skips, emb = self.encode(x, c_noise)
        for block in self.decoder:
            if isinstance(block, ResBlock):
                h = torch.cat([h, skips.pop()], 1)
            h = block(h, emb)
        return self.output(h)


class EncoderClassifier(nn.Module):
    """Ratio network: the UNet's encoder half + global average pool + linear head -> one logit."""

    def __init__(self, in_ch: int, size: UNetSize):
        super().__init__()
        self.size = size
        self.input, self.embedding, self.encoder, self.middle, _, cur = _encoder_parts(in_ch, size)
        self.head = nn.Sequential(_norm(cur), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(cur, 1))

    encode = UNet.encode

    def forward(self, x, c_noise):
        h, _, _ = self.encode(x, c_noise)
        return self.head(h).squeeze(1)
