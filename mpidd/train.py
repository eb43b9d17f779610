"""Two-level CNN-DNN training by domain decomposition (Klawonn, Lanser & Weber).

    mpirun -n 4 python -m mpidd.train                     # demo: 2x2 on data/fashion_mnist.h5 + global CNN
    mpirun -n 4 python -m mpidd.train --data FILE --grid 2x2 --overlap 0 --out runs/NAME
    mpirun -n 2 python -m mpidd.train --grid 2x2 ...      # P < N: rank r trains subdomains r, r+P, ...
    python -m mpidd.train --model global --out runs/g     # the global CNN baseline alone, one rank

Phases: load (each rank reads only its subimage boxes), local (train the local CNNs, then
their class probabilities for train/val/test; no communication), gather (MPI_Gatherv to
rank 0 as (n, N*K) in subdomain order), coarse (rank 0: coarse DNN, average, vote), global
(rank 0: the global CNN on whole images, for comparison). Rank 0 prints; every rank logs to
RUN/logs/rank<r>.log.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict

import h5py
import mpi4py
import numpy as np
import torch
from mpi4py import MPI

from . import __version__
from . import combine, data, parallel, rundir
from .config import DEMO_DATA, ConfigError, parse_args
from .decomposition import (Decomposition, DecompositionError, format_grid, parse_grid, rank_of_subdomain,
                            subdomains_of_rank)
from .engine import TrainOptions, derive_seed, evaluate, predict_proba, train_classifier
from .models import CNNConfig, build_cnn, count_parameters, local_width_factor
from .report import format_table

EXIT_USAGE = 2
log = logging.getLogger("mpidd")


class UsageError(ValueError):
    """Bad input, refused before training with one line."""


def cnn_config(args) -> CNNConfig:
    return CNNConfig(width=args.width, depth=args.depth, convs_per_block=args.convs_per_block,
                     hidden=args.hidden, head_pool=args.head_pool, dropout=args.dropout,
                     batchnorm=args.batchnorm)


def cnn_options(args) -> TrainOptions:
    return TrainOptions(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                        optimizer=args.optimizer, momentum=args.momentum,
                        weight_decay=args.weight_decay, schedule=args.schedule)


def coarse_options(args) -> TrainOptions:
    return TrainOptions(epochs=args.coarse_epochs, batch_size=args.coarse_batch_size,
                        lr=args.coarse_lr, optimizer="adam", schedule="cosine", select_best=True)


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
        dec = Decomposition(info.spatial_shape, parse_grid(args.grid), args.overlap)
        if args.model != "global":
            subdomains_of_rank(0, size, dec.num_subdomains)
    except DecompositionError as e:
        raise UsageError(str(e)) from None
    if args.model == "global" and size > 1:
        raise UsageError(f"--model global trains one CNN on rank 0: run it on 1 rank, not {size}")
    if os.path.exists(args.out) and not args.overwrite:
        raise UsageError(f"output directory {args.out} exists: choose another --out or pass --overwrite")
    cfg = cnn_config(args)
    C, K = info.channels, info.num_classes
    wf = args.width_factor or local_width_factor(C, K, info.spatial_shape, dec.subimage_shape,
                                                 dec.num_subdomains, cfg)
    return {
        "info": info, "decomposition": dec, "width_factor": wf,
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
            entry = self.seconds.setdefault(name, {"wall_s": 0.0, "cpu_s": 0.0})
            entry["wall_s"] += time.perf_counter() - w
            entry["cpu_s"] += time.process_time() - c


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
        if "batch" in r:
            text = (f"{name}: epoch {r['epoch']}/{epochs} batch {r['batch']}/{r['batches']} "
                    f"loss {r['loss']:.4f} acc {100 * r['acc']:.2f}% {r['images_per_s']:.0f} img/s "
                    f"ETA {datetime.timedelta(seconds=round(r['eta_s']))}")
        else:
            text = (f"{name}: epoch {r['epoch']}/{epochs} loss {r['loss']:.4f} acc {100 * r['acc']:.2f}% "
                    f"val {100 * r['val_acc']:.2f}% {r['images_per_s']:.0f} img/s "
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

    No communication. Returns ({subdomain: {split: (n, K) probs}}, metric rows).
    """
    info, dec = plan["info"], plan["decomposition"]
    cfg, opts = cnn_config(args), cnn_options(args)
    probs, rows = {}, []
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
    return probs, rows


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
    return acc, [dict(r, model="coarse_dnn") for r in history], count_parameters(dnn)


def load_whole_images(args, info, phases):
    """Rank 0: every split's whole images, for the global CNN; returns (splits, bytes_read)."""
    whole = tuple(slice(0, s) for s in info.spatial_shape)
    split, nbytes = {}, 0
    with phases("global_load"):
        for s in data.SPLITS:
            x, y, n = data.load_split(args.data, s, whole, block=args.read_block)
            split[s], nbytes = (x, y), nbytes + n
    return split, nbytes


def global_phase(args, plan, split, phases, master_process):
    """Rank 0: the global CNN on whole images, same family and options as the local CNNs."""
    info = plan["info"]
    seed = derive_seed(args.seed, 2)
    torch.manual_seed(seed)
    model = build_cnn(info.channels, info.num_classes, info.spatial_shape, cnn_config(args))
    opts = cnn_options(args)
    opts.log_interval = args.log_interval
    with phases("global_train"):
        history, optimizer = train_classifier(model, split["train"], split["val"], opts, seed,
                                              progress("global CNN", master_process, opts.epochs))
    with phases("global_eval"):
        acc = {s: evaluate(model, *split[s], args.eval_batch_size)[1] for s in ("val", "test")}
    rundir.save_checkpoint(os.path.join(args.out, "checkpoints", "global.pt"),
                           model=model.state_dict(), optimizer=optimizer.state_dict(),
                           epoch=opts.epochs, args=vars(args))
    return acc, [dict(r, model="global") for r in history]


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
    info, dec = plan["info"], plan["decomposition"]
    N, K = dec.num_subdomains, info.num_classes

    threads = args.threads or parallel.default_threads(comm)
    torch.set_num_threads(threads)
    parallel.tune_malloc()
    parallel.warm_up_torch()
    phases = Phases()
    mine = subdomains_of_rank(rank, size, N) if args.model != "global" else []

    # Read the data before the run directory exists, so that bad data leaves nothing behind.
    subsets, whole, bytes_boxes, bytes_whole = {}, None, 0, 0
    if args.model in ("twolevel", "both"):
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
    elif args.model == "global":  # one rank only (plan_run checks)
        try:
            whole, bytes_whole = load_whole_images(args, info, phases)
        except data.DataError as e:
            refuse(str(e))

    if master_process:
        rundir.prepare(args.out)
        rundir.write_json(os.path.join(args.out, "config.json"),
                          {k: v for k, v in vars(args).items() if k not in ("config", "overwrite", "out")})
    parallel.sleepy_barrier(comm)  # the run directory exists before any rank writes into it
    setup_logging(args.out, rank)
    log.info("mpidd %s, torch %s, %s; %d ranks, %d threads; subdomains %s (boxes %s), %d bytes read",
             __version__, torch.__version__, parallel.library_version(), size, threads, mine,
             [dec.box(i) for i in mine], bytes_boxes + bytes_whole)
    if master_process:
        print(f"mpidd: {size} ranks x {threads} threads, grid {format_grid(dec.grid)} overlap "
              f"{dec.overlap}, subimages {format_grid(dec.subimage_shape)}, local width factor "
              f"{plan['width_factor']:g} ({plan['local_params']:,} vs {plan['global_params']:,} "
              f"global parameters); run directory {args.out}", flush=True)
        if size > 1 and args.model != "global":
            print(f"progress below is rank 0's; every rank logs its own to {args.out}/logs/rank<r>.log",
                  flush=True)

    rows, accuracies, dnn_params = [], {}, None
    if args.model in ("twolevel", "both"):
        labels = {s: y for s, (_, y) in subsets[mine[0]].items()}
        probs, rows = train_local_models(args, plan, subsets, phases, master_process)
        del subsets
        with phases("wait"):
            parallel.sleepy_barrier(comm)  # so that "gather" times the exchange, not the slowest rank
        with phases("gather"):
            gathered = {s: parallel.gather_probabilities(comm, {i: probs[i][s] for i in mine}, N,
                                                         info.sizes[s], K) for s in data.SPLITS}
        if master_process:
            with phases("coarse"):
                accuracies, coarse_rows, dnn_params = coarse_phase(args, plan, gathered, labels, master_process)
            rows += coarse_rows
    if args.model in ("global", "both") and master_process:
        if whole is None:  # --model both: the local phase has already checked every pixel
            whole, bytes_whole = load_whole_images(args, info, phases)
        accuracies["global"], global_rows = global_phase(args, plan, whole, phases, master_process)
        rows += global_rows
        del whole
    parallel.sleepy_barrier(comm)  # other ranks sleep, not spin, while rank 0 works

    stats = {"rank": rank, "host": socket.gethostname(), "threads": threads, "subdomains": mine,
             "bytes_read": bytes_boxes + bytes_whole, "bytes_read_boxes": bytes_boxes,
             "bytes_read_whole_images": bytes_whole, "peak_rss_bytes": parallel.peak_rss_bytes(),
             "phases": phases.seconds}
    gathered_reports = parallel.gather_to_root(comm, (stats, rows))
    if master_process:
        all_stats = [st for st, _ in gathered_reports]
        all_rows = [r for _, rs in gathered_reports for r in rs]
        results = assemble_results(args, plan, all_stats, accuracies, dnn_params, size, threads)
        rundir.write_json(os.path.join(args.out, "results.json"), results)
        rundir.write_metrics(os.path.join(args.out, "metrics.csv"), all_rows)
        print(format_table(results), flush=True)
        print(f"results: {os.path.join(args.out, 'results.json')}", flush=True)
    return 0


def assemble_results(args, plan, all_stats, acc, dnn_params, size, threads) -> dict:
    info, dec = plan["info"], plan["decomposition"]
    N = dec.num_subdomains
    models, timing = [], {}
    if "cnn_dnn" in acc:
        owner = {i: st["rank"] for st in all_stats for i in st["subdomains"]}
        for i in range(N):  # cpu_s: training + probabilities of this subdomain's CNN
            models.append({"name": f"local {i} {dec.coords(i)}", "kind": "local", "subdomain": i,
                           "rank": owner[i], "params": plan["local_params"],
                           "cpu_s": seconds(all_stats[owner[i]], "cpu_s", f"subdomain_{i}"),
                           **_accs(acc["local"][i])})
        models.append({"name": "average", "kind": "average", **_accs(acc["average"])})
        models.append({"name": "majority vote", "kind": "vote", **_accs(acc["vote"])})
        local_cpu = [seconds(st, "cpu_s", "load", "local") for st in all_stats]
        slowest = int(np.argmax(local_cpu))
        gather_cpu = max(seconds(st, "cpu_s", "gather") for st in all_stats)
        coarse_cpu = seconds(all_stats[0], "cpu_s", "coarse")
        timing["critical_path"] = {
            "cpu_s": local_cpu[slowest] + gather_cpu + coarse_cpu,
            "wall_s": max(seconds(st, "wall_s", "load", "local") for st in all_stats)
                      + max(seconds(st, "wall_s", "gather") for st in all_stats)
                      + seconds(all_stats[0], "wall_s", "coarse"),
            "slowest_rank": slowest, "local_cpu_s": local_cpu[slowest],
            "gather_cpu_s": gather_cpu, "coarse_cpu_s": coarse_cpu,
            "definition": "max over ranks of (load + local) + gather + coarse; CPU = process time"}
        timing["total_cpu_s_twolevel"] = sum(seconds(st, "cpu_s", "load", "local", "gather")
                                             for st in all_stats) + coarse_cpu
        models.append({"name": "CNN-DNN", "kind": "cnn_dnn", "params": N * plan["local_params"] + dnn_params,
                       "dnn_params": dnn_params, "cpu_s": timing["critical_path"]["cpu_s"],
                       **_accs(acc["cnn_dnn"])})
    if "global" in acc:
        g = all_stats[0]["phases"]["global_train"]
        timing["global_train_cpu_s"], timing["global_train_wall_s"] = g["cpu_s"], g["wall_s"]
        models.append({"name": "global CNN", "kind": "global", "params": plan["global_params"],
                       "cpu_s": g["cpu_s"], **_accs(acc["global"])})
        if "critical_path" in timing:
            timing["global_over_critical_path"] = g["cpu_s"] / timing["critical_path"]["cpu_s"]
    return {
        "mpidd_version": __version__, "data": args.data, "classes": info.classes,
        "sizes": info.sizes, "world_size": size, "threads_per_rank": threads, "model": args.model,
        "decomposition": {"grid": format_grid(dec.grid), "overlap": dec.overlap,
                          "image_shape": format_grid(info.spatial_shape),
                          "subimage_shape": format_grid(dec.subimage_shape),
                          "num_subdomains": N, "boxes": dec.boxes(),
                          "rank_of_subdomain": ([rank_of_subdomain(i, size) for i in range(N)]
                                                if args.model != "global" else [])},
        "width_factor": plan["width_factor"],
        "accuracy": {m["name"]: {"val": m.get("val_acc"), "test": m.get("test_acc")} for m in models},
        "models": models,
        "parameters": {"local": plan["local_params"], "global": plan["global_params"], "coarse_dnn": dnn_params},
        "timing": timing,
        "per_rank": all_stats,
        "versions": {"mpi_library": parallel.library_version(), "mpi4py": mpi4py.__version__,
                     "torch": torch.__version__, "h5py": h5py.__version__, "numpy": np.__version__,
                     "python": sys.version.split()[0]},
        "config": {k: v for k, v in vars(args).items() if k not in ("config",)},
    }


def _accs(d):
    return {"val_acc": d["val"], "test_acc": d["test"]}


if __name__ == "__main__":
    sys.exit(main())
