"""The global CNN on whole images (the baseline of every comparison), and the training loop of
any whole-image model (also the width decomposition's sub-networks and recomposed network):

    one rank alone (--mode width; compare on one node), or data parallel over ctx.group (--mode
    global: every rank; compare on several nodes: the first rank of each): each holds its share
    of the samples, gradients and BatchNorm statistics summed over the group
"""

from __future__ import annotations

import torch

from .. import rundir
from ..engine import TrainOptions, evaluate, train_classifier
from ..models import CNNConfig, build_cnn, group_batchnorm
from ..seeds import seed_for
from .context import Context


def train_whole_image_model(ctx: Context, model, split: dict, opts: TrainOptions, seed: int, ckpt: str, label: str,
                            models_after=0, test=False, alone=True, **fields):
    """Train `model` on split["train"], validating on split["val"] each epoch (and, with `test`,
    the test-accuracy curve of opts.test_points per epoch), checkpointed as `ckpt` through ctx.
    alone: this rank trains it by itself (else with ctx.group). Returns (history, optimizer)."""
    control = ctx.checkpoints.control(ckpt, ctx.model_stop(alone), write=alone or ctx.leader, **fields)
    return train_classifier(model, split["train"], split["val"], opts, seed,
                            ctx.progress.printer(label, opts.epochs, models_after),
                            test=split["test"] if test else None, control=control,
                            group=None if alone else ctx.group, precision=ctx.precision)


def fit_global(ctx: Context, split: dict, channels: int, num_classes: int, shape, cnn: CNNConfig, opts: TrainOptions,
        seed: int, test=False, alone=True):
    """The global CNN, seeded from (seed, "global"), trained as train_whole_image_model does.
    Returns (model, history)."""
    seed = seed_for(seed, "global")
    torch.manual_seed(seed)
    model = build_cnn(channels, num_classes, shape, cnn).to(ctx.device)
    if not alone and ctx.group is not None:
        model = group_batchnorm(model, ctx.group.allreduce)
    history, _ = train_whole_image_model(ctx, model, split, opts, seed, rundir.GLOBAL_CHECKPOINT, "global CNN",
                                         test=test, alone=alone)
    return model, history


def scores(ctx: Context, model, split: dict, batch_size: int, alone=True, splits=("val", "test")) -> dict:
    """{split: (loss, accuracy)} (over the group's samples when not alone: collective there)."""
    return {s: evaluate(model, split[s].x, split[s].y, batch_size, stop=ctx.model_stop(alone),
                        group=None if alone else ctx.group, total=split[s].total, precision=ctx.precision)
            for s in splits}
