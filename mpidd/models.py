"""Model families: VGG-type, ResNet-type and DenseNet-type CNNs, and the small CT CNN of the Keras
example "3D image classification from CT scans" (all in 2D and 3D, configurable depth and width),
and the coarse DNN.

Every CNN head pools adaptively (VGG: to a fixed `head_pool`^d grid before its dense layers;
ResNet, DenseNet, CT CNN: global average pool), so the parameter count does not depend on the input size: a
local CNN on a subimage and the global CNN on the whole image differ only through their
width, and the width factor that makes a local model "proportionally smaller" (about 1/N of
the global parameters) is close to 1/sqrt(N). `local_width_factor` finds it numerically for
any configuration of either family.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


ARCHITECTURES = ("vgg", "resnet", "densenet", "ctcnn")


@dataclass
class CNNConfig:
    arch: str = "vgg"          # vgg | resnet
    width: int = 48            # channels of the first block; block b has width * 2**b
    depth: int = 2             # number of blocks (each ends in a 2x max-pool while size allows)
    convs_per_block: int = 2   # 3x3 convolution + BatchNorm + ReLU layers per block
    hidden: int = 128          # dense layer before the classifier (scaled by the width factor)
    head_pool: int = 3         # adaptive average pool to head_pool^d before the dense layers
    dropout: float = 0.0
    batchnorm: bool = True     # BatchNorm after every convolution
    blocks_per_stage: int = 2  # resnet: residual blocks per stage (depth stages; 3 stages x 3
                               # blocks at width 16 is the CIFAR ResNet-20 of He et al.)
    dense_layers: tuple = (6, 12, 24, 16)  # densenet: layers of dense block b (its first `depth`);
                               # with depth 4 and width 64 (growth rate 32) this is DenseNet-121
    input_mean: tuple = ()     # per-channel input normalisation (x - mean) / std, the data
    input_std: tuple = ()      # file's training-split statistics; () = none


class Normalize(nn.Module):
    """(x - mean) / std per channel, with mean and std stored as buffers, so that a saved model
    carries the normalisation it was trained with."""

    def __init__(self, mean, std, ndim: int):
        super().__init__()
        shape = (1, len(mean)) + (1,) * ndim  # the rank of a batch: .to(memory_format=...) takes it
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(shape))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(shape))

    def forward(self, x):
        return (x - self.mean) / self.std


def input_normalization(cfg: CNNConfig, in_channels: int, ndim: int) -> nn.Module:
    """Normalize(cfg.input_mean, cfg.input_std), or an identity without state when there are none."""
    if not cfg.input_mean:
        return nn.Identity()
    if len(cfg.input_mean) != in_channels or len(cfg.input_std) != in_channels:
        raise ValueError(f"input normalisation has {len(cfg.input_mean)} means and {len(cfg.input_std)} standard "
                         f"deviations for {in_channels} channels")
    return Normalize(cfg.input_mean, cfg.input_std, ndim)


def _layers(ndim):
    if ndim == 2:
        return nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d
    if ndim == 3:
        return nn.Conv3d, nn.BatchNorm3d, nn.MaxPool3d, nn.AdaptiveAvgPool3d
    raise ValueError(f"images with {ndim} spatial axes are not supported (2 or 3)")


def scaled(n: int, factor: float) -> int:
    return max(1, int(round(n * factor)))


class CNN(nn.Module):
    """What every family shares: input normalisation, then `features`, then `head` (logits)."""

    def __init__(self, in_channels: int, input_shape, cfg: CNNConfig):
        super().__init__()
        self.ndim = len(input_shape)
        self.normalize = input_normalization(cfg, in_channels, self.ndim)

    def forward(self, x):
        return self.head(self.features(self.normalize(x)))


class VGG(CNN):
    """VGG-type CNN: [conv3x3-BN-ReLU] x convs_per_block, max-pool, repeated `depth` times,
    then adaptive average pool, dense hidden layer, dropout, linear classifier (logits)."""

    def __init__(self, in_channels: int, num_classes: int, input_shape, cfg: CNNConfig,
                 width_factor: float = 1.0):
        super().__init__(in_channels, input_shape, cfg)
        ndim = self.ndim
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


class BasicBlock(nn.Module):
    """Residual block: conv3x3-BN-ReLU-conv3x3-BN, plus the input (1x1 projection when the
    shape changes), then ReLU."""

    def __init__(self, ndim, cin, cout, stride, batchnorm):
        super().__init__()
        conv, bn, _, _ = _layers(ndim)
        norm = (lambda c: bn(c)) if batchnorm else (lambda c: nn.Identity())
        self.conv1, self.bn1 = conv(cin, cout, 3, stride, 1, bias=not batchnorm), norm(cout)
        self.conv2, self.bn2 = conv(cout, cout, 3, 1, 1, bias=not batchnorm), norm(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = (nn.Identity() if stride == 1 and cin == cout else
                         nn.Sequential(conv(cin, cout, 1, stride, bias=not batchnorm), norm(cout)))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(CNN):
    """Small ResNet for 28x28 / 32x32 images (He et al.'s CIFAR family): conv3x3 stem, `depth`
    stages of `blocks_per_stage` basic blocks with width * 2**stage channels (stages after the
    first halve the map while it is at least 2 pixels wide), global average pool, dropout,
    linear classifier (logits)."""

    def __init__(self, in_channels: int, num_classes: int, input_shape, cfg: CNNConfig,
                 width_factor: float = 1.0):
        super().__init__(in_channels, input_shape, cfg)
        ndim = self.ndim
        conv, bn, _, adaptive = _layers(ndim)
        channels = scaled(cfg.width, width_factor)
        layers = [conv(in_channels, channels, 3, padding=1, bias=not cfg.batchnorm)]
        layers += [bn(channels)] if cfg.batchnorm else []
        layers.append(nn.ReLU(inplace=True))
        sizes = list(input_shape)
        for stage in range(cfg.depth):
            out = scaled(cfg.width * 2 ** stage, width_factor)
            for b in range(cfg.blocks_per_stage):
                stride = 2 if stage > 0 and b == 0 and min(sizes) >= 2 else 1
                sizes = [(s + 1) // 2 for s in sizes] if stride == 2 else sizes
                layers.append(BasicBlock(ndim, channels, out, stride, cfg.batchnorm))
                channels = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(adaptive(1), nn.Flatten(), nn.Dropout(cfg.dropout),
                                  nn.Linear(channels, num_classes))


class DenseLayer(nn.Module):
    """DenseNet's bottleneck layer: BN-ReLU-conv1x1 (4 x growth channels)-BN-ReLU-conv3x3 (growth
    channels); its output is concatenated to its input."""

    def __init__(self, ndim, cin, growth, batchnorm):
        super().__init__()
        conv, bn, _, _ = _layers(ndim)
        norm = (lambda c: bn(c)) if batchnorm else (lambda c: nn.Identity())
        self.body = nn.Sequential(norm(cin), nn.ReLU(inplace=True), conv(cin, 4 * growth, 1, bias=False),
                                  norm(4 * growth), nn.ReLU(inplace=True),
                                  conv(4 * growth, growth, 3, padding=1, bias=False))

    def forward(self, x):
        return torch.cat([x, self.body(x)], 1)


class DenseNet(CNN):
    """DenseNet-type CNN (Huang et al. 2017, the layout of DenseNet-121): a stem of width channels
    (on inputs of 64 pixels or more a side, DenseNet-121's 7x7 stride-2 convolution and 3x3
    stride-2 max-pool; on smaller ones a 3x3 convolution), `depth` dense blocks of
    dense_layers[b] bottleneck layers with growth rate width/2, each block but the last followed by
    a transition (BN-ReLU-conv1x1 halving the channels, 2x average pool while the map is at least 2
    wide), then BN-ReLU, global average pool, dropout, linear classifier (logits)."""

    def __init__(self, in_channels: int, num_classes: int, input_shape, cfg: CNNConfig,
                 width_factor: float = 1.0):
        super().__init__(in_channels, input_shape, cfg)
        ndim = self.ndim
        conv, bn, pool, adaptive = _layers(ndim)
        avg = nn.AvgPool2d if ndim == 2 else nn.AvgPool3d
        norm = (lambda c: bn(c)) if cfg.batchnorm else (lambda c: nn.Identity())
        if cfg.depth > len(cfg.dense_layers):
            raise ValueError(f"densenet: --depth {cfg.depth} but --dense-layers names {len(cfg.dense_layers)} blocks")
        growth = scaled(cfg.width / 2, width_factor)
        channels, sizes = 2 * growth, list(input_shape)
        if min(sizes) >= 64:  # DenseNet-121's stem for large images: 4x smaller maps
            layers = [conv(in_channels, channels, 7, 2, 3, bias=False), norm(channels), nn.ReLU(inplace=True),
                      pool(3, 2, 1)]
            sizes = [(s - 1) // 2 + 1 for s in sizes]
            sizes = [(s - 1) // 2 + 1 for s in sizes]
        else:
            layers = [conv(in_channels, channels, 3, padding=1, bias=False)]
        for b in range(cfg.depth):
            for _ in range(cfg.dense_layers[b]):
                layers.append(DenseLayer(ndim, channels, growth, cfg.batchnorm))
                channels += growth
            if b < cfg.depth - 1:
                out = channels // 2
                layers += [norm(channels), nn.ReLU(inplace=True), conv(channels, out, 1, bias=False)]
                channels = out
                if min(sizes) >= 2:
                    layers.append(avg(2))
                    sizes = [s // 2 for s in sizes]
        layers += [norm(channels), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(adaptive(1), nn.Flatten(), nn.Dropout(cfg.dropout), nn.Linear(channels, num_classes))


class CTCNN(CNN):
    """The small CNN of the Keras example "3D image classification from CT scans" (Zunair): `depth`
    layers of [conv3x3 with bias, ReLU, 2x max-pool, BatchNorm] with width, width, 2 width,
    4 width, ... channels (depth 4 at width 64: 64, 64, 128, 256), global average pool, dense
    hidden layer, ReLU, dropout, linear classifier (logits); its 2D counterpart on images. As in
    Keras the convolutions are unpadded while the map stays at least 2 wide after them (else
    padded: small subimages), and pool while it is at least 2 wide. --width 64 --hidden 512
    --dropout 0.3 --depth 4 is the Keras model."""

    def __init__(self, in_channels: int, num_classes: int, input_shape, cfg: CNNConfig,
                 width_factor: float = 1.0):
        super().__init__(in_channels, input_shape, cfg)
        ndim = self.ndim
        conv, bn, pool, adaptive = _layers(ndim)
        layers, channels, sizes = [], in_channels, list(input_shape)
        for b in range(cfg.depth):
            out = scaled(cfg.width * 2 ** max(b - 1, 0), width_factor)
            padding = 0 if min(sizes) - 2 >= 2 else 1
            sizes = [s - 2 + 2 * padding for s in sizes]
            layers += [conv(channels, out, 3, padding=padding), nn.ReLU(inplace=True)]
            if min(sizes) >= 2:
                layers.append(pool(2))
                sizes = [s // 2 for s in sizes]
            layers += [bn(out)] if cfg.batchnorm else []
            channels = out
        self.features = nn.Sequential(*layers)
        hidden = scaled(cfg.hidden, width_factor)
        self.head = nn.Sequential(adaptive(1), nn.Flatten(), nn.Linear(channels, hidden), nn.ReLU(inplace=True),
                                  nn.Dropout(cfg.dropout), nn.Linear(hidden, num_classes))


FAMILIES = {"vgg": VGG, "resnet": ResNet, "densenet": DenseNet, "ctcnn": CTCNN}


def build_cnn(in_channels, num_classes, input_shape, cfg: CNNConfig, width_factor=1.0) -> nn.Module:
    if cfg.arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {cfg.arch!r} ({', '.join(ARCHITECTURES)})")
    return FAMILIES[cfg.arch](in_channels, num_classes, tuple(input_shape), cfg, width_factor)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops(model: nn.Module, input_shape) -> int:
    """Forward FLOPs of `model` on one input of shape (C, *spatial), on the model's device (a
    model built on the "meta" device costs no memory): convolutions and matmuls only (torch's
    FlopCounterMode counts no BatchNorm, ReLU or pooling); a training step costs about 3x this
    (forward and two backward products)."""
    from torch.utils.flop_counter import FlopCounterMode
    training = model.training
    model.eval()
    device = next(model.parameters()).device
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, *input_shape, device=device))
    model.train(training)
    return int(counter.get_total_flops())


def local_width_factor(in_channels, num_classes, image_shape, subimage_shape, num_subdomains,
                       cfg: CNNConfig) -> float:
    """Width factor that gives a local CNN about 1/N of the global CNN's parameters."""
    target = count_parameters(build_cnn(in_channels, num_classes, image_shape, cfg)) / num_subdomains
    return width_factor_for(lambda f: build_cnn(in_channels, num_classes, subimage_shape, cfg, f), target)


def width_factor_for(build, target: float) -> float:
    """The smallest width factor in (0, 1] (to 4 decimals, by bisection) at which build(factor)
    has at least `target` parameters."""
    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if count_parameters(build(mid)) < target else (lo, mid)
    return round(hi, 4)


COARSE_INPUTS = ("logprob", "prob")  # what the coarse DNN's first layer sees (see CoarseDNN)
PROBABILITY_FLOOR = 1e-7  # log(0) guard: a probability below this is taken as this


def log_moments(x, rows: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and std of log(max(x, PROBABILITY_FLOOR)) over the rows of x (n, F), in
    float64, in two passes over blocks of `rows` rows: the temporaries are a block's, not the
    whole array's (rank 0 calls this on the gathered probabilities of the training split)."""
    def logs(a):
        return np.log(np.maximum(np.asarray(x[a:a + rows], dtype=np.float64), PROBABILITY_FLOOR))

    n = len(x)
    mean = sum(logs(a).sum(axis=0) for a in range(0, n, rows)) / n
    var = sum(((logs(a) - mean) ** 2).sum(axis=0) for a in range(0, n, rows)) / n
    return mean, np.sqrt(var)


class CoarseDNN(nn.Module):
    """The coarse network of the two-level method: N*K local probabilities -> K class logits.

    Its input transform is part of the model (buffers, saved with it): with log_inputs, the
    log of each probability (floored at PROBABILITY_FLOOR), then (x - input_mean) / input_std
    per feature. Built, it is the identity (no log, mean 0, std 1): the papers' probabilities
    as they are; `use_log_probabilities(train)` switches to standardised log-probabilities with
    the statistics of the training inputs. Model files written before the transform existed
    load as the identity."""

    def __init__(self, in_features: int, num_classes: int, hidden=(64, 64), dropout: float = 0.0):
        super().__init__()
        layers, width = [], in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)
        self.register_buffer("log_inputs", torch.tensor(False))
        self.register_buffer("input_mean", torch.zeros(in_features))
        self.register_buffer("input_std", torch.ones(in_features))
        self.inputs_transformed = False  # see transformed_inputs

    def use_log_probabilities(self, train) -> "CoarseDNN":
        """Standardised log-probabilities, with the mean and std of `train` (n, N*K) per feature
        (a feature constant on the training split keeps std 1)."""
        mean, std = log_moments(train)
        std[std < 1e-6] = 1.0
        self.log_inputs.fill_(True)
        self.input_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.input_std.copy_(torch.as_tensor(std, dtype=torch.float32))
        return self

    def transform(self, x):
        """The network's inputs for probabilities x (n, in_features), as forward computes them."""
        # where, not `if self.log_inputs`: no device-to-host sync per step on a GPU
        x = torch.where(self.log_inputs, torch.log(x.clamp_min(PROBABILITY_FLOOR)), x)
        return (x - self.input_mean) / self.input_std

    def forward(self, x):
        return self.net(x if self.inputs_transformed else self.transform(x))

    @contextlib.contextmanager
    def transformed_inputs(self):
        """Inside, forward takes transform(x) instead of x: a training loop transforms its
        data once instead of every batch in every epoch."""
        self.inputs_transformed = True
        try:
            yield self
        finally:
            self.inputs_transformed = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        identity = {"log_inputs": torch.tensor(False), "input_mean": torch.zeros_like(self.input_mean),
                    "input_std": torch.ones_like(self.input_std)}
        for name, value in identity.items():  # a file written before the transform existed
            state_dict.setdefault(prefix + name, value)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class GroupBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose batch statistics cover every rank of a data-parallel group.

    `allreduce(t)` sums a tensor over the group, differentiably (mpidd.parallel.DataParallelGroup
    .allreduce). In training, the per-channel sums of x and x^2 and the sample count are summed
    over the group (float64), so every rank normalises with the mean and variance of the whole
    global batch and the gradients flow through the statistics as in nn.BatchNorm on one rank.
    Parameters and buffers are those of nn.BatchNorm*d (state_dicts are interchangeable); in
    eval mode it is plain BatchNorm with the running statistics.
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, allreduce):
        super().__init__(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        like = bn.weight if bn.weight is not None else bn.running_mean
        if like is not None:
            self.to(device=like.device, dtype=like.dtype)
        self.load_state_dict(bn.state_dict())
        self.allreduce = allreduce

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def global_statistics(self, total, C: int):
        """(mean, biased variance) per channel from the summed [sum x (C), sum x^2 (C), count]
        (float64), the running statistics updated with them as nn.BatchNorm does."""
        n = total[-1]
        mean = total[:C] / n
        var = total[C:2 * C] / n - mean * mean  # biased, as BatchNorm normalises with
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(m * mean.to(self.running_mean.dtype))
                self.running_var.mul_(1 - m).add_(m * (var * n / (n - 1)).to(self.running_var.dtype))
        return mean, var

    def forward(self, x):
        if not self.training:
            return nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                            False, 0.0, self.eps)
        dims = [0, *range(2, x.dim())]
        out_dtype = x.dtype
        if x.dtype in (torch.bfloat16, torch.float16):  # autocast: normalise in float32, as nn.BatchNorm does
            x = x.float()
        count = torch.full((1,), x.numel() / max(x.shape[1], 1), dtype=torch.float64, device=x.device)
        total = self.allreduce(torch.cat([x.sum(dims, dtype=torch.float64), (x * x).sum(dims, dtype=torch.float64),
                                          count]))
        C = x.shape[1]
        mean, var = self.global_statistics(total, C)
        shape = [1, C] + [1] * (x.dim() - 2)
        scale = torch.rsqrt(var + self.eps).to(x.dtype)
        y = (x - mean.to(x.dtype).view(shape)) * scale.view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(out_dtype)


def group_batchnorm(model: nn.Module, allreduce) -> nn.Module:
    """Replace every BatchNorm of `model` by a GroupBatchNorm with its parameters (in place)."""
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, GroupBatchNorm):
            setattr(model, name, GroupBatchNorm(child, allreduce))
        else:
            group_batchnorm(child, allreduce)
    return model
