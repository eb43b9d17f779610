"""The width decomposition's pure part (Gu, Zhang, Liu & Cai, ETNA 56, 2022): the thin sub-networks
and their recomposition into the global CNN (recompose_weights). No MPI; mpidd.methods.width runs it.

A global CNN of width C (VGG, ResNet or CT CNN family) is split along its channels into M thin
sub-networks of width C/M and the same depth, each seeing the whole image. They are trained
independently (in parallel, no communication); then their weights are placed into the
global network, which is trained further ("sub-network transfer learning").

Recomposition, layer by layer (sub-network m owns channel block m of every layer):
- first convolution (the image's channels are shared): output channels stacked;
- inner convolutions and VGG's dense hidden layer: block-diagonal weights, off-diagonal
  blocks zero (or small noise, see `recompose_weights`); biases concatenated;
- BatchNorm: weight, bias, running mean and variance concatenated;
- classifier: the sub-networks' weights side by side, divided by M, and their mean bias, so
  that the recomposed logits are the mean of the sub-networks' logits.
Every layer between (ReLU, max-pool, average pool, flatten, dropout, BatchNorm, the residual
additions) acts channel by channel, so with zero off-diagonal blocks the recomposed feature
maps are exactly the concatenation of the sub-networks' feature maps (in eval mode, and in
train mode too: BatchNorm's batch statistics are per channel).

Bound: cross-entropy is convex in the logits, so the recomposed network's loss on any
sample is at most the mean of the sub-networks' losses on it (Jensen), hence on any data set.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .models import CNNConfig, build_cnn

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class WidthError(ValueError):
    """The global network cannot be split into M equal sub-networks."""


def subnet_config(cfg: CNNConfig, subnets: int) -> CNNConfig:
    """The configuration of one of M sub-networks: every width divided by M, same depth."""
    if subnets < 1:
        raise WidthError(f"--subnets must be >= 1, got {subnets}")
    if cfg.arch == "densenet":
        raise WidthError("--mode width splits vgg, resnet and ctcnn networks: a DenseNet's concatenated features "
                         "do not fall into one channel block per sub-network; choose another --arch")
    if cfg.width % subnets:
        raise WidthError(f"--width {cfg.width} is not divisible by --subnets {subnets}: every layer's "
                         f"channels must split into {subnets} equal blocks")
    if cfg.arch in ("vgg", "ctcnn") and cfg.hidden % subnets:
        raise WidthError(f"--hidden {cfg.hidden} is not divisible by --subnets {subnets}: the dense "
                         f"layer splits into {subnets} equal blocks too")
    return dataclasses.replace(cfg, width=cfg.width // subnets,
                               hidden=cfg.hidden // subnets if cfg.arch in ("vgg", "ctcnn") else cfg.hidden)


def build_subnet(in_channels, num_classes, input_shape, cfg: CNNConfig, subnets: int) -> nn.Module:
    return build_cnn(in_channels, num_classes, input_shape, subnet_config(cfg, subnets))


def _block_diagonal(target: torch.Tensor, blocks, noise: float, generator):
    """target[m-th row block, m-th column block] = blocks[m]; off-diagonal: 0 or noise."""
    rows, cols = blocks[0].shape[0], blocks[0].shape[1]
    if noise > 0:
        scale = noise * torch.cat([b.flatten() for b in blocks]).std()
        target.copy_(torch.randn(target.shape, generator=generator, dtype=target.dtype) * scale)
    else:
        target.zero_()
    for m, b in enumerate(blocks):
        target[m * rows:(m + 1) * rows, m * cols:(m + 1) * cols] = b


@torch.no_grad()
def recompose_weights(subnets, global_model: nn.Module, noise: float = 0.0, seed: int = 0) -> nn.Module:
    """Write the M trained `subnets` into `global_model` (built with the full width); returns it.

    noise = 0 (default): off-diagonal blocks are zero and the recomposed network reproduces
    the sub-networks exactly (feature maps concatenated, logits averaged). noise > 0: the
    off-diagonal blocks of the inner convolutions and dense layers are drawn from
    N(0, (noise * s)^2), s the standard deviation of that layer's sub-network weights: the
    channel blocks are coupled from the first step, at the price of that exactness (the
    feature maps then differ by an amount that grows with noise).
    """
    M = len(subnets)
    generator = torch.Generator().manual_seed(seed)
    parts = [dict(s.named_modules()) for s in subnets]
    for name, g in global_model.named_modules():
        subs = [p[name] for p in parts]
        if isinstance(g, _CONV):
            ws = [s.weight for s in subs]
            if g.in_channels == ws[0].shape[1] and g.in_channels != M * ws[0].shape[1]:
                g.weight.copy_(torch.cat(ws, 0))  # first layer: every sub-network sees the image
            else:
                _block_diagonal(g.weight, ws, noise, generator)
            if g.bias is not None:
                g.bias.copy_(torch.cat([s.bias for s in subs]))
        elif isinstance(g, _NORM):
            for key in ("weight", "bias", "running_mean", "running_var"):
                if getattr(g, key) is not None:
                    getattr(g, key).copy_(torch.cat([getattr(s, key) for s in subs]))
            g.num_batches_tracked.copy_(max(s.num_batches_tracked for s in subs))
        elif isinstance(g, nn.Linear):
            if g.out_features == subs[0].out_features:  # classifier: mean of the logits
                g.weight.copy_(torch.cat([s.weight for s in subs], 1) / M)
                g.bias.copy_(torch.stack([s.bias for s in subs]).mean(0))
            else:  # hidden dense layer: block-diagonal, like an inner convolution
                _block_diagonal(g.weight, [s.weight for s in subs], noise, generator)
                g.bias.copy_(torch.cat([s.bias for s in subs]))
    return global_model

