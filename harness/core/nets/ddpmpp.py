"""EDM's DDPM++ network, exactly: NVIDIA's published CIFAR-10 teachers load into it by name.

``DDPMpp`` reproduces the parameter names, shapes, initialization and forward pass of EDM's
``SongUNet`` (Karras et al. 2022, NVlabs/edm ``training/networks.py``) as EDM's
``train.py --arch=ddpmpp`` builds it: positional noise embedding, standard encoder and decoder,
``channel_mult_noise`` 1, resample filter [1, 1], one attention head, skip scale sqrt(1/2),
GroupNorm eps 1e-6, EDM's xavier-uniform init with 1e-5 on the last conv of every residual
branch and on the output conv. It was written from the paper and EDM's architecture description
(EDM's code is CC BY-NC-SA; none of it is copied here) and checked against it: outputs agree to
float64 rounding at every noise level for the unconditional and the class-conditional variant.

Parameter names are EDM's, so an ``EDMPrecond`` state dict with its ``model.`` prefix stripped
loads with ``load_state_dict(strict=True)``:

- ``map_noise`` (parameter-free), ``map_label`` (class-conditional), ``map_augment`` (EDM's
  augmentation labels; unused at inference), ``map_layer0``, ``map_layer1``: the embedding;
- ``enc.{R}x{R}_conv`` (the stem), ``enc.{r}x{r}_down``, ``enc.{r}x{r}_block{i}``: the encoder;
- ``dec.{r}x{r}_in0`` / ``_in1`` (the lowest resolution's two blocks, attention in ``in0``):
  the middle; ``dec.{r}x{r}_up``, ``dec.{r}x{r}_block{i}``: the decoder;
- ``dec.{R}x{R}_aux_norm``, ``dec.{R}x{R}_aux_conv``: the output (final norm and conv).

``harness.core.nets.group_of`` maps these names to the named groups (``input``,
``encoder``, ``middle``, ``decoder``, ``output``, ``embedding``) the init schemes act on.
``DDPMppEncoder`` is the ratio network: the same embedding, encoder and middle blocks under the
same names (so teacher weights copy into it by name), then norm, global average pool and a
linear head giving one logit.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# EDM's train.py --arch=ddpmpp on CIFAR-10 (dropout 0.13 is train.py's default); the harness
# trains no augmentation pipe, so its own ddpmpp has no ``map_augment`` (EDM's pickles do:
# augment_dim 9, an input that is zero at inference).
CIFAR10 = {"model_channels": 128, "channel_mult": (2, 2, 2), "channel_mult_emb": 4,
           "num_blocks": 4, "attn_resolutions": (16,), "dropout": 0.13}

SKIP_SCALE = math.sqrt(0.5)


def _groupnorm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels // 4), channels, eps=1e-6)


def _linear(cin: int, cout: int, bias: bool = True) -> nn.Linear:
    layer = nn.Linear(cin, cout, bias=bias)
    with torch.no_grad():
        nn.init.xavier_uniform_(layer.weight)
        if bias:
            layer.bias.zero_()
    return layer


def _layout(x: torch.Tensor) -> torch.memory_format:
    nhwc = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if nhwc else torch.contiguous_format


class Conv(nn.Module):
    """A k x k convolution (padding k // 2), optionally preceded by 2x up- or downsampling
    with the separable ``resample_filter`` (kept as a buffer, as EDM does).

    Up: a stride-2 transposed depthwise convolution with the filter (times 4), i.e. nearest
    neighbour for [1, 1]; down: a stride-2 depthwise convolution with it (2x2 mean for [1, 1]).
    """

    def __init__(self, cin: int, cout: int, kernel: int, up: bool = False, down: bool = False,
                 resample_filter=(1, 1), gain: float = 1.0):
        super().__init__()
        self.up, self.down = up, down
        self.weight = nn.Parameter(torch.empty(cout, cin, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(cout))
        with torch.no_grad():
            nn.init.xavier_uniform_(self.weight)
            self.weight.mul_(gain)
        if up or down:
            f = torch.as_tensor(resample_filter, dtype=torch.float32)
            f = (f[:, None] * f[None])[None, None] / f.sum() ** 2
            self.register_buffer("resample_filter", f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.up or self.down:
            f = self.resample_filter.to(x.dtype)
            pad = (f.shape[-1] - 1) // 2
            ch = x.shape[1]
            if self.up:
                x = F.conv_transpose2d(x, (f * 4).tile(ch, 1, 1, 1), groups=ch, stride=2,
                                       padding=pad)
            else:
                x = F.conv2d(x, f.tile(ch, 1, 1, 1), groups=ch, stride=2, padding=pad)
        w = self.weight.to(x.dtype)
        return F.conv2d(x, w, self.bias.to(x.dtype), padding=w.shape[-1] // 2)


class Block(nn.Module):
    """DDPM++ residual block: norm, SiLU, conv (with resampling), + embedding (additive), norm,
    SiLU, dropout, conv; skip (1x1 conv when the width or the resolution changes); sum times
    sqrt(1/2); then optional single-head self-attention, again with sqrt(1/2)."""

    def __init__(self, cin: int, cout: int, emb_ch: int, up: bool = False, down: bool = False,
                 attention: bool = False, dropout: float = 0.0, resample_filter=(1, 1),
                 takes_skip: bool = False):
        super().__init__()
        self.in_channels, self.out_channels = cin, cout
        self.dropout = dropout
        self.takes_skip = takes_skip  # decoder blocks concatenate an encoder activation first
        self.norm0 = _groupnorm(cin)
        self.conv0 = Conv(cin, cout, 3, up, down, resample_filter)
        self.affine = _linear(emb_ch, cout)
        self.norm1 = _groupnorm(cout)
        self.conv1 = Conv(cout, cout, 3, gain=1e-5)
        self.skip = (Conv(cin, cout, 1, up, down, resample_filter)
                     if cin != cout or up or down else None)
        self.attention = attention
        if attention:
            self.norm2 = _groupnorm(cout)
            self.qkv = Conv(cout, 3 * cout, 1, gain=math.sqrt(0.2))
            self.proj = Conv(cout, cout, 1, gain=1e-5)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        h = F.silu(self.norm1(h + self.affine(emb)[:, :, None, None].to(h.dtype)))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        x = (h + (x if self.skip is None else self.skip(x))) * SKIP_SCALE
        if self.attention:
            n, c, hh, ww = x.shape
            # qkv channels are interleaved as (channel, [q, k, v]), as in EDM's layout
            q, k, v = self.qkv(self.norm2(x)).reshape(n, c, 3, hh * ww).unbind(2)
            a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                               v.transpose(1, 2))
            a = a.transpose(1, 2).reshape(n, c, hh, ww)  # a strided (NHWC-like) view: give it
            a = a.contiguous(memory_format=_layout(x))   # x's layout, or it spreads downstream
            x = (self.proj(a) + x) * SKIP_SCALE
        return x


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of ``c_noise`` itself (no x1000), frequencies (1/10000)^(i/(C/2-1)),
    i = 0..C/2-1, computed in float32; output ``[sin, cos]`` (EDM computes [cos, sin] and swaps)."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        half = self.channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=c_noise.device) / (half - 1)
        freqs = (1 / 10000) ** freqs
        ang = c_noise[:, None] * freqs.to(c_noise.dtype)[None]
        return torch.cat([ang.sin(), ang.cos()], dim=1)


class _SongBody(nn.Module):
    """Embedding, encoder and the lowest-resolution (middle) blocks; the decoder if asked."""

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int,
                 label_dim: int = 0, augment_dim: int = 0, model_channels: int = 128,
                 channel_mult=(2, 2, 2), channel_mult_emb: int = 4, num_blocks: int = 4,
                 attn_resolutions=(16,), dropout: float = 0.13, label_dropout: float = 0.0,
                 resample_filter=(1, 1), decoder: bool = True):
        super().__init__()
        self.img_resolution, self.in_channels = img_resolution, in_channels
        self.out_channels, self.label_dim = out_channels, label_dim
        self.label_dropout = label_dropout
        emb_ch, noise_ch = model_channels * channel_mult_emb, model_channels
        kw = {"emb_ch": emb_ch, "dropout": dropout, "resample_filter": tuple(resample_filter)}

        self.map_noise = PositionalEmbedding(noise_ch)
        self.map_label = _linear(label_dim, noise_ch) if label_dim else None
        self.map_augment = _linear(augment_dim, noise_ch, bias=False) if augment_dim else None
        self.map_layer0 = _linear(noise_ch, emb_ch)
        self.map_layer1 = _linear(emb_ch, emb_ch)

        self.enc = nn.ModuleDict()
        widths = []  # output width of every encoder entry: the decoder's skips
        cur = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv(cur, model_channels, 3)
                cur = model_channels
            else:
                self.enc[f"{res}x{res}_down"] = Block(cur, cur, down=True, **kw)
            widths.append(cur)
            for i in range(num_blocks):
                self.enc[f"{res}x{res}_block{i}"] = Block(
                    cur, model_channels * mult, attention=res in attn_resolutions, **kw)
                cur = model_channels * mult
                widths.append(cur)

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = Block(cur, cur, attention=True, **kw)
                self.dec[f"{res}x{res}_in1"] = Block(cur, cur, **kw)
                if not decoder:
                    break
            else:
                self.dec[f"{res}x{res}_up"] = Block(cur, cur, up=True, **kw)
            for i in range(num_blocks + 1):
                self.dec[f"{res}x{res}_block{i}"] = Block(
                    cur + widths.pop(), model_channels * mult,
                    attention=i == num_blocks and res in attn_resolutions, takes_skip=True, **kw)
                cur = model_channels * mult
            if level == 0:
                self.dec[f"{res}x{res}_aux_norm"] = _groupnorm(cur)
                self.dec[f"{res}x{res}_aux_conv"] = Conv(cur, out_channels, 3, gain=1e-5)
        self.width = cur  # channels after the last block built

    def embed(self, c_noise, class_labels=None, augment_labels=None) -> torch.Tensor:
        emb = self.map_noise(c_noise.reshape(-1))
        if self.map_label is not None:
            labels = (torch.zeros(1, self.label_dim, device=emb.device, dtype=emb.dtype)
                      if class_labels is None
                      else class_labels.to(emb.dtype).reshape(-1, self.label_dim))
            if self.training and self.label_dropout:
                keep = torch.rand(emb.shape[0], 1, device=emb.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels * math.sqrt(self.label_dim))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        return F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

    def encode(self, x, emb) -> list[torch.Tensor]:
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, Block) else block(x)
            skips.append(x)
        return skips


class DDPMpp(_SongBody):
    """``F(x_in, c_noise, class_labels=None)``: EDM's SongUNet (DDPM++), the raw network inside
    the EDM preconditioning. A class-conditional network given no labels uses the all-zero label
    vector, as EDM's ``EDMPrecond`` does."""

    def __init__(self, img_resolution: int = 32, in_channels: int = 3, out_channels: int = 3,
                 **kwargs):
        super().__init__(img_resolution, in_channels, out_channels, decoder=True, **kwargs)

    def forward(self, x_in, c_noise, class_labels=None, augment_labels=None) -> torch.Tensor:
        emb = self.embed(c_noise, class_labels, augment_labels)
        skips = self.encode(x_in, emb)
        x, out, tmp = skips[-1], None, None
        for name, block in self.dec.items():
            if isinstance(block, nn.GroupNorm):  # aux_norm
                tmp = F.silu(block(x))
            elif not isinstance(block, Block):  # aux_conv
                out = block(tmp)
            else:
                if block.takes_skip:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return out


class DDPMppEncoder(_SongBody):
    """Ratio network: DDPM++'s embedding, encoder and middle blocks (EDM's names) + GroupNorm,
    SiLU, global average pool and a linear head -> one logit per sample."""

    def __init__(self, img_resolution: int = 32, in_channels: int = 3, **kwargs):
        super().__init__(img_resolution, in_channels, in_channels, decoder=False, **kwargs)
        self.head = nn.Sequential(_groupnorm(self.width), nn.SiLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten(), nn.Linear(self.width, 1))

    def forward(self, x_in, c_noise, class_labels=None, augment_labels=None) -> torch.Tensor:
        emb = self.embed(c_noise, class_labels, augment_labels)
        x = self.encode(x_in, emb)[-1]
        for block in self.dec.values():
            x = block(x, emb)
        return self.head(x).squeeze(1)
