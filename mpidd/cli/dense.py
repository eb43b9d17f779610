"""mpidd.train --task segment | regress: dense prediction by domain decomposition, every rank.

    plan_dense   rank 0: the data file's targets, boxes that tile the image, the local U-Nets' width
                 factor, what --mode trains (twolevel: local U-Nets alone, then with the coarse
                 exchange; global: the U-Net on whole images; compare: all three); refusals
    run_dense    every rank: read its boxes of images and targets (refused in one line on every rank
                 if one holds NaN or a class out of range), train and score (methods.dense), write its
                 boxes of the test predictions into RUN/predictions.h5 in turn; rank 0 the global
                 U-Net, SSIM of the stitched fields, results.json, metrics.csv and the table
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import socket
import sys
import time
from dataclasses import dataclass

import h5py
import numpy as np
import torch

from .. import __version__, data, parallel, rundir
from ..decomposition import Decomposition, DecompositionError, format_grid, parse_grid, subdomains_of_rank
from ..engine import TrainOptions
from ..methods import dense
from ..methods.context import Context, Stops
from ..metrics import regression_scores, regression_sums, segmentation_scores, segmentation_sums, ssim
from ..models import count_parameters
from ..unet import CoarseCorrection, UNetConfig, build_unet, matching_width_factor
from .arguments import NOT_RECORDED
from .plan import UsageError, check_out, resolve_auto_grid, resolve_normalization
from .run import EXIT_USAGE, log, progress_to_log, refuse, setup_logging

# model key in results.json -> its name in tables
MODELS = {"local_only": "local U-Nets (no exchange)", "two_level": "two-level (coarse exchange)",
          "coherent_random": "coherent (random init)", "coherent_pretrained": "coherent (transfer learning)",
          "global": "global U-Net"}
PREDICTIONS_FILE = "predictions.h5"


@dataclass(frozen=True)
class DensePlan:
    info: data.DataInfo
    decomposition: Decomposition
    width_factor: float
    models: tuple           # keys of MODELS this run trains, in order
    local_params: int
    global_params: int
    coarse_params: int


def dense_config(args) -> dense.DenseConfig:
    local = TrainOptions(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
                         momentum=args.momentum, weight_decay=args.weight_decay, schedule=args.schedule,
                         log_interval=args.log_interval)
    coarse = TrainOptions(epochs=args.coarse_epochs, batch_size=args.coarse_batch_size, lr=args.coarse_lr,
                          weight_decay=args.coarse_weight_decay, log_interval=args.log_interval)
    unet = UNetConfig(width=args.unet_width, depth=args.unet_depth, batchnorm=args.batchnorm,
                      input_mean=tuple(args.normalization["mean"]) if args.normalization else (),
                      input_std=tuple(args.normalization["std"]) if args.normalization else ())
    return dense.DenseConfig(task=args.task, loss=args.loss, unet=unet, local=local, coarse=coarse,
                             coarse_hidden=args.coarse_channels, coarse_layers=args.coarse_layers, seed=args.seed,
                             eval_batch_size=args.eval_batch_size)


def plan_dense(args, comm) -> DensePlan:
    """Everything a dense run can check before it starts (rank 0); UsageError with one line."""
    size = comm.Get_size()
    try:
        info = data.inspect(args.data, task=args.task)
    except data.DataError as e:
        raise UsageError(str(e)) from None
    resolve_normalization(args, info)
    for flag, bad in (("--resume", args.resume), ("--from", args.from_run), ("--dry-run", args.dry_run),
                      ("--mode " + args.mode, args.mode == "width")):
        if bad:
            raise UsageError(f"--task {args.task} trains --mode twolevel, coherent, global or compare, without "
                             f"--resume, --from and --dry-run: drop {flag}")
    for flag, bad in (("--data-access stream", args.data_access == "stream"), ("--device cuda", args.device == "cuda"),
                      ("--precision " + args.precision, args.precision != "32")):
        if bad:
            raise UsageError(f"--task {args.task} reads each rank's boxes into memory and trains in float32 on the "
                             f"CPU: drop {flag}")
    if args.overlap:
        raise UsageError(f"--task {args.task} needs subdomains that tile the image: use --overlap 0")
    try:
        if args.grid == "auto":
            resolve_auto_grid(args, size, info.spatial_shape)
        dec = Decomposition(info.spatial_shape, parse_grid(args.grid), 0)
        if args.mode != "global":
            subdomains_of_rank(0, size, dec.num_subdomains)  # DecompositionError when P > N
    except DecompositionError as e:
        raise UsageError(str(e)) from None
    if any(g * s != n for g, s, n in zip(dec.grid, dec.subimage_shape, dec.shape)):
        raise UsageError(f"--task {args.task}: grid {format_grid(dec.grid)} does not divide images of "
                         f"{format_grid(dec.shape)} into equal boxes: choose a grid that divides every axis")
    check_out(args.out)
    if os.path.exists(args.out) and not args.overwrite:
        raise UsageError(f"output directory {args.out} exists: choose another --out or pass --overwrite")
    C, out = info.channels, info.targets.channels
    cfg = dense_config(args)
    wf = args.width_factor or matching_width_factor(C, out, dec.shape, dec.subimage_shape, dec.num_subdomains,
                                                    cfg.unet)
    local = build_unet(C, out, dec.subimage_shape, cfg.unet, wf)
    models = {"twolevel": ("local_only", "two_level"), "global": ("global",),
              "coherent": ("coherent_random",) if args.init == "random" else
              ("local_only", "two_level", "coherent_pretrained")}.get(args.mode, tuple(MODELS))
    return DensePlan(info=info, decomposition=dec, width_factor=wf, models=models,
                     local_params=count_parameters(local),
                     global_params=count_parameters(build_unet(C, out, dec.shape, cfg.unet)),
                     coarse_params=count_parameters(CoarseCorrection(dec.grid, local.bottleneck_shape,
                                                                     args.coarse_channels, args.coarse_layers)))


def read_boxes(args, info, dec, mine) -> tuple[dict, int]:
    """{subdomain: {split: (subimages, target boxes)}} of this rank, and the bytes read."""
    subsets, nbytes = {}, 0
    for i in mine:
        subsets[i] = {}
        for s in data.SPLITS:
            x, y, n1 = data.load_split(args.data, s, dec.slices(i), block=args.read_block, labels=False)
            t, n2 = data.load_targets(args.data, s, dec.slices(i), block=args.read_block)
            subsets[i][s] = (x, t)
            nbytes += n1 + n2
    return subsets, nbytes


def agreed(comm, load):
    """Every rank runs load(); a DataError on any rank refuses the run on every rank, in one line."""
    result, error = None, None
    try:
        result = load()
    except data.DataError as e:
        error = str(e)
    failed = parallel.agree(comm, error)
    if failed and comm.Get_rank() == 0:
        refuse(f"{failed[1]} (found by rank {failed[0]})" if comm.Get_size() > 1 else failed[1])
    elif failed:
        sys.exit(EXIT_USAGE)
    return result


def write_predictions(comm, path, outputs: dict, dec, task: str, name: str, n: int, shape):
    """Every rank writes its subdomains' boxes of the test predictions into /test/<name> of
    `path`, in rank order (no parallel HDF5 needed): fields (n, C_out, ...) float32, or masks
    (n, ...) of class indices."""
    rank = comm.Get_rank()
    if rank == 0:
        with h5py.File(path, "a") as f:
            full = (n,) + tuple(shape) if task == "regress" else (n,) + dec.shape
            f.require_group("test").create_dataset(name, shape=full, dtype="float32" if task == "regress" else "uint8")
    for turn in range(comm.Get_size()):
        parallel.sleepy_barrier(comm)
        if turn != rank or not outputs:
            continue
        with h5py.File(path, "a") as f:
            for i, out in outputs.items():
                box = dec.slices(i)
                if task == "regress":
                    f["test"][name][(slice(None), slice(None)) + box] = out.numpy()
                else:
                    f["test"][name][(slice(None),) + box] = out.argmax(1).numpy().astype(np.uint8)
    parallel.sleepy_barrier(comm)


def stitched_ssim(path, name: str, data_path: str, block: int = 256) -> float:
    """Rank 0: the mean SSIM of the stitched test fields /test/<name> against the targets,
    block by block; data range: the test targets' max - min."""
    with h5py.File(path, "r") as f, h5py.File(data_path, "r") as d:
        pred, target = f["test"][name], d["test"]["targets"]
        lo = min(float(target[a:a + block].min()) for a in range(0, len(target), block))
        hi = max(float(target[a:a + block].max()) for a in range(0, len(target), block))
        values = [ssim(pred[a:a + block], target[a:a + block], hi - lo) for a in range(0, len(target), block)]
    return float(np.concatenate(values).mean())


def whole_scores(outputs, targets, task: str) -> dict:
    """Scores of whole fields or masks (the global U-Net on rank 0)."""
    if task == "regress":
        return regression_scores(regression_sums(outputs.numpy(), targets))
    return segmentation_scores(segmentation_sums(outputs.argmax(1).numpy(), targets, outputs.shape[1]))


def run_dense(comm, args, plan: DensePlan) -> int:
    """A whole dense run on comm; returns 0 (refusals exit 2 on every rank)."""
    started = time.perf_counter()
    rank, size = comm.Get_rank(), comm.Get_size()
    master_process = rank == 0
    threads = args.threads or parallel.default_threads(comm)
    torch.set_num_threads(threads)
    parallel.tune_malloc()
    parallel.warm_up_torch()
    info, dec, cfg = plan.info, plan.decomposition, dense_config(args)
    N, C, out_channels = dec.num_subdomains, info.channels, info.targets.channels
    boxes = args.mode != "global"
    mine = subdomains_of_rank(rank, size, N) if boxes else []
    stops = Stops()  # (no stop and --resume with a dense task); ranks sharing cores sleep in the exchanges
    stops.wait_interval = 1e-4 if parallel.oversubscribed(comm, threads) else None
    ctx = Context(comm=comm, mine=mine, stops=stops, progress=progress_to_log(master_process))
    with ctx.timer("load"):
        subsets, nbytes = agreed(comm, lambda: read_boxes(args, info, dec, mine)) if boxes else ({}, 0)
    if master_process:
        rundir.prepare(args.out)
        rundir.write_json(os.path.join(args.out, "config.json"),
                          {k: v for k, v in vars(args).items() if k not in NOT_RECORDED})
        with h5py.File(os.path.join(args.out, PREDICTIONS_FILE), "w") as f:
            f.attrs["task"], f.attrs["data"] = args.task, os.path.abspath(args.data)
    parallel.sleepy_barrier(comm)
    setup_logging(args.out, rank)
    log.info("mpidd %s, --task %s, %d ranks, %d threads; subdomains %s, %d bytes read", __version__, args.task,
             size, threads, mine, nbytes)
    if master_process:
        print(f"mpidd: {size} ranks x {threads} threads, --task {args.task}, mode {args.mode}, grid "
              f"{format_grid(dec.grid)}, subimages {format_grid(dec.subimage_shape)}; U-Nets of width "
              f"{args.unet_width} and depth {args.unet_depth}: local width factor {plan.width_factor:g} "
              f"({plan.local_params:,} vs {plan.global_params:,} global parameters), coarse network "
              f"{plan.coarse_params:,}; loss {args.loss}; run directory {args.out}", flush=True)
    metrics, rows = {}, []
    predictions = os.path.join(args.out, PREDICTIONS_FILE)
    n_test = info.sizes["test"]
    shape = build_unet(C, out_channels, dec.subimage_shape, cfg.unet, plan.width_factor).bottleneck_shape
    models = coarse = None
    if "local_only" in plan.models:
        models, histories = dense.fit_local_unets(ctx, subsets, dec, C, out_channels, plan.width_factor, cfg)
        rows += [dict(r, model=f"local_{i}") for i, h in histories.items() for r in h]
        with ctx.timer("local_eval"):
            outputs = {s: dense.local_predictions(models, subsets, s, cfg) for s in ("val", "test")}
            scores = {s: dense.dense_scores(ctx, outputs[s], subsets, s, cfg) for s in outputs}
            write_predictions(comm, predictions, outputs["test"], dec, args.task, "local_only", n_test,
                              info.targets.shape)
        metrics["local_only"] = scores
        parallel.sleepy_barrier(comm)  # so that "gather" times the exchange, not the slowest rank
        with ctx.timer("gather"):
            gathered = dense.gather_bottlenecks(ctx, models, subsets, N, batch_size=cfg.eval_batch_size)
        with ctx.timer("coarse"):
            coarse, history = dense.fit_coarse_correction(ctx, models, subsets, gathered, dec, shape, cfg)
        rows += [dict(r, model="coarse") for r in history] if master_process else []
        with ctx.timer("two_level_eval"):
            step = dense.CoarseStep(ctx, models, coarse, N, shape, gathered)
            outputs = {s: dense.exchanged_predictions(ctx, step, subsets, s, cfg) for s in ("val", "test")}
            metrics["two_level"] = {s: dense.dense_scores(ctx, outputs[s], subsets, s, cfg) for s in outputs}
            write_predictions(comm, predictions, outputs["test"], dec, args.task, "two_level", n_test,
                              info.targets.shape)
        gathered = outputs = None
    for init in ("random", "pretrained"):
        name = f"coherent_{init}"
        if name not in plan.models:
            continue
        parallel.sleepy_barrier(comm)
        local, net = dense.coherent_start(ctx, init, dec, C, out_channels, plan.width_factor, cfg, shape, models,
                                          coarse)
        opts = dataclasses.replace(cfg.local, epochs=args.coherent_epochs,
                                   lr=args.coherent_lr if init == "random" else args.transfer_lr)
        with ctx.timer(name):
            history = dense.fit_coherent_dense(ctx, local, net, subsets, dec, shape, cfg, opts, MODELS[name])
        rows += [dict(r, model=name) for r in history] if master_process else []
        with ctx.timer(f"{name}_eval"):
            step = dense.CoarseStep(ctx, local, net, N, shape, coherent=True)
            outputs = {s: dense.exchanged_predictions(ctx, step, subsets, s, cfg) for s in ("val", "test")}
            metrics[name] = {s: dense.dense_scores(ctx, outputs[s], subsets, s, cfg) for s in outputs}
            write_predictions(comm, predictions, outputs["test"], dec, args.task, name, n_test, info.targets.shape)
        outputs = None
    subsets = None
    if "global" in plan.models:
        parallel.sleepy_barrier(comm)
        if master_process:
            whole = tuple(slice(0, s) for s in dec.shape)
            split = {}
            with ctx.timer("global_load"):
                for s in data.SPLITS:
                    x, _, _ = data.load_split(args.data, s, whole, block=args.read_block, labels=False)
                    split[s] = (x, data.load_targets(args.data, s, whole, block=args.read_block)[0])
            with ctx.timer("global_train"):
                model, history = dense.fit_global_unet(ctx, split["train"], split["val"], C, out_channels, dec.shape,
                                                       cfg)
            rows += [dict(r, model="global") for r in history]
            with ctx.timer("global_eval"):
                outs = {s: dense.predict_dense(model, split[s][0], cfg.eval_batch_size) for s in ("val", "test")}
                metrics["global"] = {s: whole_scores(outs[s], split[s][1], args.task) for s in outs}
                with h5py.File(predictions, "a") as f:
                    test = outs["test"]
                    f.require_group("test").create_dataset(
                        "global", data=test.numpy() if args.task == "regress" else test.argmax(1).numpy().astype(
                            np.uint8))
            split = outs = None
        parallel.sleepy_barrier(comm)
    stats = parallel.gather_to_root(comm, {"rank": rank, "host": socket.gethostname(), "subdomains": mine,
                                           "bytes_read": nbytes, "phases": ctx.timer.seconds})
    all_rows = parallel.gather_to_root(comm, rows if not master_process else [])
    if not master_process:
        return 0
    rows += [r for part in all_rows[1:] for r in part]
    if args.task == "regress":
        with ctx.timer("ssim"):
            for name in plan.models:
                metrics[name]["test"]["ssim"] = stitched_ssim(predictions, name, args.data)
    results = dense_results(args, plan, metrics, stats, size, threads, time.perf_counter() - started)
    rundir.write_json(os.path.join(args.out, "results.json"), results)
    rundir.write_metrics(os.path.join(args.out, "metrics.csv"), rows)
    print(format_dense(results), flush=True)
    print(f"results: {os.path.join(args.out, 'results.json')}; test predictions: {predictions}", flush=True)
    return 0


def critical_path(stats) -> dict:
    """CPU seconds of the decomposed models' critical path: the slowest rank's load + local
    training and scoring, then gather and rank 0's coarse training."""
    def cpu(st, *names):
        return sum(st["phases"].get(n, {}).get("cpu_s", 0.0) for n in names)
    slowest = max(stats, key=lambda st: cpu(st, "load", "local"))
    return {"cpu_s": cpu(slowest, "load", "local") + cpu(stats[0], "gather", "coarse"),
            "slowest_rank": slowest["rank"], "local_cpu_s": cpu(slowest, "load", "local"),
            "gather_cpu_s": cpu(stats[0], "gather"), "coarse_cpu_s": cpu(stats[0], "coarse"),
            "definition": "max over ranks of (load + local) + rank 0's gather + coarse; CPU = process time"}


def dense_results(args, plan: DensePlan, metrics, stats, size, threads, wall_s) -> dict:
    dec = plan.decomposition
    timing = {"wall_s": wall_s}
    if "two_level" in plan.models:
        timing["critical_path"] = critical_path(stats)
    if "global" in plan.models:
        timing["global_train_cpu_s"] = stats[0]["phases"]["global_train"]["cpu_s"]
    for name in (m for m in plan.models if m.startswith("coherent")):
        timing[name] = {"wall_s": stats[0]["phases"][name]["wall_s"],
                        "cpu_s_max": max(st["phases"][name]["cpu_s"] for st in stats),
                        "definition": "every rank in every step: the phase's wall time on rank 0, and the most "
                                      "CPU seconds of a rank"}
    return {"mpidd_version": __version__, "task": args.task, "loss": args.loss, "mode": args.mode,
            "data": os.path.abspath(args.data), "sizes": plan.info.sizes, "world_size": size,
            "threads_per_rank": threads, "targets": {"kind": plan.info.targets.kind, "shape": plan.info.targets.shape,
                                                     "classes": plan.info.targets.classes},
            "decomposition": {"grid": format_grid(dec.grid), "overlap": 0, "subimage_shape": dec.subimage_shape,
                              "rank_of_subdomain": [i % size for i in range(dec.num_subdomains)]},
            "width_factor": plan.width_factor,
            "parameters": {"local": plan.local_params, "global": plan.global_params, "coarse": plan.coarse_params},
            "metrics": {MODELS[k]: v for k, v in metrics.items()}, "timing": timing, "per_rank": stats,
            "finished": datetime.datetime.now().isoformat(timespec="seconds")}


def format_dense(results) -> str:
    """The table a dense run prints: each model's test scores (and val's main one)."""
    regress = results["task"] == "regress"
    keys = ("mae", "rel_l2", "ssim") if regress else ("miou", "mean_dice", "pixel_acc")
    lines = [f"{'model':<30}{'val ' + keys[0]:>12}" + "".join(f"{'test ' + k:>16}" for k in keys)]
    for name, m in results["metrics"].items():
        lines.append(f"{name:<30}{m['val'][keys[0]]:>12.5f}" + "".join(f"{m['test'].get(k, float('nan')):>16.5f}"
                                                                       for k in keys))
    t = results["timing"]
    if "critical_path" in t:
        cp = t["critical_path"]
        lines.append(f"critical path {cp['cpu_s']:.1f} CPU s (slowest rank's local U-Nets {cp['local_cpu_s']:.1f} + "
                     f"gather + coarse {cp['coarse_cpu_s']:.1f})"
                     + (f"; global U-Net {t['global_train_cpu_s']:.1f} CPU s" if "global_train_cpu_s" in t else ""))
    return "\n".join(lines)
