"""U-Nets for dense prediction (--task segment | regress), in 2D and 3D: the local networks of
the subdomains and the global baseline. No MPI.

    x -> normalize -> [enc 0] -pool-> [enc 1] -pool-> ... [bottleneck] (+ correction)
                          |skip         |skip                  |
      out <- head <- [dec 0] <-up- [dec 1] <-up- ... ----------+

Every level is `convs_per_level` x (conv3x3 + BatchNorm + ReLU) with width * 2**level channels
(scaled by the width factor); `depth` levels pool by 2 while every axis of the map is even and
at least 2 (a level that cannot pool keeps the size: small subimages lose depth, not shape), and
the decoder upsamples with a stride-2 transposed convolution, so the output has the input's
spatial shape exactly. The head is a 1x1 convolution to `out_channels` (class scores for masks,
values for fields). With `crop` (slices of the spatial axes) the output is cut to that part of
the input: a subdomain's network sees its box with the overlap and predicts its tile.

The bottleneck is where the subdomains meet in the two-level and coherent methods: `encode`
returns it, `decode(bottleneck, skips, correction)` adds a correction of the bottleneck's shape
before decoding (the coarse network's answer; zero or None for a local-only net). As for the
classifiers, the parameter count does not depend on the input size, so a local U-Net gets about
1/N of the global one's parameters through its width alone (matching_width_factor).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .models import count_parameters, input_normalization, scaled, width_factor_for


@dataclass
class UNetConfig:
    width: int = 16           # channels of the first level; level l has width * 2**l
    depth: int = 2            # pooling levels (the bottleneck is level `depth`)
    convs_per_level: int = 2  # conv3x3 + BatchNorm + ReLU per level
    batchnorm: bool = True
    input_mean: tuple = ()    # per-channel input normalisation, as CNNConfig's
    input_std: tuple = ()


def _block(conv, bn, cin, cout, n, batchnorm):
    layers = []
    for k in range(n):
        layers += [conv(cin if k == 0 else cout, cout, 3, padding=1, bias=not batchnorm)]
        layers += [bn(cout)] if batchnorm else []
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def pooled_levels(input_shape, depth: int) -> tuple[list, list]:
    """([whether level l halves the map, for l < depth], the bottleneck's spatial sizes): a level
    pools where every axis of its map is even and at least 2."""
    sizes, pooled = list(input_shape), []
    for _ in range(depth):
        can = all(s % 2 == 0 and s >= 2 for s in sizes)
        pooled.append(can)
        sizes = [s // 2 for s in sizes] if can else sizes
    return pooled, sizes


class UNet(nn.Module):
    """U-Net of `cfg` from in_channels to out_channels on inputs of spatial shape `input_shape`
    (2 or 3 axes); see the module docstring."""

    def __init__(self, in_channels: int, out_channels: int, input_shape, cfg: UNetConfig,
                 width_factor: float = 1.0, crop=None):
        super().__init__()
        self.crop = None if crop is None else (slice(None), slice(None), *crop)
        ndim = len(input_shape)
        if ndim not in (2, 3):
            raise ValueError(f"a U-Net needs 2 or 3 spatial axes, not {ndim}")
        conv = nn.Conv2d if ndim == 2 else nn.Conv3d
        bn = nn.BatchNorm2d if ndim == 2 else nn.BatchNorm3d
        up = nn.ConvTranspose2d if ndim == 2 else nn.ConvTranspose3d
        pool = nn.MaxPool2d if ndim == 2 else nn.MaxPool3d
        self.normalize = input_normalization(cfg, in_channels, ndim)
        widths = [scaled(cfg.width * 2 ** level, width_factor) for level in range(cfg.depth + 1)]
        self.pooled, sizes = pooled_levels(input_shape, cfg.depth)
        self.bottleneck_shape = (widths[-1], *sizes)
        self.encoders = nn.ModuleList(_block(conv, bn, in_channels if lvl == 0 else widths[lvl - 1], widths[lvl],
                                             cfg.convs_per_level, cfg.batchnorm) for lvl in range(cfg.depth))
        self.pool = pool(2)
        self.middle = _block(conv, bn, widths[-2] if cfg.depth else in_channels, widths[-1], cfg.convs_per_level,
                             cfg.batchnorm)
        self.ups = nn.ModuleList(
            up(widths[lvl + 1], widths[lvl], 2, stride=2) if self.pooled[lvl] else conv(widths[lvl + 1], widths[lvl], 1)
            for lvl in range(cfg.depth))
        self.decoders = nn.ModuleList(_block(conv, bn, 2 * widths[lvl], widths[lvl], cfg.convs_per_level,
                                             cfg.batchnorm) for lvl in range(cfg.depth))
        self.head = conv(widths[0], out_channels, 1)

    def encode(self, x):
        """(bottleneck (B, *bottleneck_shape), skips): the encoder's half."""
        x = self.normalize(x)
        skips = []
        for enc, pooled in zip(self.encoders, self.pooled):
            x = enc(x)
            skips.append(x)
            x = self.pool(x) if pooled else x
        return self.middle(x), skips

    def decode(self, bottleneck, skips, correction=None):
        """The output (B, out_channels, *input_shape) from the bottleneck, plus `correction`
        (the coarse network's, of the bottleneck's shape) where given."""
        x = bottleneck if correction is None else bottleneck + correction
        for lvl in reversed(range(len(self.decoders))):
            x = self.decoders[lvl](torch.cat([self.ups[lvl](x), skips[lvl]], 1))
        return self.head(x) if self.crop is None else self.head(x)[self.crop]

    def forward(self, x, correction=None):
        return self.decode(*self.encode(x), correction)


def build_unet(in_channels, out_channels, input_shape, cfg: UNetConfig, width_factor=1.0, crop=None) -> UNet:
    return UNet(in_channels, out_channels, tuple(input_shape), cfg, width_factor, crop)


def matching_width_factor(in_channels, out_channels, image_shape, subimage_shape, num_subdomains,
                          cfg: UNetConfig) -> float:
    """Width factor that gives a local U-Net about 1/N of the global U-Net's parameters."""
    target = count_parameters(build_unet(in_channels, out_channels, image_shape, cfg)) / num_subdomains
    return width_factor_for(lambda f: build_unet(in_channels, out_channels, subimage_shape, cfg, f), target)


class CoarseCorrection(nn.Module):
    """The coarse network of the dense two-level method: every subdomain's bottleneck in, a
    correction of every bottleneck out, both flat (B, N*F) in subdomain order (F = C*h*w of
    one bottleneck, as the exchange carries them).

    The N bottlenecks are laid out as one coarse map in their grid positions (B, C, g0*h,
    g1*w[, ...]), which `layers` 3x3 convolutions of `hidden` channels (ReLU between) map to a
    correction map of C channels, cut back into the N subdomains. Its last convolution starts at
    zero, so before training the two-level model is the local-only one."""

    def __init__(self, grid, bottleneck_shape, hidden: int = 32, layers: int = 3):
        super().__init__()
        self.grid, self.bottleneck_shape = tuple(grid), tuple(bottleneck_shape)
        ndim = len(self.grid)
        conv = nn.Conv2d if ndim == 2 else nn.Conv3d
        channels = self.bottleneck_shape[0]
        widths = [channels] + [hidden] * (layers - 1) + [channels]
        body = []
        for k in range(layers):
            body.append(conv(widths[k], widths[k + 1], 3, padding=1))
            if k < layers - 1:
                body.append(nn.ReLU(inplace=True))
        nn.init.zeros_(body[-1].weight)
        nn.init.zeros_(body[-1].bias)
        self.body = nn.Sequential(*body)

    def to_map(self, flat):
        """(B, N*F) -> (B, C, g0*h0, g1*h1, ...): subdomain i at its grid coordinates (C order)."""
        B, (C, *h), g = flat.shape[0], self.bottleneck_shape, self.grid
        x = flat.reshape(B, *g, C, *h)
        d = len(g)
        # (B, g0, g1, C, h0, h1) -> (B, C, g0, h0, g1, h1)
        x = x.permute(0, d + 1, *[a for k in range(d) for a in (1 + k, d + 2 + k)])
        return x.reshape(B, C, *[gk * hk for gk, hk in zip(g, h)])

    def from_map(self, coarse):
        """The inverse of to_map."""
        B, (C, *h), g = coarse.shape[0], self.bottleneck_shape, self.grid
        d = len(g)
        x = coarse.reshape(B, C, *[v for k in range(d) for v in (g[k], h[k])])
        # (B, C, g0, h0, g1, h1) -> (B, g0, g1, C, h0, h1)
        x = x.permute(0, *[2 + 2 * k for k in range(d)], 1, *[3 + 2 * k for k in range(d)])
        return x.reshape(B, -1)

    def forward(self, flat):
        return self.from_map(self.body(self.to_map(flat)))
