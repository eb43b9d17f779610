"""The command line mpidd.train, rank by rank (main): its entry point is mpidd/train.py (python
-m mpidd.train), which initialises MPI and catches stop signals before this module imports torch.

    main                a whole run, every rank, in this order:
    start               rank 0 parses and plans (cli.arguments, cli.plan); every rank gets (args, plan)
    prepare             devices, threads, the Run, this rank's subdomains
    open_run_directory  (after the data is read) the run directory, config.json, marker, logs, header
    finish              (after the phases, cli.phases) rank 0's results.json, metrics.csv, model.pt, report
    stop_here           (cli.run) an agreed stop instead: every rank saves, rank 0 records it (exit 75)
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import socket
import sys
import time

import h5py
import numpy as np
import torch

from .. import __version__, parallel, rundir
from ..decomposition import format_grid
from ..engine import Preempted, precision_error
from ..methods.context import Context, PhaseTimer, peak_rss_bytes
from ..results import assemble_results, assemble_width_results
from ..stream import choose_access
from .arguments import ConfigError, parse_args
from .dense import plan_dense, run_dense
from .phases import load_local_data, load_or_refuse, load_whole_images, every_phase, share_bytes, write_model_file
from .dryrun import dry_run
from .plan import Plan, UsageError, assignment, global_cnn_alone, global_share, plan_run
from .progress import RunProgress, calibrated_rates, model_flops, phases_of
from .report import format_any, write_run_report
from .run import (EXIT_USAGE, AgreedStops, Run, RunDirectory, log, print_error, progress_to_log, refuse,
                  start_segment, stop_here)


def start(comm, argv):
    """Rank 0 parses and validates, then every rank gets (args, plan) or the reason to stop."""
    def decide():
        try:
            args = parse_args(argv)
            if args.out is None:
                args.out = os.path.join("runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
            return "run", args, plan_dense(args, comm) if args.task != "classify" else plan_run(args, comm)
        except SystemExit as e:  # --help, or argparse's own usage error (already printed)
            return "exit", e.code or 0, None
        except (ConfigError, UsageError, parallel.StartupError) as e:
            print_error(e)
            return "exit", EXIT_USAGE, None

    kind, args, plan = parallel.root_decides(comm, decide)
    if kind == "exit":
        sys.exit(args)
    return args, plan


def main(argv=None, comm=None) -> int:
    """A whole run on `comm` (default MPI_COMM_WORLD), every rank, in order: the plan (start),
    devices and threads (prepare), the data, read before the run directory exists (so that bad
    data leaves nothing behind), the run directory (open_run_directory), the phases, then rank
    0's results (finish). Returns 0, or EXIT_PREEMPTED after a stop (state saved); exits 2 on
    a refusal."""
    comm = parallel.world() if comm is None else comm
    started = time.perf_counter()
    parallel.install_abort_on_error(comm)
    args, plan = start(comm, argv)
    if args.task != "classify":
        return run_dense(comm, args, plan)
    if args.dry_run:
        return dry_run(comm, args, plan)
    run = prepare(comm, args, plan)
    ctx, work = run.ctx, plan.work

    share = share_bytes(run)
    run.access, why = choose_access(args.data_access, share, parallel.memory_per_rank(comm))
    log_access = parallel.gather_to_root(comm, (run.access, why))
    if ctx.master_process:
        args.data_access_choice = access_choice(log_access)

    # Read the data before the run directory exists, so that bad data leaves nothing behind.
    subsets, whole, bytes_boxes, bytes_whole = {}, None, 0, 0
    if work.boxes:
        subsets, bytes_boxes = load_or_refuse(run, lambda: load_local_data(run))
    elif work.width or ctx.master_process or ctx.group is not None:
        # --mode width (every rank), or global (rank 0, or every rank data parallel)
        whole, bytes_whole = load_or_refuse(run, lambda: load_whole_images(run))

    devices = open_run_directory(run, bytes_boxes + bytes_whole)
    run.bytes_whole = bytes_whole
    # phase lines and the whole run's time left, in every progress line of this rank
    run.run_progress = RunProgress(phases_of(run), ctx.progress.sinks, started=started,
                                   calibrated=calibrated_rates(run))
    ctx.progress = dataclasses.replace(ctx.progress, suffix=run.run_progress.suffix)
    try:
        accuracies, rows, coherent_timing = every_phase(run, subsets, whole)
        run.run_progress.finish()
        subsets = whole = None
        run.stops.sync()  # other ranks sleep, not spin, while rank 0 works
    except Preempted as e:
        return stop_here(run, e)

    stats = {"rank": ctx.rank, "host": socket.gethostname(), "device": parallel.device_name(ctx.device),
             "threads": run.threads, "global_threads": run.global_threads if run.global_ranks else None,
             "subdomains": ctx.mine, "data_parallel": [ctx.group.rank, ctx.group.size] if ctx.group else None,
             "bytes_read": bytes_boxes + run.bytes_whole + run.io.bytes_read, "bytes_read_boxes": bytes_boxes,
             "bytes_read_whole_images": run.bytes_whole, "peak_rss_bytes": peak_rss_bytes(),
             "peak_rss_bytes_after_phase": ctx.timer.peak_rss,
             "data_access": run.access, "share_bytes": share,
             "stream": run.io.as_dict() if run.access == "stream" else None,
             "phases": ctx.timer.seconds, "coherent": coherent_timing}
    finish(run, stats, rows, accuracies, devices)
    return 0


def prepare(comm, args, plan: Plan) -> Run:
    """Every rank: its device (all agree, or every rank exits 2), threads, the Run, resumed
    state, and its subdomains (or sub-networks) and data-parallel group."""
    rank, size = comm.Get_rank(), comm.Get_size()
    master_process = rank == 0
    device, error = torch.device("cpu"), None
    try:
        device, local_rank = parallel.select_device(args.device, comm)  # before any CUDA allocation
        error = precision_error(args.precision, device, "--precision")
    except parallel.StartupError as e:
        error = str(e)
    failed = parallel.agree(comm, error)
    if failed and master_process:
        refuse(f"rank {failed[0]}: {failed[1]}")
    elif failed:
        sys.exit(EXIT_USAGE)
    threads = args.threads or parallel.default_threads(comm)
    torch.set_num_threads(threads)
    parallel.tune_malloc()
    parallel.warm_up_torch()

    # ranks that share cores sleep while they wait for each other (stops, data-parallel sums);
    # ranks with cores of their own spin in MPI_Wait (lowest latency)
    wait_interval = 1e-4 if parallel.oversubscribed(comm, threads) else None
    mine, grouping = assignment(rank, size, plan, args)
    group = None
    if grouping is not None:  # P = G*N: the G ranks of each subdomain train its model data parallel
        color, member, _ = grouping
        group = parallel.DataParallelGroup(comm, color=color, key=member, wait_interval=wait_interval)

    resume = plan.progress
    resuming = resume is not None and not resume.get("fresh")
    stopper = parallel.StopAgreement(comm)
    directory = RunDirectory(args.out, rank, args, stopper, resuming, resume if resuming else None)
    timer = PhaseTimer(rundir.read_json(directory.path(rundir.phases_file(rank)), {}) if resuming else None)
    stops = AgreedStops(stopper, timer, wait_interval=wait_interval)
    ctx = Context(comm=comm, device=device, precision=args.precision, mine=mine, group=group, timer=timer,
                  stops=stops, checkpoints=directory, progress=progress_to_log(master_process))
    leader, nodes, global_threads = parallel.node_leaders(comm, threads)
    spread = args.mode == "compare" and not global_cnn_alone(args, size)  # the node leaders, not rank 0 alone
    return Run(ctx=ctx, args=args, plan=plan, threads=threads,
               trains_global=global_share(plan, args, master_process, size, (leader, nodes)) is not None,
               global_size=global_share(plan, args, True, size, (True, nodes)) or 1,  # a trainer's count
               global_threads=(args.global_threads or global_threads) if spread else threads)


def open_run_directory(run: Run, bytes_read: int):
    """Rank 0 makes the run directory, config.json and the marker (or, resuming, records a new
    segment); every rank then logs to RUN/logs/rank<r>.log, and rank 0 prints the header.
    Returns every rank's host:device on rank 0 (None on the others)."""
    ctx = run.ctx
    args, comm, size, threads = run.args, ctx.comm, ctx.comm.Get_size(), run.threads
    dec, work = run.plan.decomposition, run.plan.work
    start_segment(comm, run.directory, args, threads)
    where = parallel.device_name(ctx.device)
    log.info("mpidd %s, torch %s, %s; %d ranks, %d threads, device %s; subdomains %s (boxes %s)%s, %d bytes read",
             __version__, torch.__version__, parallel.library_version(), size, threads, where, ctx.mine,
             [dec.box(i) for i in ctx.mine] if work.boxes else "whole images",
             f", data parallel member {ctx.group.rank}/{ctx.group.size}" if ctx.group else "",
             bytes_read)
    devices = parallel.gather_to_root(comm, f"{socket.gethostname()}:{where}")
    if ctx.master_process:
        print_header(run, devices)
    return devices


def finish(run: Run, stats: dict, rows: list, accuracies: dict, devices):
    """Every rank's stats and metric rows to rank 0, which writes results.json, metrics.csv,
    model.pt and the report, marks the run finished and prints its table; then every rank
    removes its coherent resume states (no longer needed)."""
    ctx = run.ctx
    args, comm, plan, size, threads = run.args, ctx.comm, run.plan, ctx.comm.Get_size(), run.threads
    gathered_reports = parallel.gather_to_root(comm, (stats, rows))
    if ctx.master_process:
        all_stats = [st for st, _ in gathered_reports]
        all_rows = [r for _, rs in gathered_reports for r in rs]
        versions = {"mpi_library": parallel.library_version(), "mpi4py": parallel.mpi4py_version(),
                    "torch": torch.__version__, "h5py": h5py.__version__, "numpy": np.__version__,
                    "python": sys.version.split()[0]}
        if plan.work.width:
            results = assemble_width_results(args, plan, all_stats, accuracies, size, threads, versions)
        else:
            results = assemble_results(args, plan, all_stats, accuracies, size, threads, versions)
        results["devices"] = devices
        if not plan.work.width:
            results["flops"] = model_flops(plan, args)  # forward, one image: the speed-up's FLOP limit
        marker = run.directory.marker
        results["restarts"] = {"segments": marker["segments"], "stops": marker.get("stops", [])}
        results["source"] = marker["segments"][-1].get("source")  # the code this segment started with
        rundir.write_json(os.path.join(args.out, "results.json"), results)
        rundir.write_metrics(os.path.join(args.out, "metrics.csv"), all_rows)
        write_model_file(run, accuracies)
        run.directory.mark(state="finished")
        print(format_any(results), flush=True)
        print(f"results: {os.path.join(args.out, 'results.json')}", flush=True)
        if args.report and write_run_report(args.out):
            print(f"report: {os.path.join(args.out, 'report', 'report.md')}", flush=True)
    parallel.sleepy_barrier(comm)  # the marker says finished: the resume states are no longer needed
    for init in plan.work.coherent:
        for file in rundir.coherent_state_checkpoints(f"coherent_{init}", ctx.rank):
            with contextlib.suppress(FileNotFoundError):
                os.remove(run.directory.path(file))


def access_choice(per_rank) -> dict:
    """config.json's data_access_choice from every rank's (mode, why)."""
    modes = [m for m, _ in per_rank]
    return {"modes": modes, "why": [w for _, w in per_rank],
            "summary": (f"data access {modes[0]} on every rank ({per_rank[0][1]} on rank 0)" if len(set(modes)) == 1
                        else "data access " + ", ".join(f"rank {r} {m}" for r, m in enumerate(modes))
                        + f" ({per_rank[0][1]} on rank 0)")}


def print_header(run: Run, devices):
    ctx = run.ctx
    args, plan, size, threads = run.args, run.plan, ctx.comm.Get_size(), run.threads
    dec, work = plan.decomposition, plan.work
    if getattr(args, "grid_choice", None) and not run.directory.resuming:
        print(f"mpidd: {args.grid_choice}", flush=True)
    if plan.note:
        print(f"mpidd: {plan.note}", flush=True)
    print(f"mpidd: {args.data_access_choice['summary']}", flush=True)
    if run.directory.resuming:
        stops = len(run.directory.marker.get("stops", []))
        print(f"mpidd: resuming {args.out} (stopped {stops} time(s) before)", flush=True)
    if work.width:
        print(f"mpidd: {size} ranks x {threads} threads, mode width: {args.arch} global CNN of width {args.width} "
              f"({plan.global_params:,} parameters) split into {args.subnets} sub-networks of width "
              f"{args.width // args.subnets} ({plan.subnet_params:,} parameters each), "
              f"{'disjoint shards' if args.shard else 'full training set each'}; run directory {args.out}",
              flush=True)
    else:
        replicas = f" ({ctx.group.size} ranks per model, data parallel)" if ctx.group is not None else ""
        print(f"mpidd: {size} ranks x {threads} threads{replicas}, mode {args.mode}, grid {format_grid(dec.grid)} "
              f"overlap {dec.overlap}, subimages {format_grid(dec.subimage_shape)}, {args.arch} local width "
              f"factor {plan.width_factor:g} ({plan.local_params:,} vs {plan.global_params:,} "
              f"global parameters); run directory {args.out}", flush=True)
    if args.precision != "32":
        print(f"mpidd: precision {args.precision}: the CNNs' forward passes in bfloat16 (autocast), weights, "
              f"optimizer state, loss and coarse DNN in float32", flush=True)
    unique = sorted(set(devices))
    print("mpidd: devices " + ", ".join(f"rank {r} {d}" for r, d in enumerate(devices))
          if len(unique) > 1 or "cuda" in unique[0] else f"mpidd: every rank on {unique[0]}", flush=True)
    if size > 1 and (work.boxes or work.width):
        print(f"progress below is rank 0's; every rank logs its own to {args.out}/logs/rank<r>.log", flush=True)

