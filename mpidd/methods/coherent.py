"""The coherent CNN-DNN (Klawonn, Lanser & Weber, arXiv 2408.14442): the local CNNs and the
coarse DNN trained as one model, model parallel over ctx.comm, top to bottom as its data flow:

    every rank   initial_models: its local CNNs, from random weights (seeded per subdomain) or
                 copies of pre-trained ones (transfer learning); rank 0: the DNN, fresh or the
                 two-level method's coarse DNN
    every step   local outputs (softmax or logits) -> exchange: Gatherv to rank 0 (B, N*K)
                 -> rank 0: DNN and loss -> exchange backward: Scatterv of dL/d(outputs)
                 -> every rank: backward through its CNNs, optimizer step   (mpidd.coherent)
    end          test: the same forward pass, scored on rank 0

Collective over ctx.comm at every step (and every stop poll: ctx.poll_world).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from ..coherent import NAMES, evaluate_coherent, train_coherent
from ..engine import TrainOptions, seed_for
from ..models import CoarseDNN
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
            local[i] = build_local_model(channels, K, dec, cnn, width_factor).to(ctx.device)
    else:
        local = {i: copy.deepcopy(pretrained["local"][i]).to(ctx.device) for i in sorted(ctx.mine)}
    dnn = None
    if ctx.master_process:
        if pretrained is not None and pretrained.get("dnn") is not None:
            dnn = copy.deepcopy(pretrained["dnn"]).to(ctx.device)
        else:
            torch.manual_seed(seed_for(cfg.seed, "coherent_dnn"))
            dnn = CoarseDNN(N * K, K, cfg.coarse_hidden, cfg.coarse_dropout).to(ctx.device)
    return local, dnn


def fit(ctx: Context, name: str, local: dict, dnn, images: dict, labels: dict, cfg: CoherentConfig, exchange):
    """Train the coherent model in place on images["train"] ({subdomain: subimages}), validating on
    images["val"] each epoch. `name`: coherent_random or coherent_pretrained (checkpoints, progress).
    Collective. Returns (history, optimizer, timing of the steps and their exchange)."""
    init = name.split("_", 1)[1]
    return train_coherent(
        local, dnn, images["train"], labels["train"], images["val"], labels["val"], cfg.opts,
        seed_for(cfg.seed, "coherent_order"), exchange=exchange, output=cfg.output,
        eval_batch_size=cfg.eval_batch_size, log=ctx.log_progress(NAMES.get(init, name), cfg.opts.epochs),
        control=ctx.coherent_control(name))


def score(ctx: Context, local: dict, dnn, images: dict, labels, cfg: CoherentConfig, exchange):
    """(loss, accuracy) of the coherent model on rank 0, None elsewhere. Collective."""
    return evaluate_coherent(local, dnn, images, labels, exchange=exchange, output=cfg.output,
                             batch_size=cfg.eval_batch_size, stop=ctx.poll_world)
