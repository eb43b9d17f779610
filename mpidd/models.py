"""Model families: VGG-type CNNs (2D and 3D, configurable depth and width) and the coarse DNN.

The CNN head pools adaptively to a fixed `head_pool`^d grid before its dense layers, so the
parameter count does not depend on the input size: a local CNN on a subimage and the global
CNN on the whole image differ only through their width, and the width factor that makes a
local model "proportionally smaller" (about 1/N of the global parameters) is close to
1/sqrt(N). `local_width_factor` finds it numerically for any configuration.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class CNNConfig:
    width: int = 48            # channels of the first block; block b has width * 2**b
    depth: int = 2             # number of blocks (each ends in a 2x max-pool while size allows)
    convs_per_block: int = 2   # 3x3 convolution + BatchNorm + ReLU layers per block
    hidden: int = 128          # dense layer before the classifier (scaled by the width factor)
    head_pool: int = 3         # adaptive average pool to head_pool^d before the dense layers
    dropout: float = 0.0
    batchnorm: bool = True     # BatchNorm after every convolution


def _layers(ndim):
    if ndim == 2:
        return nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d
    if ndim == 3:
        return nn.Conv3d, nn.BatchNorm3d, nn.MaxPool3d, nn.AdaptiveAvgPool3d
    raise ValueError(f"images with {ndim} spatial axes are not supported (2 or 3)")


def scaled(n: int, factor: float) -> int:
    return max(1, int(round(n * factor)))


class VGG(nn.Module):
    """VGG-type CNN: [conv3x3-BN-ReLU] x convs_per_block, max-pool, repeated `depth` times,
    then adaptive average pool, dense hidden layer, dropout, linear classifier (logits)."""

    def __init__(self, in_channels: int, num_classes: int, input_shape, cfg: CNNConfig,
                 width_factor: float = 1.0):
        super().__init__()
        ndim = len(input_shape)
        conv, bn, pool, adaptive = _layers(ndim)
        layers, channels, sizes = [], in_channels, list(input_shape)
        for b in range(cfg.depth):
            out = scaled(cfg.width * 2 ** b, width_factor)
            for _ in range(cfg.convs_per_block):
                if cfg.batchnorm:
                    layers += [conv(channels, out, 3, padding=1, bias=False), bn(out)]
                else:
                    layers += [conv(channels, out, 3, padding=1)]
                layers.append(nn.ReLU(inplace=True))
                channels = out
            if min(sizes) >= 2:  # pool while the feature map is still at least 2 pixels wide
                layers.append(pool(2))
                sizes = [s // 2 for s in sizes]
        self.features = nn.Sequential(*layers)
        head = min(cfg.head_pool, max(min(sizes), 1))
        hidden = scaled(cfg.hidden, width_factor)
        # the adaptive pool is an identity on maps already head x head (skip its cost)
        self.head = nn.Sequential(
            nn.Identity() if all(s == head for s in sizes) else adaptive(head), nn.Flatten(),
            nn.Linear(channels * head ** ndim, hidden), nn.ReLU(inplace=True),
            nn.Dropout(cfg.dropout), nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


def build_cnn(in_channels, num_classes, input_shape, cfg: CNNConfig, width_factor=1.0) -> VGG:
    return VGG(in_channels, num_classes, tuple(input_shape), cfg, width_factor)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def local_width_factor(in_channels, num_classes, image_shape, subimage_shape, num_subdomains,
                       cfg: CNNConfig) -> float:
    """Width factor that gives a local CNN about 1/N of the global CNN's parameters (bisection)."""
    target = count_parameters(build_cnn(in_channels, num_classes, image_shape, cfg)) / num_subdomains
    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        n = count_parameters(build_cnn(in_channels, num_classes, subimage_shape, cfg, mid))
        lo, hi = (mid, hi) if n < target else (lo, mid)
    return round(hi, 4)


class CoarseDNN(nn.Module):
    """The coarse network of the two-level method: N*K local probabilities -> K class logits."""

    def __init__(self, in_features: int, num_classes: int, hidden=(64, 64), dropout: float = 0.0):
        super().__init__()
        layers, width = [], in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)
