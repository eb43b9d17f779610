"""Width decomposition (Gu, Zhang, Liu & Cai, ETNA 56, 2022), top to bottom as its data flow:

    every rank   fit_subnets: train its thin sub-networks (width C/M, whole images; with
                 `shard`, sub-network m sees training samples m, m+M, ...), no communication
    gather       gather_subnets: their weights (and scores) to rank 0 of ctx.comm
    rank 0       recompose: block-diagonal weights in the global CNN (mpidd.recomposition), then
                 fit_recomposed: train it further (the transfer learning step)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import parallel, rundir
from ..engine import Shard, TrainOptions, evaluate
from ..models import CNNConfig, build_cnn
from ..recomposition import build_subnet, recompose_weights
from ..seeds import seed_for
from ..stream import is_stream
from .context import Context
from .global_cnn import train_whole_image_model


@dataclass
class WidthConfig:
    """subnet_opts: every sub-network's optimisation (--subnet-epochs); recomposed_opts: the
    recomposed network's (--epochs, --transfer-lr, --curve-points)."""
    cnn: CNNConfig = field(default_factory=CNNConfig)
    subnets: int = 4
    subnet_opts: TrainOptions = field(default_factory=lambda: TrainOptions(epochs=6))
    recomposed_opts: TrainOptions = field(default_factory=lambda: TrainOptions(epochs=3, lr=5e-4))
    shard: bool = False
    offdiag_noise: float = 0.0
    seed: int = 0
    eval_batch_size: int = 256


def fit_subnets(ctx: Context, whole: dict, channels: int, num_classes: int, shape, cfg: WidthConfig,
                score_splits=("val", "test")):
    """Train this rank's sub-networks (ctx.mine) on whole images, then score them on
    `score_splits`. No communication. Returns ({m: state_dict on the CPU}, {m: {split: (loss,
    acc)}}, {m: history})."""
    M, timer = cfg.subnets, ctx.timer
    train_all = whole["train"]
    states, scores, histories = {}, {}, {}
    for k, m in enumerate(ctx.mine):
        with timer("subnets"), timer(f"subnet_{m}"):
            seed = seed_for(cfg.seed, "subnet", m)
            torch.manual_seed(seed)
            model = build_subnet(channels, num_classes, shape, cfg.cnn, M).to(ctx.device)
            train = Shard(every(train_all.x, m, M), train_all.y[m::M]) if cfg.shard else train_all
            histories[m], _ = train_whole_image_model(
                ctx, model, dict(whole, train=train), cfg.subnet_opts, seed, rundir.subnet_checkpoint(m), f"subnet {m}",
                models_after=len(ctx.mine) - k - 1, subnet=m, subnets=M, shard=cfg.shard, train_samples=len(train.y))
        # the training steps alone (no validation), for the time to the target accuracy
        timer.add("subnet_steps", sum(r["seconds"] for r in histories[m]), sum(r["cpu_seconds"] for r in histories[m]))
        with timer("subnet_eval"):  # for the table only: not on the recomposed network's path
            scores[m] = {s: evaluate(model, whole[s].x, whole[s].y, cfg.eval_batch_size, stop=ctx.stops.poll,
                                     precision=ctx.precision)
                         for s in score_splits}
        states[m] = {key: v.cpu() for key, v in model.state_dict().items()}
    return states, scores, histories


def every(x, start: int, step: int):
    """Samples start, start + step, ... of an array or a stream."""
    return x.subset(start, step) if is_stream(x) else x[start::step]


def gather_subnets(ctx: Context, states: dict, scores: dict):
    """Collective: every sub-network's weights and scores to rank 0, ({m: state}, {m: scores})
    there; (None, None) elsewhere."""
    gathered = parallel.gather_to_root(ctx.comm, (states, scores))
    if not ctx.master_process:
        return None, None
    return ({m: st for part, _ in gathered for m, st in part.items()},
            {m: sc for _, part in gathered for m, sc in part.items()})


def recompose(ctx: Context, states: dict, channels: int, num_classes: int, shape, cfg: WidthConfig):
    """Rank 0: the global CNN with the M sub-networks' weights as its diagonal blocks."""
    subnets = []
    for m in range(cfg.subnets):
        subnets.append(build_subnet(channels, num_classes, shape, cfg.cnn, cfg.subnets))
        subnets[m].load_state_dict(states[m])
    torch.manual_seed(seed_for(cfg.seed, "recompose"))
    model = recompose_weights(subnets, build_cnn(channels, num_classes, shape, cfg.cnn), cfg.offdiag_noise,
                              seed_for(cfg.seed, "recompose_noise"))
    return model.to(ctx.device)


def fit_recomposed(ctx: Context, model, whole: dict, cfg: WidthConfig, test=False):
    """Rank 0: train the recomposed network further (with `test`: its test-accuracy curve).
    Returns its history."""
    history, _ = train_whole_image_model(ctx, model, whole, cfg.recomposed_opts, seed_for(cfg.seed, "recomposed_order"),
                                         rundir.RECOMPOSED_CHECKPOINT, "recomposed", models_after=1, test=test,
                                         subnets=cfg.subnets)
    return history
