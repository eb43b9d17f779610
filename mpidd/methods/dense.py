"""Dense prediction by domain decomposition (--task segment | regress): local U-Nets, the coarse
exchange of their bottlenecks, the global U-Net; top to bottom as the data flow:

    every rank   fit_local_unets: the local U-Net of each of its subdomains, on its subimages
                 and the target boxes (no communication)                  -> "local only"
    gather       gather_bottlenecks: the frozen encoders' bottlenecks to rank 0, (n, N*F) in
                 subdomain order (as the classifiers' probabilities)
    every rank   fit_coarse_correction: rank 0's coarse network maps the grid of bottlenecks to
                 a correction of each; every step the corrections are scattered to the ranks
                 (parallel.ScatterFromRoot), each rank decodes its subdomains with theirs, and the
                 loss's gradients come back to rank 0 through the same operator's adjoint (a
                 gather); the local U-Nets stay frozen                     -> "two-level"
    every rank   fit_domain_parallel_unet: the global U-Net itself, each rank computing its
                 subdomains' tiles (a halo exchange before every 3x3 convolution, BatchNorm over
                 every tile, gradients summed over the ranks)          -> "domain parallel"
    rank 0       fit_global_unet: the U-Net on whole images, the baseline
    scores       dense_scores: each subdomain's additive sums (metrics) gathered to rank 0 and
                 added in subdomain order: the scores of the stitched fields, the same numbers
                 at every rank count

Input: `subsets[i][split]` = (subimages (n, C, *box), target tiles) of subdomain i: the box
with its overlap (what its U-Net sees), the tile without (what it predicts: Decomposition.tile;
the local U-Nets crop their outputs to it). Ranks own subdomains in turn (P <= N).
Every function is collective over ctx.comm where it says so.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import parallel, rundir
from ..decomposition import format_grid
from ..dense import predict_dense, sample_scores, score_text, target_tensor, train_dense
from ..engine import Control, TrainOptions, make_optimizer, run_epochs, to_channels_last, to_float
from ..metrics import dense_loss, regression_scores, regression_sums, segmentation_scores, segmentation_sums
from ..seeds import seed_for
from ..tiled_unet import Tiles, tile_wise
from ..unet import CoarseCorrection, UNetConfig, build_unet, pooled_levels
from .context import Context


@dataclass
class DenseConfig:
    """A dense two-level run's shape and training (the command line's defaults)."""
    task: str = "regress"          # regress | segment
    loss: str = "mse"              # metrics.REGRESSION_LOSSES or SEGMENTATION_LOSSES
    unet: UNetConfig = field(default_factory=UNetConfig)
    local: TrainOptions = field(default_factory=lambda: TrainOptions(epochs=10, batch_size=32, lr=2e-3))
    coarse: TrainOptions = field(default_factory=lambda: TrainOptions(epochs=5, batch_size=32, lr=1e-3))
    coarse_hidden: int = 32        # channels of the coarse network's convolutions
    coarse_layers: int = 3
    seed: int = 0
    eval_batch_size: int = 64


def local_unet(in_channels, out_channels, dec, i: int, unet: UNetConfig, width_factor):
    """Subdomain i's U-Net: on its box, predicting its tile (torch's current seed)."""
    return build_unet(in_channels, out_channels, dec.subimage_shape, unet, width_factor,
                      crop=dec.crop(i) if dec.overlap else None)


def initial_local_unet(ctx: Context, i: int, in_channels, out_channels, dec, cfg: DenseConfig, width_factor):
    """Subdomain i's local U-Net as training starts it: from seed_for(seed, "local", i)."""
    torch.manual_seed(seed_for(cfg.seed, "local", i))
    return local_unet(in_channels, out_channels, dec, i, cfg.unet, width_factor).to(ctx.device)


def fit_local_unets(ctx: Context, subsets: dict, dec, in_channels: int, out_channels: int, width_factor: float,
                    cfg: DenseConfig):
    """Train the local U-Net of each subdomain of this rank (or continue from ctx's checkpoint);
    no communication. Returns ({subdomain: model}, {subdomain: history})."""
    models, histories = {}, {}
    for k, (i, split) in enumerate(sorted(subsets.items())):
        with ctx.timer("local"), ctx.timer(f"subdomain_{i}"):
            model = initial_local_unet(ctx, i, in_channels, out_channels, dec, cfg, width_factor)
            control = ctx.checkpoints.control(rundir.local_checkpoint(i), ctx.model_stop(), subdomain=i,
                                              box=dec.box(i), width_factor=width_factor)
            histories[i], _ = train_dense(
                model, split["train"], split["val"], cfg.local, seed_for(cfg.seed, "local", i), cfg.task, cfg.loss,
                ctx.progress.printer(f"local {i} {dec.coords(i)}", cfg.local.epochs, len(subsets) - k - 1,
                                     score_text(cfg.task)),
                control=control, precision=ctx.precision)
        models[i] = model
    return models, histories


@torch.no_grad()
def bottlenecks(model, x, batch_size: int = 64) -> np.ndarray:
    """(n, F) float32: the flattened bottlenecks of a (frozen) U-Net's encoder on x."""
    model.eval()
    to_channels_last(model, np.ndim(x) if isinstance(x, np.ndarray) else x.dim())
    out = [model.encode(to_float(torch.as_tensor(x[a:a + batch_size])))[0].flatten(1).float()
           for a in range(0, len(x), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def gather_bottlenecks(ctx: Context, models: dict, subsets: dict, num_subdomains: int, splits=("train", "val", "test"),
                       batch_size: int = 64) -> dict | None:
    """Collective: every subdomain's bottlenecks to rank 0, {split: (n, N*F)} in subdomain
    order there; None elsewhere."""
    out = {}
    for s in splits:
        local = {i: bottlenecks(models[i], subsets[i][s][0], batch_size) for i in sorted(models)}
        F = next(iter(local.values())).shape[1]
        n = len(next(iter(subsets.values()))[s][0])
        out[s] = parallel.gather_probabilities(ctx.comm, local, num_subdomains, n, F)
    return out if ctx.master_process else None


def coarse_network(dec, bottleneck_shape, cfg: DenseConfig) -> CoarseCorrection:
    torch.manual_seed(seed_for(cfg.seed, "coarse"))
    return CoarseCorrection(dec.grid, bottleneck_shape, cfg.coarse_hidden, cfg.coarse_layers)


class CoarseStep:
    """One mini-batch of the two-level model, on every rank (collective over the exchange):
    rank 0's coarse network turns the batch's bottlenecks into corrections, which go to the ranks
    (ScatterFromRoot); each rank decodes its subdomains with theirs; backward() brings the
    gradients of the corrections back to rank 0 (the operator's adjoint, a gather).

    Two-level (coherent False; `gathered`: on rank 0, the bottlenecks of the frozen local U-Nets,
    gathered once): the local U-Nets stay frozen. Coherent: every step each rank encodes its
    subdomains and their bottlenecks are gathered to rank 0 (GatherToRoot), so the gradients
    reach every local U-Net too (its encoder both directly and through the coarse network)."""

    def __init__(self, ctx: Context, models: dict, coarse, num_subdomains: int, bottleneck_shape, gathered=None,
                 coherent: bool = False):
        self.ctx, self.models, self.coarse, self.gathered = ctx, models, coarse, gathered
        self.coherent = coherent
        self.N, self.shape = num_subdomains, tuple(bottleneck_shape)
        F = int(np.prod(bottleneck_shape))
        self.exchange = parallel.ModelParallelExchange(ctx.comm, sorted(models), num_subdomains, F,
                                                       poll_interval=getattr(ctx.stops, "wait_interval", None))
        self.placeholder = torch.zeros(0, requires_grad=True)
        self.gathered_here = None  # coherent: this step's GatherToRoot output (its graph)
        if not coherent:
            for m in models.values():
                m.eval()
                m.requires_grad_(False)

    def outputs(self, xs: dict, split: str, idx):
        """{subdomain: outputs (B, C_out, *tile)} of this rank's subdomains on samples idx."""
        root = self.exchange.is_root
        order = sorted(self.models)
        frozen = contextlib.nullcontext() if self.coherent else torch.no_grad()
        with frozen:
            encoded = {i: self.models[i].encode(to_float(torch.as_tensor(xs[i][idx]))) for i in order}
        if not self.coherent:
            z = torch.as_tensor(self.gathered[split][idx]) if root else None
        else:  # the gathered path gets its own backward pass (see backward): a leaf in between
            self.sent = torch.cat([encoded[i][0].flatten(1) for i in order], 1)
            self.sent_leaf = self.sent.detach().requires_grad_(True)
            z = self.gathered_here = self.exchange(self.sent_leaf)
        whole = self.coarse(z) if root else self.placeholder
        mine = parallel.ScatterFromRoot.apply(whole, self.exchange, None, None, len(idx))
        F = int(np.prod(self.shape))
        return {i: self.models[i].decode(encoded[i][0], encoded[i][1],
                                         mine[:, k * F:(k + 1) * F].reshape(encoded[i][0].shape))
                for k, i in enumerate(order)}

    def backward(self, total):
        """The loss's backward through both exchanges, in the order every rank makes them: the
        corrections' gradients gathered (ScatterFromRoot's adjoint), then, coherent, the
        bottlenecks' scattered (GatherToRoot's; on ranks but rank 0 from their empty share of
        the gathered bottlenecks), then those into the encoders in a pass of their own, so that
        every rank adds a bottleneck's two gradients (its decoder's, the coarse network's) in the
        same order whatever the number of ranks: the same numbers at every rank count."""
        if not self.coherent:
            total.backward()
            return
        total.backward(retain_graph=True)
        if not self.exchange.is_root:
            torch.autograd.backward(self.gathered_here, torch.zeros_like(self.gathered_here))
        torch.autograd.backward(self.sent, self.sent_leaf.grad)
        self.gathered_here = self.sent = self.sent_leaf = None


def fit_coarse_correction(ctx: Context, models: dict, subsets: dict, gathered, dec, bottleneck_shape,
                          cfg: DenseConfig, control: Control | None = None):
    """Collective: train rank 0's coarse network with the local U-Nets frozen (two-level).
    Returns (coarse network (rank 0) or None, history)."""
    coarse = coarse_network(dec, bottleneck_shape, cfg) if ctx.master_process else None
    step_of = CoarseStep(ctx, models, coarse, dec.num_subdomains, bottleneck_shape, gathered)
    history = train_exchanged(ctx, step_of, subsets, cfg, cfg.coarse, seed_for(cfg.seed, "coarse_order"),
                              "coarse exchange", control)
    return coarse, history


def coherent_start(ctx: Context, init: str, dec, in_channels, out_channels, width_factor, cfg: DenseConfig,
                   bottleneck_shape, trained: dict | None = None, coarse=None):
    """(this rank's local U-Nets, rank 0's coarse network or None) a coherent model starts from:
    "random" (its own seed streams) or "pretrained" (copies of the two-level model's: transfer
    learning)."""
    import copy
    if init == "pretrained":
        models = {i: copy.deepcopy(m).requires_grad_(True).train() for i, m in trained.items()}
        return models, copy.deepcopy(coarse).train() if coarse is not None else None
    models = {}
    for i in sorted(trained if trained is not None else ctx.mine):
        torch.manual_seed(seed_for(cfg.seed, "coherent_local", i))
        models[i] = local_unet(in_channels, out_channels, dec, i, cfg.unet, width_factor).to(ctx.device)
    if not ctx.master_process:
        return models, None
    torch.manual_seed(seed_for(cfg.seed, "coherent_dnn"))
    return models, CoarseCorrection(dec.grid, bottleneck_shape, cfg.coarse_hidden, cfg.coarse_layers)


def fit_coherent_dense(ctx: Context, models: dict, coarse, subsets: dict, dec, bottleneck_shape, cfg: DenseConfig,
                       opts: TrainOptions, name: str, control: Control | None = None):
    """Collective: the local U-Nets and rank 0's coarse network trained as one model, end to
    end (model parallel: bottlenecks gathered, corrections scattered, both exchanges in
    autograd), from the weights they hold (random, or the two-level result: transfer learning).
    Returns the history."""
    step_of = CoarseStep(ctx, models, coarse, dec.num_subdomains, bottleneck_shape, coherent=True)
    return train_exchanged(ctx, step_of, subsets, cfg, opts, seed_for(cfg.seed, "coherent_order"), name, control)


def train_exchanged(ctx: Context, step_of: CoarseStep, subsets: dict, cfg: DenseConfig, opts: TrainOptions,
                    seed: int, name: str, control: Control | None):
    """The epoch loop of a model whose steps go through the exchange (two-level or coherent),
    on every rank. The loss is the mean over the N subdomains of each one's dense loss (every
    tile holds as many pixels), the score likewise; every rank steps what it owns (its local
    U-Nets if they train, rank 0 the coarse network)."""
    N, models, coarse = step_of.N, step_of.models, step_of.coarse
    loss_fn = dense_loss(cfg.task, cfg.loss)
    xs = {i: subsets[i]["train"][0] for i in models}
    ts = {i: target_tensor(subsets[i]["train"][1], cfg.task) for i in models}
    trains = [*(models.values() if step_of.coherent else ()), *([coarse] if coarse is not None else [])]
    owned = torch.nn.ModuleList(trains) if trains else torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(1))])
    optimizer = make_optimizer(owned, opts)
    everyone = parallel.DataParallelGroup(split=ctx.comm, wait_interval=step_of.exchange.poll_interval)

    def step(idx):
        out = step_of.outputs(xs, "train", idx)
        losses = [loss_fn(out[i].float(), ts[i][idx]) / N for i in sorted(out)]
        total = torch.stack(losses).sum()
        step_of.backward(total)
        score = sum(sample_scores(out[i].detach().float(), ts[i][idx], cfg.task).sum().item() for i in out) / N
        return total.item() * len(idx), score

    def validate(stop):
        scores = dense_scores(ctx, exchanged_predictions(ctx, step_of, subsets, "val", cfg), subsets, "val", cfg)
        value = None if scores is None else scores["mae" if cfg.task == "regress" else "pixel_acc"]
        return float("nan"), parallel.broadcast_from_root(ctx.comm, value)

    n = len(next(iter(subsets.values()))["train"][0])
    return run_epochs(owned, optimizer, opts, seed, n, step, validate=validate,
                      log=ctx.progress.printer(name, opts.epochs, score=score_text(cfg.task)), control=control,
                      group=everyone, root=ctx.master_process)


@torch.no_grad()
def exchanged_predictions(ctx: Context, step_of: CoarseStep, subsets: dict, split: str, cfg: DenseConfig) -> dict:
    """Collective: {subdomain: outputs (n, C_out, *tile) float32} of this rank's subdomains with
    the coarse corrections (two-level or coherent), every network in eval mode."""
    nets = [*step_of.models.values(), *([step_of.coarse] if step_of.coarse is not None else [])]
    modes = [m.training for m in nets]
    for m in nets:
        m.eval()
    xs = {i: subsets[i][split][0] for i in step_of.models}
    n = len(next(iter(subsets.values()))[split][0])
    parts = {i: [] for i in step_of.models}
    for a in range(0, n, cfg.eval_batch_size):
        idx = np.arange(a, min(a + cfg.eval_batch_size, n))
        for i, o in step_of.outputs(xs, split, idx).items():
            parts[i].append(o.float())
    for m, mode in zip(nets, modes):
        m.train(mode)
    return {i: torch.cat(p) for i, p in parts.items()}


def local_predictions(models: dict, subsets: dict, split: str, cfg: DenseConfig) -> dict:
    """{subdomain: outputs (n, C_out, *tile)} of this rank's local U-Nets alone (local only)."""
    return {i: predict_dense(models[i], subsets[i][split][0], cfg.eval_batch_size) for i in sorted(models)}


def dense_scores(ctx: Context, outputs: dict, subsets: dict, split: str, cfg: DenseConfig) -> dict | None:
    """Collective: the scores (metrics) of the stitched fields on rank 0 (None elsewhere), from
    each subdomain's sums, added in subdomain order whatever rank computed them."""
    sums = {}
    for i, out in outputs.items():
        target = subsets[i][split][1]
        if cfg.task == "regress":
            sums[i] = regression_sums(out.numpy(), target)
        else:
            sums[i] = segmentation_sums(out.argmax(1).numpy(), target, out.shape[1])
    gathered = parallel.gather_to_root(ctx.comm, sums)
    if not ctx.master_process:
        return None
    by_subdomain = [part[i] for i in range(sum(len(p) for p in gathered)) for part in gathered if i in part]
    total = by_subdomain[0]
    for s in by_subdomain[1:]:
        total = {k: total[k] + s[k] for k in total} if isinstance(total, dict) else total + s
    return regression_scores(total) if cfg.task == "regress" else segmentation_scores(total)


def domain_parallel_unfit(dec, cfg: DenseConfig) -> str | None:
    """Why the domain-parallel U-Net cannot run this decomposition and loss, or None: its tiles
    must pool at the levels the whole image does, and its loss must be a mean over pixels (a
    Dice over one rank's tiles is not the whole masks' Dice)."""
    if pooled_levels(dec.tile_shape, cfg.unet.depth)[0] != pooled_levels(dec.shape, cfg.unet.depth)[0]:
        return (f"needs tiles that pool as the whole image does ({2 ** cfg.unet.depth} divides every tile "
                f"axis); tiles {format_grid(dec.tile_shape)} of {format_grid(dec.shape)} do not: choose another "
                f"--grid or --unet-depth")
    if "dice" in cfg.loss:
        return f"trains on a mean over pixels (--loss mse, l1 or ce), not on --loss {cfg.loss}"
    return None


def domain_parallel_unet(ctx: Context, dec, in_channels: int, out_channels: int, cfg: DenseConfig,
                         wait_interval=None):
    """(this rank's copy of the global U-Net computed domain parallel, its tiled_unet.Tiles):
    tiled_unet.tile_wise over parallel.HaloExchange and parallel.SubdomainSum, seeded as
    fit_global_unet seeds the global U-Net: the same initial weights, module for module.
    Refused (ValueError) where domain_parallel_unfit says why."""
    unfit = domain_parallel_unfit(dec, cfg)
    if unfit:
        raise ValueError(f"the domain-parallel U-Net {unfit}")
    torch.manual_seed(seed_for(cfg.seed, "global"))
    model = build_unet(in_channels, out_channels, dec.tile_shape, cfg.unet).to(ctx.device)
    tiles = Tiles(len(ctx.mine), parallel.HaloExchange(ctx.comm, dec.grid, ctx.mine, 1, poll_interval=wait_interval),
                  parallel.SubdomainSum(ctx.comm, ctx.mine, dec.num_subdomains, wait_interval))
    return tile_wise(model, tiles), tiles


def _tiles_of(subsets: dict, dec, split: str) -> list:
    """[(inputs cut to the tile, targets)] of this rank's subdomains in order."""
    out = []
    for i in sorted(subsets):
        x, t = subsets[i][split]
        out.append((x[(slice(None), slice(None)) + dec.crop(i)] if dec.overlap else x, t))
    return out


def fit_domain_parallel_unet(ctx: Context, subsets: dict, dec, in_channels: int, out_channels: int,
                             cfg: DenseConfig, control: Control | None = None):
    """Collective: the global U-Net trained domain parallel, every rank its subdomains' tiles
    of every sample (no overlap needed: the halo exchange brings the neighbours' layers), the
    same batches, learning rates and epochs as fit_global_unet. Each step's loss is the whole
    fields' mean, the gradients summed over every subdomain in subdomain order, so every rank
    steps the same weights, the same bits at every rank count: the global U-Net's training up to
    the order of floating-point sums.
    Returns (this rank's copy of the model, history); ValueError where domain_parallel_unfit
    says why it cannot run."""
    everyone = parallel.DataParallelGroup(split=ctx.comm, wait_interval=getattr(ctx.stops, "wait_interval", None))
    model, tiles = domain_parallel_unet(ctx, dec, in_channels, out_channels, cfg, everyone.wait_interval)
    train = _tiles_of(subsets, dec, "train")
    targets = torch.cat([target_tensor(t, cfg.task) for _, t in train])  # (S*n, ...): tile by tile
    n, S, N = len(train[0][1]), len(train), dec.num_subdomains
    loss_fn = dense_loss(cfg.task, cfg.loss)
    optimizer = make_optimizer(model, cfg.local)
    to_channels_last(model, train[0][0].ndim)

    def step(idx):
        x = to_float(torch.cat([torch.as_tensor(xt[idx]) for xt, _ in train]))
        t = targets[torch.cat([torch.as_tensor(idx) + k * n for k in range(S)])]
        out, t = model(x).float().unflatten(0, (S, -1)), t.unflatten(0, (S, -1))
        losses = torch.stack([loss_fn(out[k], t[k]) for k in range(S)])  # each subdomain's mean
        (losses.sum() / N).backward()  # the mean over every tile, once summed over the subdomains
        scores = torch.stack([sample_scores(out[k].detach(), t[k], cfg.task).sum() for k in range(S)])
        loss, score = tiles.sum_gradients(model, torch.stack([losses.detach(), scores], 1)).tolist()
        # every rank holds the sums; run_epochs adds the ranks' returns: the leader's alone counts
        return (loss / N * len(idx), score / N) if everyone.rank == 0 else (0.0, 0.0)

    def validate(stop):
        scores = dense_scores(ctx, domain_parallel_predictions(model, subsets, dec, "val", cfg), subsets, "val", cfg)
        value = None if scores is None else scores["mae" if cfg.task == "regress" else "pixel_acc"]
        return float("nan"), parallel.broadcast_from_root(ctx.comm, value)

    history = run_epochs(model, optimizer, cfg.local, seed_for(cfg.seed, "global"), n, step, validate=validate,
                         log=ctx.progress.printer("global U-Net, domain parallel", cfg.local.epochs,
                                                  score=score_text(cfg.task)),
                         control=control, group=everyone, root=ctx.master_process)
    return model, history


@torch.no_grad()
def domain_parallel_predictions(model, subsets: dict, dec, split: str, cfg: DenseConfig) -> dict:
    """Collective (the halo exchange): {subdomain: outputs (n, C_out, *tile) float32} of this
    rank's subdomains, in eval mode."""
    mode, tiles = model.training, _tiles_of(subsets, dec, split)
    model.eval()
    n, S = len(tiles[0][1]), len(tiles)
    parts = []
    for a in range(0, n, cfg.eval_batch_size):
        x = to_float(torch.cat([torch.as_tensor(xt[a:a + cfg.eval_batch_size]) for xt, _ in tiles]))
        parts.append(model(x).float().unflatten(0, (S, -1)))
    model.train(mode)
    out = torch.cat(parts, 1)
    return {i: out[k] for k, i in enumerate(sorted(subsets))}


def fit_global_unet(ctx: Context, train, val, in_channels: int, out_channels: int, image_shape, cfg: DenseConfig):
    """Rank 0: the U-Net on whole images, the baseline (seeded as the global model). Returns
    (model, history)."""
    torch.manual_seed(seed_for(cfg.seed, "global"))
    model = build_unet(in_channels, out_channels, image_shape, cfg.unet).to(ctx.device)
    control = ctx.checkpoints.control(rundir.GLOBAL_CHECKPOINT, ctx.stops.poll)
    history, _ = train_dense(model, train, val, cfg.local, seed_for(cfg.seed, "global"), cfg.task, cfg.loss,
                             ctx.progress.printer("global U-Net", cfg.local.epochs, score=score_text(cfg.task)),
                             control=control,
                             precision=ctx.precision)
    return model, history
