"""mpidd.train --task segment | regress: dense prediction by domain decomposition, every rank.

    plan_dense   rank 0: the data file's targets, boxes that tile the image, the local U-Nets' width
                 factor, what --mode trains (twolevel: local U-Nets alone, then with the coarse
                 exchange; global: the U-Net on whole images; compare: all three); refusals
    run_dense    every rank: read its boxes of images and targets (refused in one line on every rank
                 if one holds NaN or a class out of range), open the run directory (cli.run), train
                 and score, then rank 0 the SSIM of the stitched fields, results.json, metrics.csv,
                 the table and the report; or, on an agreed stop (SIGTERM/SIGUSR1), every rank saves
                 and the run exits 75 (cli.run.stop_here)
    train_and_score  every rank, model by model (methods.dense): train, or resuming read back a
                 finished training from its checkpoint and continue a stopped one; score; write
                 its boxes of the test predictions into RUN/predictions.h5 in turn; rank 0 the
                 global U-Net (global_unet)
"""

from __future__ import annotations

import contextlib
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

from .. import __version__, data, options, parallel, rundir
from ..dense_estimator import MODEL_FILE, TwoLevelUNet, gathered_state, write_state
from ..decomposition import Decomposition, DecompositionError, format_grid, parse_grid, subdomains_of_rank
from ..methods import dense
from ..engine import Preempted
from ..methods.context import Context, PhaseTimer
from ..metrics import regression_scores, regression_sums, segmentation_scores, segmentation_sums, ssim
from ..models import count_parameters
from ..unet import CoarseCorrection, build_unet, matching_width_factor
from .progress import RunProgress, dense_phases
from .plan import UsageError, check_out, check_resume, resolve_auto_grid, resolve_normalization
from .report import format_dense, write_run_report
from .run import (EXIT_USAGE, AgreedStops, Run, RunDirectory, log, progress_to_log, refuse, start_segment,
                  stop_here)

# model key in results.json -> its name in tables
MODELS = {"local_only": "local U-Nets (no exchange)", "two_level": "two-level (coarse exchange)",
          "coherent_random": "coherent (random init)", "coherent_pretrained": "coherent (transfer learning)",
          "domain_parallel": "global U-Net, domain parallel", "global": "global U-Net"}
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
    progress: dict | None = None  # --resume: the run's marker ({"fresh": True}: none yet); None: a new run


def plan_dense(args, comm) -> DensePlan:
    """Everything a dense run can check before it starts (rank 0); UsageError with one line."""
    size = comm.Get_size()
    try:
        info = data.inspect(args.data, task=args.task)
    except data.DataError as e:
        raise UsageError(str(e)) from None
    resolve_normalization(args, info)
    for flag, bad in (("--from", args.from_run), ("--dry-run", args.dry_run),
                      ("--mode " + args.mode, args.mode == "width")):
        if bad:
            raise UsageError(f"--task {args.task} trains --mode twolevel, coherent, halo, global or compare, without "
                             f"--from and --dry-run: drop {flag}")
    for flag, bad in (("--data-access stream", args.data_access == "stream"), ("--device cuda", args.device == "cuda"),
                      ("--precision " + args.precision, args.precision != "32")):
        if bad:
            raise UsageError(f"--task {args.task} reads each rank's boxes into memory and trains in float32 on the "
                             f"CPU: drop {flag}")
    try:
        if args.grid == "auto":
            resolve_auto_grid(args, size, info.spatial_shape)
        dec = Decomposition(info.spatial_shape, parse_grid(args.grid), args.overlap)
        if args.mode != "global":
            subdomains_of_rank(0, size, dec.num_subdomains)  # DecompositionError when P > N
    except DecompositionError as e:
        raise UsageError(str(e)) from None
    if not dec.tiles_are_equal:
        raise UsageError(f"--task {args.task}: grid {format_grid(dec.grid)} does not divide images of "
                         f"{format_grid(dec.shape)} into equal tiles: choose a grid that divides every axis")
    check_out(args.out)
    if os.path.exists(args.out) and not args.overwrite and args.resume is None:
        raise UsageError(f"output directory {args.out} exists: choose another --out, pass --overwrite, or "
                         f"--resume {args.out} to continue it")
    progress = check_resume(args, size, info)
    if progress is not None and progress.get("state") == "finished":
        raise UsageError(f"--resume {args.out}: that run has finished (results.json is there); nothing to resume")
    C, out = info.channels, info.targets.channels
    cfg = options.dense_config(args)
    wf = args.width_factor or matching_width_factor(C, out, dec.shape, dec.subimage_shape, dec.num_subdomains,
                                                    cfg.unet)
    models = {"twolevel": ("local_only", "two_level"), "global": ("global",), "halo": ("domain_parallel",),
              "coherent": ("coherent_random",) if args.init == "random" else
              ("local_only", "two_level", "coherent_pretrained")}.get(args.mode, tuple(MODELS))
    local = build_unet(C, out, dec.subimage_shape, cfg.unet, wf)
    unfit = dense.domain_parallel_unfit(dec, cfg)
    if unfit and args.mode == "compare":  # the comparison goes on without it
        models = tuple(m for m in models if m != "domain_parallel")
    elif unfit and "domain_parallel" in models:
        raise UsageError(f"--mode {args.mode}: the domain-parallel U-Net {unfit}")
    return DensePlan(info=info, decomposition=dec, width_factor=wf, models=models, progress=progress,
                     local_params=count_parameters(local),
                     global_params=count_parameters(build_unet(C, out, dec.shape, cfg.unet)),
                     coarse_params=count_parameters(CoarseCorrection(dec.grid, local.bottleneck_shape,
                                                                     args.coarse_channels, args.coarse_layers)))


def read_boxes(args, info, dec, mine) -> tuple[dict, int]:
    """{subdomain: {split: (subimages, target tiles)}} of this rank, and the bytes read."""
    subsets, nbytes = {}, 0
    for i in mine:
        subsets[i] = {}
        for s in data.SPLITS:
            x, t, n = data.load_dense_box(args.data, s, dec.slices(i), dec.tile_slices(i), block=args.read_block)
            subsets[i][s] = (x, t)
            nbytes += n
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
    """Every rank writes its subdomains' tiles of the test predictions into /test/<name> of
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
                box = dec.tile_slices(i)
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


# the dense phases whose every step involves every rank: each rank saves its part of the loop
# (RunDirectory.coherent_control), the marker records the position all have saved
EXCHANGED_PHASES = ("coarse_exchange", "coherent_random", "coherent_pretrained", "domain_parallel")


def run_dense(comm, args, plan: DensePlan) -> int:
    """A whole dense run on comm; returns 0, or EXIT_PREEMPTED after an agreed stop (every
    rank's state saved; --resume replays the finished trainings from their checkpoints and
    continues the stopped one); refusals exit 2 on every rank."""
    started = time.perf_counter()
    rank, size = comm.Get_rank(), comm.Get_size()
    master_process = rank == 0
    threads = args.threads or parallel.default_threads(comm)
    torch.set_num_threads(threads)
    parallel.tune_malloc()
    parallel.warm_up_torch()
    dec = plan.decomposition
    mine = subdomains_of_rank(rank, size, dec.num_subdomains) if args.mode != "global" else []
    resuming = plan.progress is not None and not plan.progress.get("fresh")
    stopper = parallel.StopAgreement(comm)
    directory = RunDirectory(args.out, rank, args, stopper, resuming, plan.progress if resuming else None)
    timer = PhaseTimer(rundir.read_json(directory.path(rundir.phases_file(rank)), {}) if resuming else None)
    # ranks sharing cores sleep in the exchanges and stop agreements instead of spinning
    stops = AgreedStops(stopper, timer, wait_interval=1e-4 if parallel.oversubscribed(comm, threads) else None)
    ctx = Context(comm=comm, mine=mine, stops=stops, checkpoints=directory, timer=timer,
                  progress=progress_to_log(master_process))
    with ctx.timer("load"):  # before the run directory exists: bad data leaves nothing behind
        subsets, nbytes = agreed(comm, lambda: read_boxes(args, plan.info, dec, mine)) if mine else ({}, 0)
    start_segment(comm, directory, args, threads)
    if master_process:
        with h5py.File(os.path.join(args.out, PREDICTIONS_FILE), "w") as f:  # (resuming: written again)
            f.attrs["task"], f.attrs["data"] = args.task, os.path.abspath(args.data)
    log.info("mpidd %s, --task %s, %d ranks, %d threads; subdomains %s, %d bytes read", __version__, args.task,
             size, threads, mine, nbytes)
    if master_process:
        if resuming:
            print(f"mpidd: resuming {args.out} (stopped {len(directory.marker.get('stops', []))} time(s) before): "
                  f"finished trainings are read from their checkpoints", flush=True)
        print(f"mpidd: {size} ranks x {threads} threads, --task {args.task}, mode {args.mode}, grid "
              f"{format_grid(dec.grid)}, subimages {format_grid(dec.subimage_shape)} (overlap {dec.overlap}) "
              f"predicting tiles {format_grid(dec.tile_shape)}; U-Nets of width "
              f"{args.unet_width} and depth {args.unet_depth}: local width factor {plan.width_factor:g} "
              f"({plan.local_params:,} vs {plan.global_params:,} global parameters), coarse network "
              f"{plan.coarse_params:,}; loss {args.loss}; run directory {args.out}", flush=True)
    # phase lines and the whole run's time left, in every progress line of this rank
    run_progress = RunProgress(dense_phases(args, plan, mine, master_process), ctx.progress.sinks, started=started)
    ctx.progress = dataclasses.replace(ctx.progress, suffix=run_progress.suffix)
    try:
        metrics, rows, fitted = train_and_score(ctx, args, plan, subsets, run_progress.start)
        run_progress.finish()
        subsets = None
        stops.sync()  # other ranks sleep, not spin, while rank 0 trains the global U-Net
    except Preempted as e:
        return stop_here(Run(ctx=ctx, args=args, plan=plan, threads=threads), e)
    model_state = gathered_state(comm, fitted, model_header(args, plan, metrics)) if fitted else None
    stats = parallel.gather_to_root(comm, {"rank": rank, "host": socket.gethostname(), "subdomains": mine,
                                           "bytes_read": nbytes, "phases": ctx.timer.seconds})
    all_rows = parallel.gather_to_root(comm, rows if not master_process else [])
    if master_process:
        rows += [r for part in all_rows[1:] for r in part]
        predictions = os.path.join(args.out, PREDICTIONS_FILE)
        if args.task == "regress":
            with ctx.timer("ssim"):
                for name in plan.models:
                    metrics[name]["test"]["ssim"] = stitched_ssim(predictions, name, args.data)
        results = dense_results(args, plan, metrics, stats, size, threads, time.perf_counter() - started)
        results["restarts"] = {"segments": directory.marker["segments"], "stops": directory.marker.get("stops", [])}
        rundir.write_json(os.path.join(args.out, "results.json"), results)
        rundir.write_metrics(os.path.join(args.out, "metrics.csv"), rows)
        if model_state is not None:  # the decomposed models, for mpidd.predict and TwoLevelUNet.load
            write_state(os.path.join(args.out, MODEL_FILE), model_state)
        directory.mark(state="finished")
        print(format_dense(results), flush=True)
        print(f"results: {os.path.join(args.out, 'results.json')}; test predictions: {predictions}", flush=True)
        if args.report and write_run_report(args.out):
            print(f"report: {os.path.join(args.out, 'report', 'report.md')}", flush=True)
    parallel.sleepy_barrier(comm)  # the marker says finished: the resume states are no longer needed
    for name in EXCHANGED_PHASES:
        for file in rundir.coherent_state_checkpoints(name, rank):
            with contextlib.suppress(FileNotFoundError):
                os.remove(directory.path(file))
    return 0


def train_and_score(ctx: Context, args, plan: DensePlan, subsets: dict, begin=lambda phase: None
                    ) -> tuple[dict, list, dict]:
    """Every rank: the models of plan.models in turn, each trained (or, resuming, read back from
    its checkpoint) and scored, its test predictions written into RUN/predictions.h5. Returns
    (metrics: model key -> split -> scores, on rank 0; this rank's metrics.csv rows; the
    decomposed models as TwoLevelUNet holds them: {name: ({subdomain: U-Net}, coarse)}). Raises
    Preempted on an agreed stop; ctx.stops.sync() at each phase boundary is where ranks that
    wait learn of a stop elsewhere."""
    comm, master_process, stops, directory = ctx.comm, ctx.master_process, ctx.stops, ctx.checkpoints
    info, dec, cfg = plan.info, plan.decomposition, options.dense_config(args)
    N, C, out_channels = dec.num_subdomains, info.channels, info.targets.channels
    metrics, rows = {}, []
    predictions = os.path.join(args.out, PREDICTIONS_FILE)
    n_test = info.sizes["test"]
    shape = build_unet(C, out_channels, dec.subimage_shape, cfg.unet, plan.width_factor).bottleneck_shape

    def score_and_write(name, outputs):
        metrics[name] = {s: dense.dense_scores(ctx, outputs[s], subsets, s, cfg) for s in outputs}
        write_predictions(comm, predictions, outputs["test"], dec, args.task, name, n_test, info.targets.shape)

    models = coarse = None
    fitted = {}
    if "local_only" in plan.models:
        begin("local")
        models, histories = dense.fit_local_unets(ctx, subsets, dec, C, out_channels, plan.width_factor, cfg)
        rows += [dict(r, model=f"local_{i}") for i, h in histories.items() for r in h]
        stops.sync()  # every rank has its local U-Nets (or every rank stops here)
        with ctx.timer("local_eval"):
            score_and_write("local_only", {s: dense.local_predictions(models, subsets, s, cfg)
                                           for s in ("val", "test")})
        fitted["local-only"] = (models, None)
        parallel.sleepy_barrier(comm)  # so that "gather" times the exchange, not the slowest rank
        begin("coarse")
        with ctx.timer("gather"):
            gathered = dense.gather_bottlenecks(ctx, models, subsets, N, batch_size=cfg.eval_batch_size)
        with ctx.timer("coarse"):
            coarse, history = dense.fit_coarse_correction(
                ctx, models, subsets, gathered, dec, shape, cfg,
                control=directory.coherent_control("coarse_exchange", stops.poll_world))
        rows += [dict(r, model="coarse") for r in history] if master_process else []
        with ctx.timer("two_level_eval"):
            step = dense.CoarseStep(ctx, models, coarse, N, shape, gathered)
            score_and_write("two_level", {s: dense.exchanged_predictions(ctx, step, subsets, s, cfg)
                                          for s in ("val", "test")})
        fitted["two-level"] = (models, coarse)
        gathered = None
    for init in ("random", "pretrained"):
        name = f"coherent_{init}"
        if name not in plan.models:
            continue
        stops.sync()
        begin(name)
        local, net = dense.coherent_start(ctx, init, dec, C, out_channels, plan.width_factor, cfg, shape, models,
                                          coarse)
        with ctx.timer(name):
            history = dense.fit_coherent_dense(ctx, local, net, subsets, dec, shape, cfg,
                                               options.dense_coherent_options(args, init), MODELS[name],
                                               control=directory.coherent_control(name, stops.poll_world))
        rows += [dict(r, model=name) for r in history] if master_process else []
        with ctx.timer(f"{name}_eval"):
            step = dense.CoarseStep(ctx, local, net, N, shape, coherent=True)
            score_and_write(name, {s: dense.exchanged_predictions(ctx, step, subsets, s, cfg) for s in ("val", "test")})
        fitted[f"coherent-{init}"] = (local, net)
    if "domain_parallel" in plan.models:
        stops.sync()
        begin("domain_parallel")
        with ctx.timer("domain_parallel"):
            model, history = dense.fit_domain_parallel_unet(
                ctx, subsets, dec, C, out_channels, cfg,
                control=directory.coherent_control("domain_parallel", stops.poll_world))
        rows += [dict(r, model="domain_parallel") for r in history] if master_process else []
        with ctx.timer("domain_parallel_eval"):
            score_and_write("domain_parallel", {s: dense.domain_parallel_predictions(model, subsets, dec, s, cfg)
                                                for s in ("val", "test")})
    if "global" in plan.models:
        stops.sync()
        begin("global")
        if master_process:
            metrics["global"], history = global_unet(ctx, args, plan, cfg, predictions)
            rows += [dict(r, model="global") for r in history]
    return metrics, rows, fitted


def model_header(args, plan: DensePlan, metrics: dict) -> dict:
    """What RUN/model.pt says besides the weights: the run's options as TwoLevelUNet's keywords
    (with the same names), the shapes and the validation scores (rank 0's)."""
    dec = plan.decomposition
    return {"hyperparameters": {k: getattr(args, k) for k in TwoLevelUNet.HYPERPARAMETERS if hasattr(args, k)},
            "image_shape": list(plan.info.image_shape), "out_channels": plan.info.targets.channels,
            "width_factor": plan.width_factor, "grid": list(dec.grid),
            "scores": {k.replace("_", "-"): {"val": v["val"]} for k, v in metrics.items()
                       if k not in ("global", "domain_parallel") and v},  # the decomposed models model.pt holds
            "history": {}}


def global_unet(ctx: Context, args, plan: DensePlan, cfg, predictions: str) -> tuple[dict, list]:
    """Rank 0: the U-Net on whole images (the baseline), its scores and test predictions."""
    dec, C, out_channels = plan.decomposition, plan.info.channels, plan.info.targets.channels
    whole = tuple(slice(0, s) for s in dec.shape)
    split = {}
    with ctx.timer("global_load"):
        for s in data.SPLITS:
            x, _, _ = data.load_split(args.data, s, whole, block=args.read_block, labels=False)
            split[s] = (x, data.load_targets(args.data, s, whole, block=args.read_block)[0])
    with ctx.timer("global_train"):
        model, history = dense.fit_global_unet(ctx, split["train"], split["val"], C, out_channels, dec.shape, cfg)
    with ctx.timer("global_eval"):
        outs = {s: dense.predict_dense(model, split[s][0], cfg.eval_batch_size) for s in ("val", "test")}
        scores = {s: whole_scores(outs[s], split[s][1], args.task) for s in outs}
        with h5py.File(predictions, "a") as f:
            test = outs["test"]
            f.require_group("test").create_dataset(
                "global", data=test.numpy() if args.task == "regress" else test.argmax(1).numpy().astype(np.uint8))
    return scores, history


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
    for name in (m for m in plan.models if m.startswith("coherent") or m == "domain_parallel"):
        timing[name] = {"wall_s": stats[0]["phases"][name]["wall_s"],
                        "cpu_s_max": max(st["phases"][name]["cpu_s"] for st in stats),
                        "definition": "every rank in every step: the phase's wall time on rank 0, and the most "
                                      "CPU seconds of a rank"}
    return {"mpidd_version": __version__, "task": args.task, "loss": args.loss, "mode": args.mode,
            "data": os.path.abspath(args.data), "sizes": plan.info.sizes, "world_size": size,
            "threads_per_rank": threads, "targets": {"kind": plan.info.targets.kind, "shape": plan.info.targets.shape,
                                                     "classes": plan.info.targets.classes},
            "decomposition": {"grid": format_grid(dec.grid), "overlap": dec.overlap,
                              "subimage_shape": dec.subimage_shape, "tile_shape": dec.tile_shape,
                              "rank_of_subdomain": [i % size for i in range(dec.num_subdomains)]},
            "width_factor": plan.width_factor,
            "parameters": {"local": plan.local_params, "global": plan.global_params, "coarse": plan.coarse_params},
            "metrics": {MODELS[k]: v for k, v in metrics.items()},
            "predictions": {"file": PREDICTIONS_FILE, "datasets": {MODELS[k]: f"test/{k}" for k in metrics}},
            "timing": timing, "per_rank": stats,
            "finished": datetime.datetime.now().isoformat(timespec="seconds")}
