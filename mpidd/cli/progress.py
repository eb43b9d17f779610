"""A run's progress as a whole: a line as each phase starts ("phase 3 of 6: coarse DNN"), and an
estimate of the whole run's time left, added to every progress line of a training loop. Every
rank keeps its own (its log); rank 0's is printed. Plain lines only: a Slurm output file reads
like a terminal.

The estimate: each phase's work on this rank in FLOPs (forward FLOPs of its models, x3 a
training image, x1 an evaluated one), turned into seconds with this rank's CPU seconds per FLOP
measured so far, times the wall/CPU ratio measured where every rank works at once (ranks that
share cores run slower) or 1 in a phase this rank runs alone (the others sleep meanwhile),
divided by its threads over the run's (the global CNN with the waiting ranks' cores). Larger
models run more FLOPs per CPU second than the small local CNNs the rate is first measured on,
so the estimate is high until they run.
Reading data, gathers and waits count nothing: an estimate, not a promise."""

from __future__ import annotations

import datetime
import math
import time
from dataclasses import dataclass

import torch

from ..combine import coarse_epochs
from ..models import CoarseDNN, build_cnn, count_parameters, forward_flops
from ..options import cnn_config, coarse_options
from ..recomposition import build_subnet


@dataclass(frozen=True)
class PhaseWork:
    name: str        # as the run's timer names it
    title: str       # for the phase line
    flops: float     # this rank's, 0 where it only reads, exchanges or waits
    shared: bool     # every rank works at the same time (else this rank alone, or waiting)
    threads: float = 1.0  # its torch threads over the run's (the global CNN on the waiting ranks' cores)


def training_flops(forward: float, epochs: int, n_train: int, n_val: int, n_eval: int = 0) -> float:
    """A model trained `epochs` over n_train (x3: forward and backward), validated on n_val
    each epoch, then evaluated on n_eval more images."""
    return forward * (epochs * (3 * n_train + n_val) + n_eval)


def clock_text(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(max(seconds, 0.0))))


class RunProgress:
    """The phases of this rank's run, in order; start(name) as each begins. Clocks can be given
    (tests)."""

    def __init__(self, phases: list[PhaseWork], sinks=(), started=None, wall=time.perf_counter,
                 cpu=time.process_time):
        self.phases, self.sinks, self.wall, self.cpu = list(phases), tuple(sinks), wall, cpu
        self.started = wall() if started is None else started  # the run's start, on the `wall` clock
        self.current = None         # index of the phase under way
        self.mark = (0.0, 0.0)      # (wall, CPU) when it started
        self.cpu_per_flop = None    # measured in finished phases that did work
        self.done = {"flops": 0.0, "cpu": 0.0, "shared_wall": 0.0, "shared_cpu": 0.0}

    def index(self, name: str) -> int | None:
        return next((k for k, p in enumerate(self.phases) if p.name == name), None)

    def start(self, name: str):
        """Phase `name` begins (the one before it, if any, ends): its line to every sink."""
        self._end()
        k = self.index(name)
        if k is None:
            return
        self.current, self.mark = k, (self.wall(), self.cpu())
        left = self.left_s(None)
        estimate = f", run about {clock_text(left)} left" if left is not None else ""
        self._say(f"phase {k + 1} of {len(self.phases)}: {self.phases[k].title} "
                  f"(run {clock_text(self.mark[0] - self.started)} so far{estimate})")

    def finish(self):
        """The last phase has ended."""
        self._end()
        self.current = None

    def _end(self):
        if self.current is None:
            return
        phase = self.phases[self.current]
        wall, cpu = self.wall() - self.mark[0], self.cpu() - self.mark[1]
        if phase.flops > 0 and cpu > 0:
            self.done["flops"] += phase.flops
            self.done["cpu"] += cpu
            self.cpu_per_flop = self.done["cpu"] / self.done["flops"]
            if phase.shared:
                self.done["shared_wall"] += wall
                self.done["shared_cpu"] += cpu

    def left_s(self, phase_eta_s: float | None) -> float | None:
        """Seconds left in the run: the current phase's own ETA (`phase_eta_s`, from its
        progress line; None at its start: its whole estimate), plus the phases after it. None
        until something has been measured."""
        k = self.current
        if k is None:
            return None
        cpu_per_flop, shared_ratio = self.cpu_per_flop, None
        if self.done["shared_cpu"] > 0:
            shared_ratio = self.done["shared_wall"] / self.done["shared_cpu"]
        if cpu_per_flop is None and phase_eta_s is not None and self.phases[k].flops > 0:
            # nothing finished yet: what the current phase has done so far (its share of its work
            # from its ETA) at the CPU it took
            wall, cpu = self.wall() - self.mark[0], self.cpu() - self.mark[1]
            fraction = wall / (wall + phase_eta_s) if wall + phase_eta_s > 0 else 0.0
            if fraction > 0 and cpu > 0:
                cpu_per_flop = cpu / (self.phases[k].flops * fraction)
                if self.phases[k].shared:
                    shared_ratio = wall / cpu
        if cpu_per_flop is None:
            return None
        rest = self.phases[k + 1:] if phase_eta_s is not None else self.phases[k:]
        seconds = phase_eta_s or 0.0
        for p in rest:
            seconds += p.flops * cpu_per_flop * (max(shared_ratio or 1.0, 1.0) if p.shared else 1.0) / p.threads
        return seconds if math.isfinite(seconds) else None

    def suffix(self, phase_eta_s: float) -> str:
        """What a training loop's progress line ends with: the run's time left."""
        left = self.left_s(phase_eta_s)
        return f" | run {clock_text(left)} left" if left is not None else ""

    def _say(self, text):
        for sink in self.sinks:
            sink(text)


def model_flops(plan, args) -> dict:
    """Forward FLOPs of one image (subimage) of the run's global CNN and local CNN (results.json's
    "flops"; the FLOP limit of the two-level speed-up is their ratio)."""
    info, dec, cnn = plan.info, plan.decomposition, cnn_config(args)
    C, K = info.channels, info.num_classes
    with torch.device("meta"):  # shapes only: no weights, no activations in memory
        flops = {"global_forward": forward_flops(build_cnn(C, K, info.spatial_shape, cnn), info.image_shape)}
        if plan.work.boxes:
            flops["local_forward"] = forward_flops(build_cnn(C, K, dec.subimage_shape, cnn, plan.width_factor),
                                                   (C, *dec.subimage_shape))
    return flops


def phases_of(run) -> list[PhaseWork]:
    """The phases this rank's run goes through, in order, with this rank's FLOPs in each (see
    the module's docstring): what every_phase runs for the run's Work."""
    ctx, args, plan = run.ctx, run.args, run.plan
    info, dec, work = plan.info, plan.decomposition, plan.work
    C, K, cnn, sizes = info.channels, info.num_classes, cnn_config(args), info.sizes
    def share(n):  # this rank's samples of a split of n (all but in a data-parallel group)
        a, b = ctx.group.share(n) if ctx.group is not None else (0, n)
        return b - a
    n_tr, n_val, n_test = share(sizes["train"]), share(sizes["val"]), share(sizes["test"])
    phases = []
    if work.width:
        M = args.subnets
        with torch.device("meta"):  # shapes only, as model_flops
            f_sub = forward_flops(build_subnet(C, K, info.spatial_shape, cnn, M), info.image_shape)
        f_glob = model_flops(plan, args)["global_forward"]
        n_sub = sizes["train"] // M if args.shard else sizes["train"]
        alone = f_glob * (2 * args.epochs * (3 * sizes["train"] + sizes["val"]) + 4 * (sizes["val"] + sizes["test"]))
        return [
            PhaseWork("subnets", f"sub-networks {ctx.mine} ({M} in all)", len(ctx.mine) * training_flops(
                f_sub, args.subnet_epochs, n_sub, sizes["val"], sizes["val"] + sizes["test"]), True),
            PhaseWork("recomposed", "the recomposed network, then the global CNN from random weights (rank 0)",
                      alone if ctx.master_process else 0.0, False)]
    forward = model_flops(plan, args)
    f_local = forward.get("local_forward", 0)
    mine = len(ctx.mine)
    if work.local:
        phases.append(PhaseWork("local", f"local CNNs {ctx.mine} of {dec.num_subdomains}", mine * training_flops(
            f_local, args.epochs, n_tr, n_val, n_tr + n_val + n_test), True))
        phases.append(PhaseWork("gather", "gather the class probabilities to rank 0", 0.0, True))
        coarse = CoarseDNN(dec.num_subdomains * K, K, args.coarse_hidden, args.coarse_dropout)
        opts = coarse_options(args)
        steps = coarse_epochs(sizes["train"], opts, args.coarse_steps) * -(-sizes["train"] // opts.batch_size)
        f_dnn = 2 * count_parameters(coarse)
        phases.append(PhaseWork("coarse", "coarse DNN, average and vote (rank 0)", f_dnn * (
            3 * steps * opts.batch_size + sizes["val"] * opts.epochs) if ctx.master_process else 0.0, False))
    names = {"random": "coherent CNN-DNN from random weights", "pretrained": "coherent CNN-DNN, transfer learning"}
    for init in work.coherent:
        flops = mine * training_flops(f_local, args.coherent_epochs, n_tr, n_val, n_test)
        phases.append(PhaseWork(f"coherent_{init}", f"{names[init]} (model parallel, every rank)", flops, True))
    if work.global_cnn:
        ranks = run.global_ranks or 1
        f_glob = forward["global_forward"]
        n = {s: -(-sizes[s] // ranks) for s in sizes}
        flops = training_flops(f_glob, args.epochs, n["train"], n["val"], n["train"] + n["val"] + n["test"])
        title = (f"global CNN, data parallel over {ranks} ranks" if ranks > 1 else
                 f"global CNN on rank 0 with {run.global_threads} thread{'s' if run.global_threads > 1 else ''}")
        phases.append(PhaseWork("global", title, flops if run.global_ranks is not None else 0.0, ranks > 1,
                                run.global_threads / run.threads))
    return phases
