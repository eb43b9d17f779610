"""mpirun -n 4 python benchmarks/communication.py
(or: mpirun -n 4 python benchmarks/communication.py --results runs/demo, with a real run's local phase)

Communication against compute in mpidd's three parallel modes, with message sizes.

Prints on rank 0 one table row per message pattern, all measured on the same ranks in one run:

1. two-level: parallel.gather_probabilities of the n x K float32 class probabilities of every
   subdomain to rank 0, once per split (train, validation, test), for grids 2x2 and 4x4. Compared
   with the local phase: the run's own (--results RUN_DIR: max over ranks of
   per_rank[r]["phases"]["local"]), or an estimate from timing --steps training steps of the
   rank's local CNNs (batch 128) scaled to ceil(n_train / 128) steps x --epochs.
2. coherent: the model-parallel exchange of a step (gather of B x N x K local outputs to rank 0,
   scatter of their gradients back; benchmarks/exchange.py's exchange_benchmark), against the training step of
   the rank's local CNNs at batch B.
3. data parallel: DataParallelGroup.sum_gradients (one Allreduce of every gradient, params x 4
   bytes) over all ranks, for the local CNN of 2x2 and the global CNN (28x28, width factor 1),
   against a training step of that model at batch B / ranks per rank (the ranks' quarters of a
   global batch). GroupBatchNorm's small allreduces are not included.

Seconds are per call: wall time (time.perf_counter) after a warm-up, all ranks starting after a
barrier, the max over ranks; compute also has its CPU time (time.process_time). Every rank
computes at once, as in training. On an oversubscribed machine (more ranks x threads than cores,
e.g. 4 ranks on 2 cores) ranks share cores, so compute wall times exceed their CPU times and a
collective's wall time includes waiting for ranks that are descheduled: communication looks
dearer than on one core per rank.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch

from mpidd import parallel
from exchange import exchange_benchmark
from mpidd.decomposition import Decomposition, parse_grid, subdomains_of_rank
from mpidd.engine import TrainOptions, make_optimizer, to_channels_last, to_float
from mpidd.models import CNNConfig, build_cnn, count_parameters, local_width_factor


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--grids", default="2x2,4x4", help="subdomain grids for the two-level and coherent rows")
    p.add_argument("--image", default="28x28", help="image size")
    p.add_argument("--classes", type=int, default=10, help="K")
    p.add_argument("--sizes", default="55000,5000,10000", help="samples of the train, val and test splits")
    p.add_argument("--batch-size", type=int, default=128, help="B (global batch for data parallel)")
    p.add_argument("--epochs", type=int, default=3, help="epochs of the estimated local phase")
    p.add_argument("--steps", type=int, default=20, help="training steps to time (per model)")
    p.add_argument("--comm-steps", type=int, default=200, help="exchanges and allreduces to time")
    p.add_argument("--gather-repeats", type=int, default=3, help="two-level gathers (all splits) to time")
    p.add_argument("--results", default=None, help="RUN_DIR with results.json: its local phase instead of "
                                                   "the estimate (for the row of its grid)")
    p.add_argument("--arch", choices=("vgg", "resnet"), default="vgg", help="CNN family")
    p.add_argument("--width", type=int, default=48, help="width of the global CNN (local: scaled)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per rank (default: cores / ranks)")
    return p


def slowest(comm, value):
    """Max over ranks, on every rank."""
    return max(parallel.allgather(comm, value))


def time_calls(comm, call, repeats, warmup=3):
    """Wall seconds per call of call() (max over ranks) and CPU seconds (max over ranks)."""
    for _ in range(warmup):
        call()
    parallel.sleepy_barrier(comm)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        call()
    wall, cpu = (time.perf_counter() - wall) / repeats, (time.process_time() - cpu) / repeats
    return slowest(comm, wall), slowest(comm, cpu)


def training_step(models, shape, batch, num_classes):
    """A function doing one training step (forward, backward, Adam) of every model on a random batch."""
    models = [to_channels_last(m, 2 + len(shape)) for m in models]
    optimizer = make_optimizer(torch.nn.ModuleList(models), TrainOptions())
    x = torch.randint(0, 256, (batch, 1, *shape), dtype=torch.uint8)
    y = torch.randint(0, num_classes, (batch,))

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = sum(torch.nn.functional.cross_entropy(m(to_float(x)), y) for m in models)
        loss.backward()
        optimizer.step()
    return step


def read_results(run_dir):
    """(grid, local wall, local cpu, gather wall, sizes) of a run, max over ranks."""
    with open(os.path.join(run_dir, "results.json")) as f:
        results = json.load(f)
    phases = [r["phases"] for r in results["per_rank"]]
    return (results["decomposition"]["grid"], max(p["local"]["wall_s"] for p in phases),
            max(p["local"]["cpu_s"] for p in phases), max(p["gather"]["wall_s"] for p in phases), results["sizes"])


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    comm = parallel.world()
    rank, size = comm.Get_rank(), comm.Get_size()
    parallel.install_abort_on_error(comm)
    torch.set_num_threads(args.threads or parallel.default_threads(comm))
    parallel.tune_malloc()
    parallel.warm_up_torch()
    image, K, B = parse_grid(args.image), args.classes, args.batch_size
    sizes = [int(n) for n in args.sizes.split(",")]
    cfg = CNNConfig(arch=args.arch, width=args.width)
    run = read_results(args.results) if args.results else None
    rows = []  # (what, grid, bytes per message, comm s, compared with, compute wall s, compute cpu s)

    for grid in args.grids.split(","):
        dec = Decomposition(image, parse_grid(grid), 0)
        N = dec.num_subdomains
        mine = subdomains_of_rank(rank, size, N)
        wf = local_width_factor(1, K, image, dec.subimage_shape, N, cfg)
        models = [build_cnn(1, K, dec.subimage_shape, cfg, wf) for _ in mine]
        step_s, step_cpu = time_calls(comm, training_step(models, dec.subimage_shape, B, K), args.steps)

        # 1. two-level: one Gatherv per split, as mpidd.methods.twolevel does
        local = [{i: np.random.rand(n, K).astype(np.float32) for i in mine} for n in sizes]

        def gather_all_splits():
            for n, probs in zip(sizes, local):
                parallel.gather_probabilities(comm, probs, N, n, K)
        gather_s, _ = time_calls(comm, gather_all_splits, args.gather_repeats, warmup=1)
        steps = math.ceil(sizes[0] / B) * args.epochs
        to_root = sum(sizes) * N * K * 4
        rows.append((f"two-level gather ({len(sizes)} splits, {N}x{K}/sample)", grid, f"{to_root:,} to root",
                     gather_s, f"local phase, est. {len(mine)} CNN x {steps} steps", step_s * steps, step_cpu * steps))
        if run and run[0] == grid:
            _, local_wall, local_cpu, run_gather, run_sizes = run
            rows.append(("  same, vs the run's local phase", grid, "", gather_s,
                         f"local phase of {args.results}", local_wall, local_cpu))
            rows.append(("  the run's own gather", grid, f"{sum(run_sizes.values()) * N * K * 4:,} to root",
                         run_gather, f"local phase of {args.results}", local_wall, local_cpu))

        # 2. coherent: gather + scatter of B x N x K per step (the step is timed above)
        bench = argparse.Namespace(image=args.image, grid=grid, classes=K, batch_size=B, steps=args.comm_steps,
                                   compute_steps=1, arch=args.arch, width=args.width)
        measured = exchange_benchmark(comm, bench)  # its own step timing (1 step) is not used
        exchange_s = parallel.broadcast_from_root(comm, measured and max(r[0] for r in measured))
        rows.append((f"coherent exchange (B={B})", grid, f"{2 * B * N * K * 4:,} (2 x {B}x{N}x{K})", exchange_s,
                     f"local step, {len(mine)} CNN, batch {B}", step_s, step_cpu))

    # 3. data parallel: allreduce of every gradient, all ranks one group
    group = parallel.DataParallelGroup(comm, color=0, key=rank)
    dec = Decomposition(image, (2, 2), 0)
    wf = local_width_factor(1, K, image, dec.subimage_shape, dec.num_subdomains, cfg)
    for name, shape, factor in (("local CNN 2x2", dec.subimage_shape, wf), ("global CNN", image, 1.0)):
        model = build_cnn(1, K, shape, cfg, factor)
        step = training_step([model], shape, B // size, K)
        step_s, step_cpu = time_calls(comm, step, args.steps)
        sum_s, _ = time_calls(comm, lambda: group.sum_gradients(model), args.comm_steps)
        rows.append((f"data-parallel allreduce, {name}", "x".join(map(str, shape)),
                     f"{count_parameters(model) * 4:,} ({count_parameters(model):,} params)", sum_s,
                     f"step, batch {B // size} per rank", step_s, step_cpu))

    cores, ranks = parallel.node_cores_and_ranks(comm)  # collective: every rank
    if rank == 0:
        print(f"{parallel.library_version()}")
        print(f"{size} ranks x {torch.get_num_threads()} torch threads, {cores} cores for {ranks} ranks on this node"
              + (" (oversubscribed: wall times include waits for descheduled ranks)"
                 if ranks * torch.get_num_threads() > cores else ""))
        print(f"{args.arch} width {args.width}, K={K}, sizes {args.sizes}, batch {B}; seconds per call, max over "
              f"ranks; comm share = comm / (compute + comm), wall")
        header = ("what", "grid", "bytes per message", "comm s", "compared with", "compute s", "cpu s", "comm share")
        table = [header] + [(what, grid, nbytes, f"{comm_s:.3g}", vs, f"{wall:.3g}", f"{cpu:.3g}",
                             f"{100 * comm_s / (wall + comm_s):.2f}%")
                            for what, grid, nbytes, comm_s, vs, wall, cpu in rows]
        widths = [max(len(r[c]) for r in table) for c in range(len(header))]
        for r in table:
            print("  ".join(cell.ljust(w) if c in (0, 1, 2, 4) else cell.rjust(w)
                            for c, (cell, w) in enumerate(zip(r, widths))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
