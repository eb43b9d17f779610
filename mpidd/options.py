"""Flat options -> typed configs: the one mapping from the command line's options or an
estimator's keywords to the dataclasses the methods run with (models.CNNConfig,
engine.TrainOptions, methods.twolevel.TwoLevelConfig, methods.coherent.CoherentConfig,
methods.width.WidthConfig, methods.dense.DenseConfig). cli.plan/cli.phases/cli.dense call it
with the parsed arguments, mpidd.api's estimators with themselves: `o` is any object whose
attributes carry the command line's names (an estimator's keywords are its argparse dests).

Where the two differ:
  OPTIONAL   options only the command line has, read with these defaults where `o` lacks them
             (the TrainOptions fields they set keep their defaults), so an estimator trains in
             the exact order (no --shuffle blocks), logs per epoch only and draws no test curve;
             shuffle_block is what cli.plan.resolve_shuffle makes of --shuffle.
  normalization  the command line's {"mean", "std", "source"} (cli.plan.resolve_normalization),
             the API's (mean, std), or None: inputs.normalization_pair reads every form.

Imports no MPI: the methods' configs are imported where they are built (the method modules
import mpidd.parallel)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from .engine import TrainOptions
from .inputs import normalization_pair
from .models import CNNConfig

if TYPE_CHECKING:
    from .methods.coherent import CoherentConfig
    from .methods.dense import DenseConfig
    from .methods.twolevel import TwoLevelConfig
    from .methods.width import WidthConfig

OPTIONAL = {"shuffle_block": TrainOptions.shuffle_block,   # 1: a permutation of the samples
            "shuffle_buffer": TrainOptions.shuffle_buffer,
            "log_interval": TrainOptions.log_interval,     # 0: progress per epoch only
            "curve_points": TrainOptions.test_points}      # 1: one test score an epoch (TrainOptions.test_points)


def optional(o, name):
    """Option `name` of OPTIONAL: o's, or its default where o has none (an estimator)."""
    return getattr(o, name, OPTIONAL[name])


def cnn_config(o) -> CNNConfig:
    """The CNN family of every model (local, global, coherent, width), with o's input normalisation."""
    mean, std = normalization_pair(getattr(o, "normalization", None))
    return CNNConfig(arch=o.arch, width=o.width, depth=o.depth, convs_per_block=o.convs_per_block, hidden=o.hidden,
                     head_pool=o.head_pool, dropout=o.dropout, batchnorm=o.batchnorm,
                     blocks_per_stage=o.blocks_per_stage, dense_layers=tuple(o.dense_layers),
                     input_mean=mean, input_std=std)


def local_options(o) -> TrainOptions:
    """The local CNNs' optimisation; every other CNN's (global, coherent, width) is this one with changes."""
    return TrainOptions(epochs=o.epochs, batch_size=o.batch_size, lr=o.lr, optimizer=o.optimizer,
                        momentum=o.momentum, weight_decay=o.weight_decay, schedule=o.schedule,
                        shuffle_block=optional(o, "shuffle_block"), shuffle_buffer=optional(o, "shuffle_buffer"),
                        log_interval=optional(o, "log_interval"))


def coarse_options(o) -> TrainOptions:
    """The coarse DNN's optimisation: Adam, cosine, the best epoch on val."""
    return TrainOptions(epochs=o.coarse_epochs, batch_size=o.coarse_batch_size, lr=o.coarse_lr, optimizer="adam",
                        weight_decay=o.coarse_weight_decay, schedule="cosine", select_best=True,
                        log_interval=optional(o, "log_interval"))


def global_options(o) -> TrainOptions:
    """The global CNN's (command line only): the local CNNs' with a test curve."""
    return dataclasses.replace(local_options(o), test_points=optional(o, "curve_points"))


def twolevel_config(o) -> TwoLevelConfig:
    from .methods.twolevel import TwoLevelConfig
    return TwoLevelConfig(cnn=cnn_config(o), local=local_options(o), coarse=coarse_options(o),
                          coarse_hidden=tuple(o.coarse_hidden), coarse_dropout=o.coarse_dropout,
                          coarse_input=o.coarse_input, coarse_min_steps=o.coarse_steps, seed=o.seed,
                          eval_batch_size=o.eval_batch_size)


def coherent_config(o, init) -> CoherentConfig:
    """The coherent model's, from random weights (init "random": coherent_lr) or pre-trained ones (transfer_lr)."""
    from .methods.coherent import CoherentConfig
    opts = dataclasses.replace(local_options(o), epochs=o.coherent_epochs,
                               lr=o.coherent_lr if init == "random" else o.transfer_lr)
    return CoherentConfig(opts=opts, output=o.exchange, coarse_hidden=tuple(o.coarse_hidden),
                          coarse_dropout=o.coarse_dropout, seed=o.seed, eval_batch_size=o.eval_batch_size)


def width_config(o) -> WidthConfig:
    """Sub-networks: the local CNNs' options for subnet_epochs; the recomposed network: at transfer_lr,
    with progress lines and a test curve."""
    from .methods.width import WidthConfig
    local = local_options(o)
    return WidthConfig(cnn=cnn_config(o), subnets=o.subnets,
                       subnet_opts=dataclasses.replace(local, epochs=o.subnet_epochs),
                       recomposed_opts=dataclasses.replace(local, lr=o.transfer_lr,
                                                           test_points=optional(o, "curve_points")),
                       shard=o.shard, offdiag_noise=o.offdiag_noise, seed=o.seed, eval_batch_size=o.eval_batch_size)


# the loss of a dense task when none is named (--loss, loss=)
DENSE_LOSSES = {"regress": "mse", "segment": "ce"}

# the coarse network's weight decay when none is named (--coarse-weight-decay): the dense coarse
# network's losses (squared field errors of 1e-3 and below) give gradients so small that Adam's
# L2 term outweighs them and shrinks its weights towards zero instead of training them (measured
# on 4x4 heat fields: the exchange lowered the val MAE 0.01299 -> 0.0114 in an epoch without it,
# and not at all with 1e-4)
COARSE_WEIGHT_DECAY = {"classify": 1e-4, "regress": 0.0, "segment": 0.0}

# the peak learning rate of transfer learning when none is named (--transfer-lr): the dense
# coherent model trained from the two-level one gains from a larger step than the classifiers'
# (heat fields, 6 epochs from the same two-level models: test MAE 2x2 0.00406 at 5e-4, 0.00336 at
# 2e-3; 4x4 with a halo 0.00535, 0.00461; 2x2x2 0.01836, 0.01445; heat masks 2x2: test mean IoU
# 0.9153 at 5e-4, 0.9238 at 2e-3)
TRANSFER_LR = {"classify": 5e-4, "regress": 2e-3, "segment": 2e-3}


def dense_config(o) -> DenseConfig:
    """Dense prediction's (task regress or segment): the U-Nets of width unet_width and depth
    unet_depth; the local U-Nets' optimisation is also the global U-Net's; the coarse network's
    epochs, batch, rate and weight decay (Adam, cosine, no best-epoch selection)."""
    from .methods.dense import DenseConfig
    from .unet import UNetConfig
    mean, std = normalization_pair(getattr(o, "normalization", None))
    coarse = TrainOptions(epochs=o.coarse_epochs, batch_size=o.coarse_batch_size, lr=o.coarse_lr,
                          weight_decay=o.coarse_weight_decay, log_interval=optional(o, "log_interval"))
    return DenseConfig(task=o.task, loss=o.loss or DENSE_LOSSES[o.task], local=local_options(o), coarse=coarse,
                       unet=UNetConfig(width=o.unet_width, depth=o.unet_depth, batchnorm=o.batchnorm,
                                       input_mean=mean, input_std=std),
                       coarse_hidden=o.coarse_channels, coarse_layers=o.coarse_layers, seed=o.seed,
                       eval_batch_size=o.eval_batch_size)


def dense_coherent_options(o, init) -> TrainOptions:
    """A dense coherent model's: the local U-Nets' options for coherent_epochs, at coherent_lr
    (init "random") or transfer_lr (from the two-level model)."""
    return dataclasses.replace(local_options(o), epochs=o.coherent_epochs,
                               lr=o.coherent_lr if init == "random" else o.transfer_lr)
