"""The two-level CNN-DNN (Klawonn, Lanser & Weber, SIAM J. Sci. Comput. 46(5), 2024), top to
bottom as its data flow:

    every rank   fit_local_models: train the local CNN of each of its subdomains on its
                 subimages (no communication, but within a data-parallel group), then its
                 class probabilities on every split                         (n, K) each
    gather       gather_to_coarse: MPI_Gatherv to rank 0 of the communicator          (n, N*K), subdomain order
    rank 0       fit_coarse: the coarse DNN on the gathered probabilities (standardised
                 log-probabilities by default; at least coarse_min_steps steps; selected on val);
                 combine: CNN-DNN, average and vote, and every local CNN's own accuracy

Input: `subsets[i][split]` is an engine.Shard of subdomain i's subimages (n, C, *box) and
labels (this rank's share of the samples in a data-parallel group). Every function is
collective over ctx.comm where it says so; none touches any other communicator.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .. import combine, parallel, rundir
from ..engine import TrainOptions, evaluate, predict_proba, train_classifier
from ..models import CNNConfig, build_cnn
from ..seeds import seed_for
from .context import Context


@dataclass
class TwoLevelConfig:
    """Everything that shapes a two-level CNN-DNN and its training (the command line's
    defaults). local: the local CNNs' optimisation; coarse: the coarse DNN's."""
    cnn: CNNConfig = field(default_factory=CNNConfig)
    local: TrainOptions = field(default_factory=TrainOptions)
    coarse: TrainOptions = field(default_factory=lambda: TrainOptions(
        epochs=5, batch_size=128, lr=3e-3, optimizer="adam", weight_decay=1e-4, schedule="cosine", select_best=True))
    coarse_hidden: tuple = (64, 64)
    coarse_dropout: float = 0.0
    coarse_input: str = "logprob"   # logprob: standardised log-probabilities; prob: as they are (the papers')
    coarse_min_steps: int = 2000    # at least this many optimizer steps: more epochs on small sets
    seed: int = 0
    eval_batch_size: int = 256


def build_local_model(channels, num_classes, dec, cnn: CNNConfig, width_factor) -> torch.nn.Module:
    """Local CNN of any subdomain (they all have the same subimage shape)."""
    return build_cnn(channels, num_classes, dec.subimage_shape, cnn, width_factor)


def initial_local_model(ctx: Context, i: int, channels, num_classes, dec, cnn: CNNConfig, width_factor, seed: int):
    """Subdomain i's local CNN as training starts it: initialised from seed_for(seed, "local", i),
    on ctx's device."""
    torch.manual_seed(seed_for(seed, "local", i))
    return ctx.on_device(build_local_model(channels, num_classes, dec, cnn, width_factor))


def fit_local_models(ctx: Context, subsets: dict, dec, channels: int, num_classes: int, width_factor: float,
                     cfg: TwoLevelConfig, splits=("train", "val")):
    """Train each local CNN of this rank (or continue it from ctx's checkpoint), then its class
    probabilities on `splits`. No communication but within ctx.group.

    Returns ({subdomain: {split: (rows, K) float32}}, {subdomain: model}, {subdomain: history}).
    """
    probs, models, histories = {}, {}, {}
    for k, (i, split) in enumerate(subsets.items()):
        with ctx.timer("local"), ctx.timer(f"subdomain_{i}"):
            seed = seed_for(cfg.seed, "local", i)
            model = initial_local_model(ctx, i, channels, num_classes, dec, cfg.cnn, width_factor, cfg.seed)
            control = ctx.checkpoints.control(rundir.local_checkpoint(i), ctx.model_stop(), write=ctx.leader,
                                              subdomain=i, box=dec.box(i), width_factor=width_factor)
            histories[i], _ = train_classifier(
                model, split["train"], split["val"], cfg.local, seed,
                ctx.progress.printer(f"local {i} {dec.coords(i)}", cfg.local.epochs, len(subsets) - k - 1),
                control=control, group=ctx.group, precision=ctx.precision)
            with ctx.timer("probabilities"):
                probs[i] = local_probabilities(ctx, {i: model}, {i: split}, splits, cfg.eval_batch_size)[i]
        models[i] = model
    return probs, models, histories


def local_probabilities(ctx: Context, models: dict, subsets: dict, splits, batch_size=256) -> dict:
    """{subdomain: {split: (rows, K) float32 class probabilities}} of this rank's local CNNs."""
    return {i: {s: predict_proba(models[i], subsets[i][s].x, batch_size, stop=ctx.model_stop(), group=ctx.group,
                                 total=subsets[i][s].total, precision=ctx.precision) for s in splits}
            for i in models}


def gather_to_coarse(ctx: Context, probs: dict, subsets: dict, num_subdomains: int, num_classes: int,
                     sizes: dict) -> dict | None:
    """Collective over ctx.comm: every subdomain's probabilities to rank 0, {split: (n, N*K)}
    in subdomain order there (sizes: {split: n}); None elsewhere."""
    gathered = {}
    for s, n in sizes.items():
        mine = sorted(probs)
        gathered[s] = parallel.gather_probabilities(ctx.comm, {i: probs[i][s] for i in mine}, num_subdomains,
                                                    n, num_classes, starts={i: subsets[i][s].start for i in mine})
    return gathered if ctx.master_process else None


def fit_coarse(ctx: Context, gathered: dict, labels: dict, num_subdomains: int, num_classes: int,
               cfg: TwoLevelConfig):
    """Rank 0: the coarse DNN on the gathered (n, N*K) probabilities, the best epoch on val.
    Returns (dnn, history)."""
    N, K = num_subdomains, num_classes
    # the coarse DNN trains for seconds, in many short epochs on small sets: no file per epoch
    control = ctx.checkpoints.control(rundir.COARSE_CHECKPOINT, ctx.stops.poll, epoch_saves=False, in_features=N * K,
                                      num_classes=K, hidden=list(cfg.coarse_hidden), dropout=cfg.coarse_dropout)
    epochs = combine.coarse_epochs(len(labels["train"]), cfg.coarse, cfg.coarse_min_steps)
    return combine.train_coarse_dnn(
        (gathered["train"], labels["train"]), (gathered["val"], labels["val"]), K, cfg.coarse_hidden,
        cfg.coarse_dropout, cfg.coarse, cfg.seed, ctx.progress.printer("coarse DNN", epochs), control=control,
        inputs=cfg.coarse_input, min_steps=cfg.coarse_min_steps)


def combined_predictions(dnn, gathered: np.ndarray, num_subdomains: int, num_classes: int, model="cnn-dnn",
                         batch_size=256) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (n, K), predicted classes (n,)) of a combiner on gathered (n, N*K)
    probabilities: cnn-dnn (softmax of the coarse DNN), average (mean probability), vote
    (fractions of the N local votes; the prediction breaks ties as combine.majority_vote)."""
    p = gathered.reshape(-1, num_subdomains, num_classes)
    if model == "cnn-dnn":
        probs = predict_proba(dnn, gathered, batch_size)
        return probs, probs.argmax(1)
    if model == "average":
        probs = p.mean(axis=1)
        return probs, combine.average_vote(p)
    if model == "vote":
        votes = np.zeros((len(p), num_classes), dtype=np.float32)
        np.add.at(votes, (np.repeat(np.arange(len(p)), num_subdomains), p.argmax(axis=2).ravel()), 1)
        return votes / num_subdomains, combine.majority_vote(p)
    raise ValueError(f"unknown combiner {model!r} (cnn-dnn, average or vote)")


def accuracies(dnn, gathered: dict, labels: dict, num_subdomains: int, num_classes: int, splits=("val", "test"),
               stop=None) -> dict:
    """Rank 0: {"cnn_dnn", "average", "vote": {split: acc}, "local": {i: {split: acc}}}; with
    "test" in splits also "cnn_dnn_confusion": the CNN-DNN's (K, K) test confusion counts."""
    N, K = num_subdomains, num_classes
    acc = {"cnn_dnn": {}, "average": {}, "vote": {}, "local": {i: {} for i in range(N)}}
    for s in splits:
        p, y = gathered[s].reshape(-1, N, K), labels[s]
        acc["cnn_dnn"][s] = evaluate(dnn, gathered[s], y, **({"stop": stop} if stop else {}))[1]
        acc["average"][s] = combine.accuracy(combine.average_vote(p), y)
        acc["vote"][s] = combine.accuracy(combine.majority_vote(p), y)
        for i in range(N):
            acc["local"][i][s] = combine.accuracy(p[:, i].argmax(1), y)
    if "test" in splits:
        _, predicted = combined_predictions(dnn, gathered["test"], N, K)
        acc["cnn_dnn_confusion"] = confusion_matrix(labels["test"], predicted, K)
    return acc


def confusion_matrix(labels, predicted, num_classes: int) -> list:
    """(K, K) counts as nested lists: row = true class, column = predicted class."""
    pairs = np.asarray(labels, dtype=np.int64) * num_classes + np.asarray(predicted, dtype=np.int64)
    return np.bincount(pairs, minlength=num_classes * num_classes).reshape(num_classes, num_classes).tolist()
