"""CNN-DNN training by domain decomposition (Klawonn, Lanser & Weber 2024, arXiv 2408.14442).

    mpirun -n 4 python -m mpidd.train                     # demo: the paper's comparison, 2x2, Fashion-MNIST
    mpirun -n 4 python -m mpidd.train --data FILE --grid 2x2 --overlap 0 --mode twolevel --out runs/NAME
    mpirun -n 4 python -m mpidd.train --mode coherent --init random --out runs/c
    mpirun -n 4 python -m mpidd.train --mode coherent --from runs/NAME --out runs/tl   # transfer learning
    mpirun -n 2 python -m mpidd.train --grid 2x2 ...      # P < N: rank r trains subdomains r, r+P, ...
    python -m mpidd.train --mode global --out runs/g      # the global CNN baseline alone, one rank
    mpirun -n 4 python -m mpidd.train --mode width --subnets 4 --out runs/w   # width decomposition (Gu et al.)

Phases: load (each rank reads only its subimage boxes), local (train the local CNNs, then
their class probabilities for train/val/test; no communication), gather (MPI_Gatherv to
rank 0 as (n, N*K) in subdomain order), coarse (rank 0: coarse DNN, average, vote),
coherent_random / coherent_pretrained (the whole CNN-DNN as one model parallel model: local
outputs gathered to rank 0, their gradients scattered back, every step), global (rank 0:
the global CNN on whole images, for comparison). --mode width (Gu, Zhang, Liu & Cai 2022):
global_load (every rank reads the whole images), subnets (rank r trains its thin sub-networks
of the global CNN; no communication), width_gather (their weights to rank 0), recompose,
recomposed_train and global_train (rank 0). Rank 0 prints; every rank logs to
RUN/logs/rank<r>.log.
"""

from __future__ import annotations

import copy
import datetime
import json
import logging
import os
import socket
import sys
import time
from contextlib import contextmanager

import h5py
import mpi4py
import numpy as np
import torch
from mpi4py import MPI

from . import __version__
from . import combine, data, parallel, rundir
from .coherent import NAMES as COHERENT_NAMES
from .coherent import evaluate_coherent, train_coherent
from .config import DEMO_DATA, ConfigError, parse_args
from .decomposition import (Decomposition, DecompositionError, format_grid, parse_grid, rank_of_subdomain,
                            subdomains_of_rank)
from .engine import TrainOptions, derive_seed, evaluate, predict_proba, train_classifier
from .models import CNNConfig, CoarseDNN, build_cnn, count_parameters, local_width_factor
from .report import format_any
from .width import WidthError, build_subnet, recompose

EXIT_USAGE = 2
log = logging.getLogger("mpidd")


class UsageError(ValueError):
    """Bad input, refused before training with one line."""


def cnn_config(args) -> CNNConfig:
    return CNNConfig(arch=args.arch, width=args.width, depth=args.depth, convs_per_block=args.convs_per_block,
                     hidden=args.hidden, head_pool=args.head_pool, dropout=args.dropout,
                     batchnorm=args.batchnorm, blocks_per_stage=args.blocks_per_stage)


def work_of(args) -> dict:
    """What this run trains: the local phase (+ coarse), which coherent inits, the global CNN."""
    coherent = {"compare": ["random", "pretrained"], "coherent": [args.init]}.get(args.mode, [])
    local = args.mode in ("twolevel", "compare") or ("pretrained" in coherent and args.from_run is None)
    return {"local": local, "coherent": coherent, "global": args.mode in ("global", "compare"),
            "boxes": args.mode not in ("global", "width"), "width": args.mode == "width"}


def cnn_options(args) -> TrainOptions:
    return TrainOptions(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                        optimizer=args.optimizer, momentum=args.momentum,
                        weight_decay=args.weight_decay, schedule=args.schedule)


def coarse_options(args) -> TrainOptions:
    return TrainOptions(epochs=args.coarse_epochs, batch_size=args.coarse_batch_size,
                        lr=args.coarse_lr, optimizer="adam", schedule="cosine", select_best=True)


def coherent_options(args, init) -> TrainOptions:
    return TrainOptions(epochs=args.coherent_epochs, batch_size=args.batch_size,
                        lr=args.coherent_lr if init == "random" else args.transfer_lr,
                        optimizer=args.optimizer, momentum=args.momentum, weight_decay=args.weight_decay,
                        schedule=args.schedule, log_interval=args.log_interval)


# Keys of config.json that shape the local CNNs and the coarse DNN, by family (with their
# defaults for runs written before the key existed): a --from run must agree on all of them.
MODEL_KEYS = {"grid": None, "overlap": None, "arch": "vgg", "width": None, "depth": None,
              "batchnorm": None, "coarse_hidden": None}
FAMILY_KEYS = {"vgg": {"convs_per_block": None, "hidden": None, "head_pool": None},
               "resnet": {"blocks_per_stage": 2}}


def check_pretrained_run(args, info, dec, cfg, width_factor):
    """--from RUN_DIR: refuse (UsageError) unless its checkpoints fit this run's models."""
    run = args.from_run
    config_path = os.path.join(run, "config.json")
    if not os.path.isfile(config_path):
        raise UsageError(f"--from {run}: no config.json there (not an mpidd run directory?)")
    try:
        with open(config_path) as f:
            earlier = json.load(f)
    except ValueError as e:
        raise UsageError(f"--from {run}: config.json is not valid JSON ({e})") from None
    for key, default in {**MODEL_KEYS, **FAMILY_KEYS[args.arch]}.items():
        if key == "coarse_hidden" and args.dnn_init == "random":
            continue  # a fresh DNN may have other layers
        mine, theirs = getattr(args, key), earlier.get(key, default)
        if isinstance(mine, tuple) and isinstance(theirs, list):
            theirs = tuple(theirs)
        if mine != theirs:
            raise UsageError(f"--from {run}: it was trained with --{key.replace('_', '-')} {theirs}, "
                             f"this run has {mine}: use the same model options")
    files = [f"local_{i}.pt" for i in range(dec.num_subdomains)]
    files += ["coarse_dnn.pt"] if args.dnn_init == "coarse" else []
    missing = [f for f in files if not os.path.isfile(os.path.join(run, "checkpoints", f))]
    if missing:
        raise UsageError(f"--from {run}: missing checkpoints/{', '.join(missing)} (did that run finish "
                         f"its local phase?)")
    C, K = info.channels, info.num_classes
    for i in range(dec.num_subdomains):
        state = load_checkpoint(run, f"local_{i}.pt")
        box, wf = state.get("box"), state.get("width_factor")
        if box is None or tuple(map(tuple, box)) != tuple(map(tuple, dec.box(i))) or \
                not isinstance(wf, float) or abs(wf - width_factor) > 1e-9:
            raise UsageError(f"--from {run}: local_{i}.pt has box {box} and width factor {wf}, "
                             f"this run needs {dec.box(i)} and {width_factor}")
        fit_checkpoint(build_cnn(C, K, dec.subimage_shape, cfg, width_factor), state, run, f"local_{i}.pt")
    if args.dnn_init == "coarse":
        fit_checkpoint(CoarseDNN(dec.num_subdomains * K, K, args.coarse_hidden),
                       load_checkpoint(run, "coarse_dnn.pt"), run, "coarse_dnn.pt")


def load_checkpoint(run, name) -> dict:
    """A checkpoint of an mpidd run (weights only: no code in a pickle runs); UsageError if unreadable."""
    path = os.path.join(run, "checkpoints", name)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign file: torch raises pickle, zip or EOF errors
        raise UsageError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(state, dict) or "model" not in state:
        raise UsageError(f"checkpoint {path} holds no model state: not an mpidd checkpoint")
    return state


def fit_checkpoint(model, state, run, name):
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, TypeError, AttributeError) as e:
        raise UsageError(f"--from {run}: {name} does not fit this run's model ({str(e).splitlines()[0]})") from None
    return model


def plan_run(args, size: int) -> dict:
    """Validate everything that can be checked before training (rank 0 only); raise UsageError."""
    try:
        info = data.inspect(args.data)
    except data.DataError as e:
        msg = str(e)
        if not os.path.exists(args.data) and args.data == DEMO_DATA:
            msg += ("; create it from Fashion-MNIST with `python -m data_prep.fashion_mnist` "
                    "(or `make data`), or pass --data FILE")
        raise UsageError(msg) from None
    try:
        # --mode width cuts channels, not the image: one "subdomain", the whole image (any --grid ignored)
        grid = (1,) * len(info.spatial_shape) if args.mode == "width" else parse_grid(args.grid)
        dec = Decomposition(info.spatial_shape, grid, 0 if args.mode == "width" else args.overlap)
        if args.mode not in ("global", "width"):
            subdomains_of_rank(0, size, dec.num_subdomains)
    except DecompositionError as e:
        raise UsageError(str(e)) from None
    if args.mode == "global" and size > 1:
        raise UsageError(f"--mode global trains one CNN on rank 0: run it on 1 rank, not {size}")
    if args.mode == "width" and size > args.subnets:
        raise UsageError(f"{size} ranks but only {args.subnets} sub-networks: run with at most {args.subnets} "
                         f"ranks (mpirun -n {args.subnets}) or raise --subnets")
    if os.path.exists(args.out) and not args.overwrite:
        raise UsageError(f"output directory {args.out} exists: choose another --out or pass --overwrite")
    if args.from_run is not None and os.path.abspath(args.from_run) == os.path.abspath(args.out):
        raise UsageError(f"--from {args.from_run} is also --out: write the new run somewhere else")
    cfg = cnn_config(args)
    C, K = info.channels, info.num_classes
    wf = args.width_factor or (1.0 if args.mode == "width" else  # (local CNNs only)
                               local_width_factor(C, K, info.spatial_shape, dec.subimage_shape, dec.num_subdomains, cfg))
    if args.from_run is not None:
        check_pretrained_run(args, info, dec, cfg, wf)
    subnet_params = None
    if args.mode == "width":
        try:
            subnet_params = count_parameters(build_subnet(C, K, info.spatial_shape, cfg, args.subnets))
        except WidthError as e:
            raise UsageError(str(e)) from None
        if args.shard and info.sizes["train"] < 2 * args.subnets:
            raise UsageError(f"--shard: {info.sizes['train']} training images cannot make {args.subnets} shards "
                             f"of 2 or more: drop --shard or lower --subnets")
    return {
        "subnet_params": subnet_params,
        "info": info, "decomposition": dec, "width_factor": wf, "work": work_of(args),
        "dnn_params": count_parameters(CoarseDNN(dec.num_subdomains * K, K, args.coarse_hidden)),
        "local_params": count_parameters(build_cnn(C, K, dec.subimage_shape, cfg, wf)),
        "global_params": count_parameters(build_cnn(C, K, info.spatial_shape, cfg)),
    }


def start(comm, argv):
    """Rank 0 parses and validates, then every rank gets (args, plan) or the reason to stop."""
    def decide():
        try:
            args = parse_args(argv)
            if args.out is None:
                args.out = os.path.join("runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
            return "run", args, plan_run(args, comm.Get_size())
        except SystemExit as e:  # --help, or argparse's own usage error (already printed)
            return "exit", e.code or 0, None
        except (ConfigError, UsageError) as e:
            print_error(e)
            return "exit", EXIT_USAGE, None

    kind, args, plan = parallel.root_decides(comm, decide)
    if kind == "exit":
        sys.exit(args)
    return args, plan


class Phases:
    """Wall and CPU seconds per phase of this rank (CPU: process time, all threads)."""

    def __init__(self):
        self.seconds = {}

    @contextmanager
    def __call__(self, name):
        w, c = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - w, time.process_time() - c)

    def add(self, name, wall_s, cpu_s):
        """Count seconds measured elsewhere (e.g. the part of a phase spent in training steps)."""
        entry = self.seconds.setdefault(name, {"wall_s": 0.0, "cpu_s": 0.0})
        entry["wall_s"] += wall_s
        entry["cpu_s"] += cpu_s


def curve_seconds(history):
    """(wall, CPU) seconds of the test-accuracy curve's evaluations in a training history."""
    return (sum(r.get("curve_seconds", 0.0) for r in history), sum(r.get("curve_cpu_seconds", 0.0) for r in history))


def seconds(stats, kind, *names):
    """Sum of `kind` ("cpu_s" or "wall_s") over phases `names` of one rank's gathered stats."""
    return sum(stats["phases"].get(n, {}).get(kind, 0.0) for n in names)


def setup_logging(out, rank):
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    handler = logging.FileHandler(os.path.join(out, "logs", f"rank{rank}.log"), mode="w")
    handler.setFormatter(logging.Formatter(f"%(asctime)s rank {rank} %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False


def progress(name, master_process, epochs, models_after=0):
    """Per-epoch (and per-interval) progress: to the rank's log, and to stdout on rank 0.
    The ETA covers this rank's remaining models too (`models_after` more of the same size)."""
    def report(r):
        if "seconds" in r:
            r = dict(r, eta_s=r["eta_s"] + models_after * epochs * r["seconds"])
        where = f"batch {r['batch']}/{r['batches']} " if "batch" in r else ""
        # the coherent model's loss is known on rank 0 only (other ranks log NaN: leave it out)
        scores = "" if r["loss"] != r["loss"] else f"loss {r['loss']:.4f} acc {100 * r['acc']:.2f}% "
        if "batch" not in r and r["val_acc"] == r["val_acc"]:
            scores += f"val {100 * r['val_acc']:.2f}% "
        text = (f"{name}: epoch {r['epoch']}/{epochs} {where}{scores}{r['images_per_s']:.0f} img/s "
                f"ETA {datetime.timedelta(seconds=round(r['eta_s']))}")
        log.info(text)
        if master_process:
            print(text, flush=True)
    return report


def load_local_data(args, plan, mine, phases):
    """Phase load: read this rank's subimage boxes (train/val/test) and nothing else.

    All of the rank's subdomains are read before any training, so bad data (NaN, inf) is
    refused before training starts; memory is this rank's share of the data set.
    """
    dec = plan["decomposition"]
    subsets, bytes_read = {}, 0
    with phases("load"):
        for i in mine:
            subsets[i] = {}
            for s in data.SPLITS:
                x, y, nbytes = data.load_split(args.data, s, dec.slices(i), block=args.read_block)
                subsets[i][s] = (x, y)
                bytes_read += nbytes
    return subsets, bytes_read


def train_local_models(args, plan, subsets, phases, master_process):
    """Phase local: train each local CNN of this rank, then its class probabilities.

    No communication. Returns ({subdomain: {split: (n, K) probs}}, metric rows, {subdomain: model}).
    """
    info, dec = plan["info"], plan["decomposition"]
    cfg, opts = cnn_config(args), cnn_options(args)
    probs, rows, models = {}, [], {}
    for k, (i, split) in enumerate(subsets.items()):
        with phases("local"), phases(f"subdomain_{i}"):
            seed = derive_seed(args.seed, 0, i)
            torch.manual_seed(seed)
            model = build_cnn(info.channels, info.num_classes, dec.subimage_shape, cfg, plan["width_factor"])
            history, optimizer = train_classifier(
                model, split["train"], split["val"], opts, seed,
                progress(f"local {i} {dec.coords(i)}", master_process, opts.epochs, len(subsets) - k - 1))
            probs[i] = {s: predict_proba(model, split[s][0], args.eval_batch_size) for s in data.SPLITS}
        rows += [dict(r, model=f"local_{i}") for r in history]
        rundir.save_checkpoint(os.path.join(args.out, "checkpoints", f"local_{i}.pt"),
                               model=model.state_dict(), optimizer=optimizer.state_dict(),
                               epoch=opts.epochs, subdomain=i, box=dec.box(i),
                               width_factor=plan["width_factor"], args=vars(args))
        models[i] = model
    return probs, rows, models


def coarse_phase(args, plan, gathered, labels, master_process):
    """Rank 0: coarse DNN (selected on val), average and vote on the gathered probabilities."""
    N, K = plan["decomposition"].num_subdomains, plan["info"].num_classes
    opts = coarse_options(args)
    dnn, history = combine.train_coarse_dnn(
        (gathered["train"], labels["train"]), (gathered["val"], labels["val"]), K,
        args.coarse_hidden, args.coarse_dropout, opts, args.seed,
        progress("coarse DNN", master_process, opts.epochs))
    acc = {"cnn_dnn": {}, "average": {}, "vote": {}, "local": {i: {} for i in range(N)}}
    for s in ("val", "test"):
        p, y = gathered[s].reshape(-1, N, K), labels[s]
        acc["cnn_dnn"][s] = evaluate(dnn, gathered[s], y)[1]
        acc["average"][s] = combine.accuracy(combine.average_vote(p), y)
        acc["vote"][s] = combine.accuracy(combine.majority_vote(p), y)
        for i in range(N):
            acc["local"][i][s] = combine.accuracy(p[:, i].argmax(1), y)
    rundir.save_checkpoint(os.path.join(args.out, "checkpoints", "coarse_dnn.pt"),
                           model=dnn.state_dict(), in_features=N * K, num_classes=K,
                           hidden=list(args.coarse_hidden), dropout=args.coarse_dropout,
                           epoch=max(history, key=lambda r: r["val_acc"])["epoch"], args=vars(args))
    return acc, [dict(r, model="coarse_dnn") for r in history], dnn


def load_pretrained(args, plan, mine, master_process):
    """--from RUN_DIR: this rank's trained local CNNs (and, on rank 0, the coarse DNN)."""
    info, dec = plan["info"], plan["decomposition"]
    run, C, K = args.from_run, info.channels, info.num_classes
    local = {i: fit_checkpoint(build_cnn(C, K, dec.subimage_shape, cnn_config(args), plan["width_factor"]),
                               load_checkpoint(run, f"local_{i}.pt"), run, f"local_{i}.pt") for i in mine}
    dnn = None
    if master_process and args.dnn_init == "coarse":
        dnn = fit_checkpoint(CoarseDNN(dec.num_subdomains * K, K, args.coarse_hidden, args.coarse_dropout),
                             load_checkpoint(run, "coarse_dnn.pt"), run, "coarse_dnn.pt")
    return {"local": local, "dnn": dnn}


def coherent_phase(args, plan, init, subsets, labels, exchange, pretrained, master_process):
    """The CNN-DNN trained as one model parallel model: from random weights, or from the
    pre-trained local CNNs (transfer learning) and the coarse DNN (--dnn-init coarse).

    Collective: every rank takes part. Returns (accuracies on rank 0 else None, metric rows,
    timing of the training steps and their exchange)."""
    info, dec = plan["info"], plan["decomposition"]
    N, K = dec.num_subdomains, info.num_classes
    name = f"coherent_{init}"
    if init == "random":
        local = {}
        for i in subsets:
            torch.manual_seed(derive_seed(args.seed, 3, i))
            local[i] = build_cnn(info.channels, K, dec.subimage_shape, cnn_config(args), plan["width_factor"])
    else:
        local = {i: copy.deepcopy(m) for i, m in pretrained["local"].items()}
    dnn = None
    if master_process:
        if init == "pretrained" and args.dnn_init == "coarse":
            dnn = copy.deepcopy(pretrained["dnn"])
        else:
            torch.manual_seed(derive_seed(args.seed, 4))
            dnn = CoarseDNN(N * K, K, args.coarse_hidden, args.coarse_dropout)
    opts = coherent_options(args, init)
    images = {split: {i: s[split][0] for i, s in subsets.items()} for split in data.SPLITS}
    history, optimizer, timing = train_coherent(
        local, dnn, images["train"], labels["train"], images["val"], labels["val"], opts,
        derive_seed(args.seed, 5), exchange=exchange, output=args.exchange,
        eval_batch_size=args.eval_batch_size, log=progress(COHERENT_NAMES[init], master_process, opts.epochs))
    test = evaluate_coherent(local, dnn, images["test"], labels["test"], exchange=exchange,
                             output=args.exchange, batch_size=args.eval_batch_size)
    for i, model in local.items():
        rundir.save_checkpoint(os.path.join(args.out, "checkpoints", f"{name}_local_{i}.pt"),
                               model=model.state_dict(), epoch=opts.epochs, subdomain=i, box=dec.box(i),
                               width_factor=plan["width_factor"], exchange=args.exchange, args=vars(args))
    rundir.save_checkpoint(os.path.join(args.out, "checkpoints", f"{name}_rank{exchange.rank}_optimizer.pt"),
                           optimizer=optimizer.state_dict(), subdomains=sorted(local), epoch=opts.epochs)
    if not master_process:
        return None, [], timing
    rundir.save_checkpoint(os.path.join(args.out, "checkpoints", f"{name}_dnn.pt"), model=dnn.state_dict(),
                           in_features=N * K, num_classes=K, hidden=list(args.coarse_hidden),
                           dropout=args.coarse_dropout, exchange=args.exchange, epoch=opts.epochs,
                           args=vars(args))
    acc = {"val": history[-1]["val_acc"], "test": test[1]}
    return acc, [dict(r, model=name) for r in history], timing


def load_whole_images(args, info, phases):
    """Rank 0: every split's whole images, for the global CNN; returns (splits, bytes_read)."""
    whole = tuple(slice(0, s) for s in info.spatial_shape)
    split, nbytes = {}, 0
    with phases("global_load"):
        for s in data.SPLITS:
            x, y, n = data.load_split(args.data, s, whole, block=args.read_block)
            split[s], nbytes = (x, y), nbytes + n
    return split, nbytes


def global_phase(args, plan, split, phases, master_process, test=False):
    """Rank 0: the global CNN on whole images, same family and options as the local CNNs.
    Returns ({split: accuracy}, metric rows), or with `test` ({split: (loss, accuracy)},
    metric rows, history with every epoch's test accuracy)."""
    info = plan["info"]
    seed = derive_seed(args.seed, 2)
    torch.manual_seed(seed)
    model = build_cnn(info.channels, info.num_classes, info.spatial_shape, cnn_config(args))
    opts = cnn_options(args)
    opts.log_interval, opts.test_points = args.log_interval, args.curve_points
    with phases("global_train"):
        history, optimizer = train_classifier(model, split["train"], split["val"], opts, seed,
                                              progress("global CNN", master_process, opts.epochs),
                                              test=split["test"] if test else None)
    if test:
        phases.add("global_curve", *curve_seconds(history))
    with phases("global_eval"):
        scores = {s: evaluate(model, *split[s], args.eval_batch_size) for s in ("val", "test")}
    rundir.save_checkpoint(os.path.join(args.out, "checkpoints", "global.pt"),
                           model=model.state_dict(), optimizer=optimizer.state_dict(),
                           epoch=opts.epochs, args=vars(args))
    rows = [dict(r, model="global") for r in history]
    if test:
        return scores, rows, history
    return {s: acc for s, (_, acc) in scores.items()}, rows


def train_subnets(args, plan, whole, mine, phases, master_process):
    """--mode width, phase subnets: train this rank's sub-networks on whole images, then score
    them on val and test. No communication. Returns ({m: state_dict}, {m: scores}, metric rows)."""
    info, M = plan["info"], args.subnets
    opts = cnn_options(args)
    opts.epochs = args.subnet_epochs
    x, y = whole["train"]
    states, scores, rows = {}, {}, []
    for k, m in enumerate(mine):
        with phases("subnets"), phases(f"subnet_{m}"):
            seed = derive_seed(args.seed, 6, m)
            torch.manual_seed(seed)
            model = build_subnet(info.channels, info.num_classes, info.spatial_shape, cnn_config(args), M)
            train = (x[m::M], y[m::M]) if args.shard else (x, y)
            history, optimizer = train_classifier(
                model, train, whole["val"], opts, seed,
                progress(f"subnet {m}", master_process, opts.epochs, len(mine) - k - 1))
        # the training steps alone (no validation), for the time to the target accuracy
        phases.add("subnet_steps", sum(r["seconds"] for r in history), sum(r["cpu_seconds"] for r in history))
        with phases("subnet_eval"):  # for the table only: not on the recomposed network's path
            scores[m] = {s: evaluate(model, *whole[s], args.eval_batch_size) for s in ("val", "test")}
        rows += [dict(r, model=f"subnet_{m}") for r in history]
        rundir.save_checkpoint(os.path.join(args.out, "checkpoints", f"subnet_{m}.pt"),
                               model=model.state_dict(), optimizer=optimizer.state_dict(), epoch=opts.epochs,
                               subnet=m, subnets=M, shard=args.shard, train_samples=len(train[1]),
                               args=vars(args))
        states[m] = model.state_dict()
    return states, scores, rows


def width_phases(comm, args, plan, whole, mine, phases, master_process):
    """--mode width (Gu, Zhang, Liu & Cai 2022): sub-networks in parallel, their weights
    gathered to rank 0 and recomposed into the global CNN, which is trained further; then
    the same global CNN from random weights for comparison (rank 0; the others sleep).
    Collective. Returns (scores on rank 0 else None, metric rows)."""
    info, M = plan["info"], args.subnets
    C, K, shape, cfg = info.channels, info.num_classes, info.spatial_shape, cnn_config(args)
    states, sub_scores, rows = train_subnets(args, plan, whole, mine, phases, master_process)
    with phases("wait"):
        parallel.sleepy_barrier(comm)  # so that width_gather times the exchange, not the slowest rank
    with phases("width_gather"):
        gathered = parallel.gather_to_root(comm, (states, sub_scores))
    if not master_process:
        return None, rows
    states = {m: st for part, _ in gathered for m, st in part.items()}
    scores = {"subnets": {m: sc for _, part in gathered for m, sc in part.items()}}
    with phases("recompose"):
        subnets = []
        for m in range(M):
            subnets.append(build_subnet(C, K, shape, cfg, M))
            subnets[m].load_state_dict(states[m])
        torch.manual_seed(derive_seed(args.seed, 7))
        model = recompose(subnets, build_cnn(C, K, shape, cfg), args.offdiag_noise, derive_seed(args.seed, 8))
    rundir.save_checkpoint(os.path.join(args.out, "checkpoints", "recomposed_initial.pt"), model=model.state_dict(),
                           subnets=M, offdiag_noise=args.offdiag_noise, epoch=0, args=vars(args))
    with phases("recomposed_initial_eval"):
        scores["recomposed_initial"] = {s: evaluate(model, *whole[s], args.eval_batch_size) for s in ("val", "test")}
    opts = cnn_options(args)
    opts.lr, opts.log_interval, opts.test_points = args.transfer_lr, args.log_interval, args.curve_points
    seed = derive_seed(args.seed, 9)
    with phases("recomposed_train"):
        history, optimizer = train_classifier(model, whole["train"], whole["val"], opts, seed,
                                              progress("recomposed", master_process, opts.epochs, 1),
                                              test=whole["test"])
    phases.add("recomposed_curve", *curve_seconds(history))
    with phases("recomposed_eval"):
        scores["recomposed"] = {s: evaluate(model, *whole[s], args.eval_batch_size) for s in ("val", "test")}
    scores["recomposed_curve"] = history
    rows += [dict(r, model="recomposed") for r in history]
    rundir.save_checkpoint(os.path.join(args.out, "checkpoints", "recomposed.pt"), model=model.state_dict(),
                           optimizer=optimizer.state_dict(), subnets=M, epoch=opts.epochs, args=vars(args))
    acc, global_rows, history = global_phase(args, plan, whole, phases, master_process, test=True)
    scores["global"], scores["global_curve"] = acc, history
    return scores, rows + global_rows


def print_error(message):
    print(f"mpidd.train: error: {message}", file=sys.stderr, flush=True)


def refuse(message):
    print_error(message)
    sys.exit(EXIT_USAGE)


def main(argv=None):
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    parallel.install_abort_on_error(comm)
    master_process = rank == 0
    args, plan = start(comm, argv)
    info, dec, work = plan["info"], plan["decomposition"], plan["work"]
    N, K = dec.num_subdomains, info.num_classes

    threads = args.threads or parallel.default_threads(comm)
    torch.set_num_threads(threads)
    parallel.tune_malloc()
    parallel.warm_up_torch()
    phases = Phases()
    mine = subdomains_of_rank(rank, size, N) if work["boxes"] else []
    if work["width"]:
        mine = subdomains_of_rank(rank, size, args.subnets)  # this rank's sub-networks, round robin

    # Read the data before the run directory exists, so that bad data leaves nothing behind.
    subsets, whole, bytes_boxes, bytes_whole, pretrained = {}, None, 0, 0, None
    if work["boxes"]:
        error = None
        try:
            subsets, bytes_boxes = load_local_data(args, plan, mine, phases)
        except data.DataError as e:  # e.g. NaN in this rank's box: refuse on every rank, cleanly
            error = str(e)
        failed = parallel.agree(comm, error)
        if failed and master_process:
            refuse(f"{failed[1]} (found by rank {failed[0]})")
        elif failed:
            sys.exit(EXIT_USAGE)
        if args.from_run is not None:  # rank 0 has checked that they fit (plan_run)
            with phases("load"):
                pretrained = load_pretrained(args, plan, mine, master_process)
    else:  # --mode global (one rank only, plan_run checks) or width (every rank)
        error = None
        try:
            whole, bytes_whole = load_whole_images(args, info, phases)
        except data.DataError as e:
            error = str(e)
        failed = parallel.agree(comm, error)
        if failed and master_process:
            refuse(failed[1])
        elif failed:
            sys.exit(EXIT_USAGE)

    if master_process:
        rundir.prepare(args.out)
        rundir.write_json(os.path.join(args.out, "config.json"),
                          {k: v for k, v in vars(args).items() if k not in ("config", "overwrite", "out")})
    parallel.sleepy_barrier(comm)  # the run directory exists before any rank writes into it
    setup_logging(args.out, rank)
    log.info("mpidd %s, torch %s, %s; %d ranks, %d threads; subdomains %s (boxes %s), %d bytes read",
             __version__, torch.__version__, parallel.library_version(), size, threads, mine,
             [dec.box(i) for i in mine] if work["boxes"] else "whole images", bytes_boxes + bytes_whole)
    if master_process and work["width"]:
        print(f"mpidd: {size} ranks x {threads} threads, mode width: {args.arch} global CNN of width {args.width} "
              f"({plan['global_params']:,} parameters) split into {args.subnets} sub-networks of width "
              f"{args.width // args.subnets} ({plan['subnet_params']:,} parameters each), "
              f"{'disjoint shards' if args.shard else 'full training set each'}; run directory {args.out}",
              flush=True)
    elif master_process:
        print(f"mpidd: {size} ranks x {threads} threads, mode {args.mode}, grid {format_grid(dec.grid)} "
              f"overlap {dec.overlap}, subimages {format_grid(dec.subimage_shape)}, {args.arch} local width "
              f"factor {plan['width_factor']:g} ({plan['local_params']:,} vs {plan['global_params']:,} "
              f"global parameters); run directory {args.out}", flush=True)
    if master_process and size > 1 and (work["boxes"] or work["width"]):
        print(f"progress below is rank 0's; every rank logs its own to {args.out}/logs/rank<r>.log", flush=True)

    rows, accuracies, coherent_timing = [], {}, {}
    if work["width"]:
        accuracies, rows = width_phases(comm, args, plan, whole, mine, phases, master_process)
        whole = None
    labels = {s: y for s, (_, y) in subsets[mine[0]].items()} if subsets else None
    if work["local"]:
        probs, rows, local_models = train_local_models(args, plan, subsets, phases, master_process)
        with phases("wait"):
            parallel.sleepy_barrier(comm)  # so that "gather" times the exchange, not the slowest rank
        with phases("gather"):
            gathered = {s: parallel.gather_probabilities(comm, {i: probs[i][s] for i in mine}, N,
                                                         info.sizes[s], K) for s in data.SPLITS}
        dnn = None
        if master_process:
            with phases("coarse"):
                accuracies, coarse_rows, dnn = coarse_phase(args, plan, gathered, labels, master_process)
            rows += coarse_rows
        pretrained = {"local": local_models, "dnn": dnn}
    if work["coherent"]:
        # ranks that share cores sleep while they wait for the exchange; ranks with cores of
        # their own spin in MPI_Wait (lowest latency)
        exchange = parallel.ModelParallelExchange(
            comm, mine, N, K, poll_interval=1e-4 if parallel.oversubscribed(comm, threads) else None)
        for init in work["coherent"]:
            with phases("wait"):
                parallel.sleepy_barrier(comm)  # all ranks start together: no rank's phase holds the wait
            with phases(f"coherent_{init}"):
                acc, coherent_rows, coherent_timing[init] = coherent_phase(
                    args, plan, init, subsets, labels, exchange, pretrained, master_process)
            if master_process:
                accuracies[f"coherent_{init}"] = acc
                rows += coherent_rows
    del subsets
    if work["global"] and master_process:
        if whole is None:  # --mode compare: the local phase has already checked every pixel
            whole, bytes_whole = load_whole_images(args, info, phases)
        accuracies["global"], global_rows = global_phase(args, plan, whole, phases, master_process)
        rows += global_rows
        del whole
    parallel.sleepy_barrier(comm)  # other ranks sleep, not spin, while rank 0 works

    stats = {"rank": rank, "host": socket.gethostname(), "threads": threads, "subdomains": mine,
             "bytes_read": bytes_boxes + bytes_whole, "bytes_read_boxes": bytes_boxes,
             "bytes_read_whole_images": bytes_whole, "peak_rss_bytes": parallel.peak_rss_bytes(),
             "phases": phases.seconds, "coherent": coherent_timing}
    gathered_reports = parallel.gather_to_root(comm, (stats, rows))
    if master_process:
        all_stats = [st for st, _ in gathered_reports]
        all_rows = [r for _, rs in gathered_reports for r in rs]
        if work["width"]:
            results = assemble_width_results(args, plan, all_stats, accuracies, size, threads)
        else:
            results = assemble_results(args, plan, all_stats, accuracies, size, threads)
        rundir.write_json(os.path.join(args.out, "results.json"), results)
        rundir.write_metrics(os.path.join(args.out, "metrics.csv"), all_rows)
        print(format_any(results), flush=True)
        print(f"results: {os.path.join(args.out, 'results.json')}", flush=True)
    return 0



def assemble_results(args, plan, all_stats, acc, size, threads) -> dict:
    """results.json. Every model's `cpu_s` is its critical path (max over ranks of the CPU
    seconds of the phases it needs, in order) and `total_cpu_s` the sum over ranks."""
    info, dec = plan["info"], plan["decomposition"]
    N = dec.num_subdomains

    def critical(*names):
        return max(seconds(st, "cpu_s", *names) for st in all_stats)

    def total(*names):
        return sum(seconds(st, "cpu_s", *names) for st in all_stats)

    models, timing = [], {}
    composite_params = N * plan["local_params"] + plan["dnn_params"]
    if "cnn_dnn" in acc:
        owner = {i: st["rank"] for st in all_stats for i in st["subdomains"]}
        for i in range(N):  # cpu_s: training + probabilities of this subdomain's CNN
            cpu = seconds(all_stats[owner[i]], "cpu_s", f"subdomain_{i}")
            models.append({"name": f"local {i} {dec.coords(i)}", "kind": "local", "subdomain": i,
                           "rank": owner[i], "params": plan["local_params"], "cpu_s": cpu, "total_cpu_s": cpu,
                           **_accs(acc["local"][i])})
        local_cpu = [seconds(st, "cpu_s", "load", "local") for st in all_stats]
        slowest = int(np.argmax(local_cpu))
        gather_cpu = critical("gather")
        coarse_cpu = seconds(all_stats[0], "cpu_s", "coarse")
        combiners = {"cpu_s": local_cpu[slowest] + gather_cpu, "total_cpu_s": total("load", "local", "gather")}
        models.append({"name": "average", "kind": "average", **combiners, **_accs(acc["average"])})
        models.append({"name": "majority vote", "kind": "vote", **combiners, **_accs(acc["vote"])})
        timing["critical_path"] = {
            "cpu_s": local_cpu[slowest] + gather_cpu + coarse_cpu,
            "wall_s": max(seconds(st, "wall_s", "load", "local") for st in all_stats)
                      + max(seconds(st, "wall_s", "gather") for st in all_stats)
                      + seconds(all_stats[0], "wall_s", "coarse"),
            "slowest_rank": slowest, "local_cpu_s": local_cpu[slowest],
            "gather_cpu_s": gather_cpu, "coarse_cpu_s": coarse_cpu,
            "definition": "max over ranks of (load + local) + gather + coarse; CPU = process time"}
        timing["total_cpu_s_twolevel"] = total("load", "local", "gather") + coarse_cpu
        models.append({"name": "CNN-DNN", "kind": "cnn_dnn", "params": composite_params,
                       "dnn_params": plan["dnn_params"], "cpu_s": timing["critical_path"]["cpu_s"],
                       "total_cpu_s": timing["total_cpu_s_twolevel"], **_accs(acc["cnn_dnn"])})
    for init, name in COHERENT_NAMES.items():
        if f"coherent_{init}" not in acc:
            continue
        phase = f"coherent_{init}"
        if init == "pretrained" and "critical_path" in timing:  # after this run's local + coarse phases
            cpu, cpu_total = timing["critical_path"]["cpu_s"] + critical(phase), timing["total_cpu_s_twolevel"] + total(phase)
        else:  # from random weights, or from an earlier run's (--from) checkpoints
            cpu, cpu_total = critical("load", phase), total("load", phase)
        per_rank = [st["coherent"][init] for st in all_stats]
        timing[phase] = {
            "critical_path_cpu_s": cpu, "total_cpu_s": cpu_total,
            "phase_wall_s": max(seconds(st, "wall_s", phase) for st in all_stats),
            "steps": per_rank[0]["steps"], "batch_size": args.batch_size,
            "exchange_fraction_max": max(t["exchange_fraction"] for t in per_rank),
            "exchange_cpu_fraction_max": max(t["exchange_cpu_fraction"] for t in per_rank),
            **{f"{name}_per_rank": [t[key] for t in per_rank] for name, key in (
                ("exchange_fraction", "exchange_fraction"), ("exchange_cpu_fraction", "exchange_cpu_fraction"))},
            **{f"{name}_per_rank": [scale * t[key] / t["steps"] for t in per_rank] for name, key, scale in (
                ("exchange_ms_per_step", "exchange_s", 1e3), ("exchange_cpu_ms_per_step", "exchange_cpu_s", 1e3),
                ("step_ms", "step_s", 1e3), ("step_cpu_ms", "step_cpu_s", 1e3),
                ("bytes_per_step", "exchange_bytes", 1))},
            "definition": "exchange_fraction: wall time in the gather of local outputs and the scatter of "
                          "their gradients, waits for slower ranks included, / wall time of the training "
                          "steps; exchange_cpu_fraction: the same with CPU (process) time, which the "
                          "sleeping waits do not use"}
        if init == "pretrained":
            timing[phase]["pretrained_from"] = args.from_run or "this run"
        models.append({"name": name, "kind": phase, "params": composite_params, "cpu_s": cpu,
                       "total_cpu_s": cpu_total, **_accs(acc[phase])})
    if "global" in acc:
        g = all_stats[0]["phases"]["global_train"]
        timing["global_train_cpu_s"], timing["global_train_wall_s"] = g["cpu_s"], g["wall_s"]
        cpu = seconds(all_stats[0], "cpu_s", "global_load", "global_train", "global_eval")
        models.append({"name": "global CNN", "kind": "global", "params": plan["global_params"],
                       "cpu_s": cpu, "total_cpu_s": cpu, **_accs(acc["global"])})
        if "critical_path" in timing:
            timing["global_over_critical_path"] = g["cpu_s"] / timing["critical_path"]["cpu_s"]
    return {
        **common_results(args, plan, all_stats, size, threads),
        "decomposition": {"grid": format_grid(dec.grid), "overlap": dec.overlap,
                          "image_shape": format_grid(info.spatial_shape),
                          "subimage_shape": format_grid(dec.subimage_shape),
                          "num_subdomains": N, "boxes": dec.boxes(),
                          "rank_of_subdomain": ([rank_of_subdomain(i, size) for i in range(N)]
                                                if plan["work"]["boxes"] else [])},
        "width_factor": plan["width_factor"],
        "accuracy": {m["name"]: {"val": m.get("val_acc"), "test": m.get("test_acc")} for m in models},
        "models": models,
        "parameters": {"local": plan["local_params"], "global": plan["global_params"],
                       "coarse_dnn": plan["dnn_params"]},
        "timing": timing,
    }


def common_results(args, plan, all_stats, size, threads) -> dict:
    """The part of results.json that every mode writes: data, ranks, versions, configuration."""
    info = plan["info"]
    return {
        "mpidd_version": __version__, "data": args.data, "classes": info.classes,
        "sizes": info.sizes, "world_size": size, "threads_per_rank": threads, "mode": args.mode,
        "arch": args.arch,
        "per_rank": all_stats,
        "versions": {"mpi_library": parallel.library_version(), "mpi4py": mpi4py.__version__,
                     "torch": torch.__version__, "h5py": h5py.__version__, "numpy": np.__version__,
                     "python": sys.version.split()[0]},
        "config": {k: v for k, v in vars(args).items() if k not in ("config",)},
    }


def time_to_accuracy(history, target, offset=0.0, initial_acc=None):
    """CPU seconds (training steps only, evaluations excluded) until the first point of the
    test-accuracy curve (`--curve-points` per epoch) that reaches `target`, plus `offset`;
    epoch 0 (`offset` alone) if `initial_acc`, the accuracy before training, already does;
    None if no point does."""
    if initial_acc is not None and initial_acc >= target:
        return {"cpu_s": offset, "epoch": 0}
    for point in (p for record in history for p in record["curve"]):
        if point["test_acc"] >= target:
            return {"cpu_s": offset + point["cpu_s"], "epoch": point["epoch"]}
    return None


def assemble_width_results(args, plan, all_stats, scores, size, threads) -> dict:
    """results.json of --mode width. Critical path (`cpu_s`) of the recomposed network: max over
    ranks of (load + its sub-networks' training) + gather + recompose (+ further training); of
    the global CNN from random init: rank 0's load + training. `total_cpu_s` sums over ranks.
    Training includes its per-epoch validation; the final scoring of each model and the
    test-accuracy curve's evaluations are left out."""
    M, root = args.subnets, all_stats[0]
    owner = {m: st["rank"] for st in all_stats for m in st["subdomains"]}
    models = []
    for m in range(M):
        cpu = seconds(all_stats[owner[m]], "cpu_s", f"subnet_{m}")
        models.append({"name": f"subnet {m}", "kind": "subnet", "subnet": m, "rank": owner[m],
                       "params": plan["subnet_params"], "cpu_s": cpu, "total_cpu_s": cpu,
                       **_scores(scores["subnets"][m])})
    parallel_cpu = max(seconds(st, "cpu_s", "global_load", "subnets") for st in all_stats)
    gather_cpu = max(seconds(st, "cpu_s", "width_gather") for st in all_stats)
    before = parallel_cpu + gather_cpu + seconds(root, "cpu_s", "recompose")
    total_before = sum(seconds(st, "cpu_s", "global_load", "subnets", "width_gather") for st in all_stats) \
        + seconds(root, "cpu_s", "recompose")
    trained = seconds(root, "cpu_s", "recomposed_train") - seconds(root, "cpu_s", "recomposed_curve")
    global_cpu = seconds(root, "cpu_s", "global_load", "global_train") - seconds(root, "cpu_s", "global_curve")
    # time to the target: training steps only on both sides (no validation, no curve evaluations)
    steps_before = max(seconds(st, "cpu_s", "global_load", "subnet_steps") for st in all_stats) \
        + gather_cpu + seconds(root, "cpu_s", "recompose")
    models.append({"name": "recomposed (before training)", "kind": "recomposed_initial",
                   "params": plan["global_params"], "cpu_s": before, "total_cpu_s": total_before,
                   **_scores(scores["recomposed_initial"])})
    models.append({"name": f"recomposed + {args.epochs} epochs", "kind": "recomposed",
                   "params": plan["global_params"], "cpu_s": before + trained,
                   "total_cpu_s": total_before + trained, **_scores(scores["recomposed"])})
    models.append({"name": f"global CNN (random init, {args.epochs} ep.)", "kind": "global",
                   "params": plan["global_params"], "cpu_s": global_cpu, "total_cpu_s": global_cpu,
                   **_scores(scores["global"])})
    mean_sub_loss = float(np.mean([scores["subnets"][m]["test"][0] for m in range(M)]))
    recomposed_to = time_to_accuracy(scores["recomposed_curve"], args.target_acc, steps_before,
                                     initial_acc=scores["recomposed_initial"]["test"][1])
    global_to = time_to_accuracy(scores["global_curve"], args.target_acc, seconds(root, "cpu_s", "global_load"))
    return {
        **common_results(args, plan, all_stats, size, threads),
        "width": {"subnets": M, "subnet_width": args.width // M, "global_width": args.width,
                  "shard": args.shard, "offdiag_noise": args.offdiag_noise, "subnet_epochs": args.subnet_epochs,
                  "epochs": args.epochs, "transfer_lr": args.transfer_lr, "lr": args.lr,
                  "rank_of_subnet": [owner[m] for m in range(M)]},
        "accuracy": {m["name"]: {"val": m["val_acc"], "test": m["test_acc"]} for m in models},
        "models": models,
        "parameters": {"subnet": plan["subnet_params"], "global": plan["global_params"]},
        "loss_bound": {
            "recomposed_test_loss": scores["recomposed_initial"]["test"][0], "mean_subnet_test_loss": mean_sub_loss,
            "holds": scores["recomposed_initial"]["test"][0] <= mean_sub_loss + 1e-6,
            "applies": args.offdiag_noise == 0,  # noise in the off-diagonal blocks breaks the mean-logit identity
            "statement": "cross-entropy is convex in the logits and the recomposed logits are the mean of "
                         "the sub-networks' logits (zero off-diagonal blocks), so the recomposed loss is at "
                         "most the mean of the sub-networks' losses"},
        "time_to_target": {
            "target_test_acc": args.target_acc, "recomposed": recomposed_to, "global_random_init": global_to,
            "recomposed_start_cpu_s": steps_before,
            "ratio": (recomposed_to["cpu_s"] / global_to["cpu_s"]) if recomposed_to and global_to else None,
            "curves": {name: [{k: p[k] for k in ("epoch", "cpu_s", "test_acc")}
                              for r in scores[f"{name}_curve"] for p in r["curve"]]
                       for name in ("recomposed", "global")},
            "definition": "critical-path CPU seconds until the first point of the test-accuracy curve "
                          "(--curve-points per epoch) that reaches the target: recomposed = max over ranks "
                          "(load + sub-network training steps) + gather + recompose (recomposed_start_cpu_s) "
                          "+ its training steps "
                          "(epoch 0: the recomposed network before training); random init = load + its "
                          "training steps. Evaluations (validation, curve) are left out on both sides"},
    }


def _scores(d):
    """{split: (loss, accuracy)} -> the table's columns."""
    return {"val_acc": d["val"][1], "test_acc": d["test"][1], "val_loss": d["val"][0], "test_loss": d["test"][0]}


def _accs(d):
    return {"val_acc": d["val"], "test_acc": d["test"]}


if __name__ == "__main__":
    sys.exit(main())
