"""The coherent CNN-DNN (Klawonn, Lanser & Weber, arXiv 2408.14442): the local CNNs and the
coarse DNN trained as one model, model parallel over ctx.comm, top to bottom as its data flow:

    every rank   initial_models: its local CNNs, from random weights (seeded per subdomain) or
                 copies of pre-trained ones (transfer learning); rank 0: the DNN, fresh or the
                 two-level method's coarse DNN
    every step   local outputs (softmax or logits) -> exchange: Gatherv to rank 0 (B, N*K)
                 -> rank 0: DNN and loss -> exchange backward: Scatterv of dL/d(outputs)
                 -> every rank: backward through its CNNs, optimizer step   (mpidd.coherent_model)
    end          test: the same forward pass, scored on rank 0

Collective over ctx.comm at every step (and every stop poll: ctx.stops.poll_world). With P = G*N
ranks each subdomain's group trains its local CNN data parallel inside the model-parallel
step: every member computes the rows of the batch it holds, and their gradients (and
BatchNorm statistics) are summed over the group.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from ..coherent_model import NAMES, evaluate_coherent, train_coherent
from ..engine import TrainOptions
from ..models import CoarseDNN
from ..seeds import seed_for
from .context import Context
from .twolevel import build_local_model


@dataclass
class CoherentConfig:
    """The coherent model's training. opts: its optimisation (the command line: --coherent-epochs,
    --coherent-lr from random weights, --transfer-lr from pre-trained ones); output: what crosses
    the exchange, "probabilities" (the paper's) or "logits"."""
    opts: TrainOptions = field(default_factory=lambda: TrainOptions(epochs=2, lr=2e-3))
    output: str = "probabilities"
    coarse_hidden: tuple = (64, 64)
    coarse_dropout: float = 0.0
    seed: int = 0
    eval_batch_size: int = 256


def initial_models(ctx: Context, dec, channels: int, num_classes: int, width_factor: float, cnn, cfg: CoherentConfig,
                   pretrained: dict | None = None):
    """({subdomain: local CNN} of this rank, the DNN on rank 0 or None elsewhere).

    pretrained None: random weights, local CNN i seeded from (seed, i), the DNN from seed.
    pretrained {"local": {i: model}, "dnn": model or None}: copies of them (transfer
    learning); a None DNN means a fresh one (the command line's --dnn-init random)."""
    N, K = dec.num_subdomains, num_classes
    if pretrained is None:
        local = {}
        for i in sorted(ctx.mine):
            torch.manual_seed(seed_for(cfg.seed, "coherent_local", i))
            local[i] = ctx.on_device(build_local_model(channels, K, dec, cnn, width_factor))
    else:  # fresh modules with the pre-trained weights (their BatchNorm sums over this ctx's group)
        local = {}
        for i in sorted(ctx.mine):
            local[i] = build_local_model(channels, K, dec, cnn, width_factor)
            local[i].load_state_dict(pretrained["local"][i].state_dict())
            local[i] = ctx.on_device(local[i])
    dnn = None
    if ctx.master_process:
        if pretrained is not None and pretrained.get("dnn") is not None:
            dnn = copy.deepcopy(pretrained["dnn"]).to(ctx.device)
        else:
            torch.manual_seed(seed_for(cfg.seed, "coherent_dnn"))
            dnn = CoarseDNN(N * K, K, cfg.coarse_hidden, cfg.coarse_dropout).to(ctx.device)
    return local, dnn


def fit_coherent(ctx: Context, name: str, local: dict, dnn, subsets: dict, labels: dict, cfg: CoherentConfig, exchange):
    """Train the coherent model in place on the "train" Shards of `subsets` ({subdomain: {split:
    Shard}}; this rank's share of the samples in a data-parallel group), validating on "val" each
    epoch; labels: {split: every sample's label}. `name`: coherent_random or coherent_pretrained
    (checkpoints, progress). Collective. Returns (history, optimizer, timing of the steps and
    their exchange)."""
    init = name.split("_", 1)[1]
    xs = {s: {i: subsets[i][s].x for i in sorted(subsets)} for s in ("train", "val")}
    start = {s: next(iter(subsets.values()))[s].start for s in ("train", "val")}
    return train_coherent(
        local, dnn, xs["train"], labels["train"], xs["val"], labels["val"], cfg.opts,
        seed_for(cfg.seed, "coherent_order"), exchange=exchange, output=cfg.output,
        eval_batch_size=cfg.eval_batch_size, log=ctx.progress.printer(NAMES.get(init, name), cfg.opts.epochs),
        control=ctx.checkpoints.coherent_control(name, ctx.stops.poll_world), train_start=start["train"],
        val_start=start["val"], group=ctx.group, precision=ctx.precision)


def score(ctx: Context, local: dict, dnn, subsets: dict, labels, cfg: CoherentConfig, exchange, split="test"):
    """(loss, accuracy) of the coherent model on `split` on rank 0, None elsewhere. Collective."""
    xs = {i: subsets[i][split].x for i in sorted(subsets)}
    return evaluate_coherent(local, dnn, xs, labels, exchange=exchange, output=cfg.output,
                             batch_size=cfg.eval_batch_size, stop=ctx.stops.poll_world,
                             start=next(iter(subsets.values()))[split].start, precision=ctx.precision)
