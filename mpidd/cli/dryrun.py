"""mpidd.train --dry-run: what a launch would do, before it spends an allocation. Every rank works
out its part (subdomains, data-parallel group, the bytes it would read, data access, memory);
rank 0 prints the resolved configuration, the grid and why, and a table of the ranks. Nothing
is trained, no run directory is made, no checkpoint is read; the exit code is 0.

    mpirun -n 16 python -m mpidd.train --dry-run --data ct.h5 --grid 4x4
    sbatch jobs/slurm_cpu.sh --dry-run          # the same on the job's own allocation and MPI
"""

from __future__ import annotations

import json
import os
import socket

import torch

from .. import parallel
from ..decomposition import format_grid
from ..models import build_cnn, count_parameters
from ..options import cnn_config
from ..recomposition import build_subnet
from ..stream import choose_access, human_bytes
from .arguments import NOT_RECORDED
from .plan import Plan, assignment, data_share, global_cnn_alone, global_share

# A model being trained holds its weights, their gradients and the optimizer's state (Adam: two
# moments; SGD with momentum: one), float32: 4 copies of its parameters at most.
STATE_COPIES = 4


def activation_elements(model: torch.nn.Module, input_shape) -> int:
    """Elements of every leaf module's output for one sample (shapes only: the meta device)."""
    sizes = []
    hooks = [m.register_forward_hook(lambda m, i, out: sizes.append(out.numel()))
             for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model.to("meta").eval()(torch.empty((1, *input_shape), device="meta"))
    finally:
        for h in hooks:
            h.remove()
    return sum(sizes)


def models_of_rank(plan: Plan, args, mine, master_process: bool, global_ranks: int | None) -> list[tuple]:
    """(how many, model, input shape) of the models this rank trains (built on the CPU, not
    trained); global_ranks: see plan.global_share."""
    info, dec, work = plan.info, plan.decomposition, plan.work
    C, K, cfg = info.channels, info.num_classes, cnn_config(args)
    whole = (C, *info.spatial_shape)
    models = []
    if work.width and mine:  # its sub-networks; rank 0 also the recomposed network and the global CNN
        models.append((len(mine), build_subnet(C, K, info.spatial_shape, cfg, args.subnets), whole))
    elif work.boxes and mine:  # its local CNNs (every subdomain's has the same shape)
        models.append((len(mine), build_cnn(C, K, dec.subimage_shape, cfg, plan.width_factor),
                       (C, *dec.subimage_shape)))
    if (work.width and master_process) or global_ranks is not None:
        models.append((1, build_cnn(C, K, info.spatial_shape, cfg), whole))
    return models


def memory_estimate(plan: Plan, args, mine, master_process: bool, global_ranks, share: int, access: str) -> dict:
    """Bytes this rank would hold at its peak, by part (float32 throughout)."""
    models = models_of_rank(plan, args, mine, master_process, global_ranks)
    states = sum(n * STATE_COPIES * 4 * count_parameters(m) for n, m, _ in models)
    # one training batch at a time: every layer's output kept for the backward pass, and its gradient
    batch = max((2 * 4 * args.batch_size * activation_elements(m, shape) for _, m, shape in models), default=0)
    gathered = 0
    if master_process and plan.work.local:  # rank 0: every subdomain's probabilities of every sample
        gathered = 4 * sum(plan.info.sizes.values()) * plan.decomposition.num_subdomains * plan.info.num_classes
    parts = {"data": share if access == "memory" else 0, "model_states": states, "activations": batch,
             "gathered_probabilities": gathered, "process": process_bytes()}
    return {**parts, "total": sum(parts.values())}


def process_bytes() -> int:
    """What this process holds now, torch and MPI loaded, before any data (its resident set)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def dry_run(comm, args, plan: Plan) -> int:
    """Collective: every rank's part to rank 0, which prints the plan. Returns 0."""
    rank, size = comm.Get_rank(), comm.Get_size()
    master_process = rank == 0
    mine, group = assignment(rank, size, plan, args)
    leader, nodes, global_threads = parallel.node_leaders(comm, args.threads or parallel.default_threads(comm))
    global_ranks = global_share(plan, args, master_process, size, (leader, nodes))
    share = data_share(plan, args, mine, group[2] if group else None, global_ranks)
    access, why = choose_access(args.data_access, share, parallel.memory_per_rank(comm))
    memory = memory_estimate(plan, args, mine, master_process, global_ranks, share, access)
    row = {"rank": rank, "host": socket.gethostname(), "mine": mine, "group": group, "share": share,
           "global_ranks": global_ranks, "global_threads": global_threads,
           "access": access, "why": why, "memory": memory}
    rows = parallel.gather_to_root(comm, row)
    if master_process:
        print(format_dry_run(args, plan, size, rows), flush=True)
    return 0


def format_dry_run(args, plan: Plan, size: int, rows: list) -> str:
    dec, info, work = plan.decomposition, plan.info, plan.work
    config = {k: v for k, v in vars(args).items() if k not in NOT_RECORDED}
    lines = ["mpidd: dry run: nothing is trained and no run directory is made",
             f"data {args.data}: {info.num_classes} classes, {format_grid(info.image_shape)} images "
             f"({info.dtype}), train {info.sizes['train']}, val {info.sizes['val']}, test {info.sizes['test']}"]
    if args.mode == "global":
        lines.append(f"mode global: the {args.arch} global CNN on whole images ({plan.global_params:,} parameters), "
                     f"{'data parallel over ' if size > 1 else 'on '}{size} rank{'s' if size > 1 else ''}")
    elif work.width:
        lines.append(f"mode width: {args.subnets} sub-networks of the {args.arch} global CNN on {size} ranks "
                     f"({plan.subnet_params:,} parameters each, global {plan.global_params:,})")
    else:
        lines.append(f"mode {args.mode}: grid {format_grid(dec.grid)} ({getattr(args, 'grid_choice', None) or '--grid'}"
                     f"), overlap {dec.overlap}, subimages {format_grid(dec.subimage_shape)}, {args.arch} local "
                     f"width factor {plan.width_factor:g} ({plan.local_params:,} vs {plan.global_params:,} global "
                     f"parameters), {size} ranks")
        if work.global_cnn:
            ranks = rows[0]["global_ranks"]
            lines.append("global CNN: " + ("on rank 0 alone (the one-process baseline)" if global_cnn_alone(args, size)
                                           else f"the first rank of each node ({ranks}, data parallel across nodes) "
                                                f"with {rows[0]['global_threads']} threads, the others wait"))
    if plan.note:
        lines.append(plan.note)
    what = "sub-networks" if work.width else "subdomains"
    lines += ["", f"{'rank':>4}  {'host':<16} {what:<14} {'group':<10} {'data share':>11}  {'access':<7}"
                  f"{'memory est.':>12}"]
    for r in rows:
        group = f"{r['group'][1]}/{r['group'][2]}" if r["group"] else "-"
        mine = ",".join(map(str, r["mine"])) or "-"
        lines.append(f"{r['rank']:>4}  {r['host'][:16]:<16} {mine:<14} {group:<10} "
                     f"{human_bytes(r['share']):>11}  {r['access']:<7}{human_bytes(r['memory']['total']):>12}")
    biggest = max(rows, key=lambda r: r["memory"]["total"])
    parts = ", ".join(f"{k.replace('_', ' ')} {human_bytes(v)}" for k, v in biggest["memory"].items() if k != "total")
    lines += ["", f"data share: the rank's boxes of every split (its share of the samples in a data-parallel group), "
                  f"read once into memory, or streamed each pass; data access: {rows[0]['why']} (rank 0)",
              f"memory estimate of rank {biggest['rank']}, the largest: {parts}; not counted: the allocator's "
              f"slack, MPI's buffers, a stream's blocks in flight",
              f"{size} ranks x {args.threads or 'auto'} threads; images read in all: "
              f"{human_bytes(sum(r['share'] for r in rows))}",
              "", "resolved configuration (config.json of the run):", json.dumps(config, indent=1, default=str)]
    return "\n".join(lines)
