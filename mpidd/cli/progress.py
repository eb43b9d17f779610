"""A run's progress as a whole: a line as each phase starts ("phase 3 of 6: coarse DNN"), and an
estimate of the whole run's time left, added to every progress line of a training loop (a
classifier's phases: cli.phases; a dense run's: dense_phases). Every
rank keeps its own (its log); rank 0's is printed. Plain lines only: a Slurm output file reads
like a terminal.

The estimate: each phase's work on this rank in FLOPs (forward FLOPs of its models, x3 a
training image, x1 an evaluated one), turned into seconds at the CPU seconds per FLOP of its
model: measured in the run (finished phases of the same model, or the phase under way), else
calibrated at start by one training step of each model on this rank (calibrate), scaled by how
the run's measured phases compared with their calibration (evaluations, feeding, exchanges).
Then times the wall/CPU ratio measured where every rank works at once (ranks that share cores
run slower), or 1 in a phase this rank runs alone (the others sleep meanwhile), divided by its
threads over the run's (the global CNN with the waiting ranks' cores). Reading data, gathers and
waits count nothing: an estimate, not a promise."""

from __future__ import annotations

import datetime
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

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
    model: str = ""  # the model it runs (phases of one model run at one CPU s per FLOP)


def training_flops(forward: float, epochs: int, n_train: int, n_val: int, n_eval: int = 0) -> float:
    """A model trained `epochs` over n_train (x3: forward and backward), validated on n_val
    each epoch, then evaluated on n_eval more images."""
    return forward * (epochs * (3 * n_train + n_val) + n_eval)


def clock_text(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(max(seconds, 0.0))))


class RunProgress:
    """The phases of this rank's run, in order; start(name) as each begins. `calibrated`: CPU
    seconds per FLOP of the phases' models measured at start ({model: rate}, calibrate). Clocks
    can be given (tests)."""

    def __init__(self, phases: list[PhaseWork], sinks=(), started=None, wall=time.perf_counter,
                 cpu=time.process_time, calibrated: dict | None = None):
        self.phases, self.sinks, self.wall, self.cpu = list(phases), tuple(sinks), wall, cpu
        self.calibrated = dict(calibrated or {})
        self.started = wall() if started is None else started  # the run's start, on the `wall` clock
        self.current = None         # index of the phase under way
        self.mark = (0.0, 0.0)      # (wall, CPU) when it started
        self.done = {}              # model: [FLOPs, CPU s] of the finished phases that did work
        self.shared = [0.0, 0.0]    # [wall, CPU] of the finished phases every rank worked in

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
            done = self.done.setdefault(phase.model, [0.0, 0.0])
            done[0] += phase.flops
            done[1] += cpu
            if phase.shared:
                self.shared[0] += wall
                self.shared[1] += cpu

    def rates(self, phase_eta_s: float | None):
        """(CPU s per FLOP of each model measured so far, the measured over the calibrated CPU
        of those with a calibration, the wall/CPU ratio of shared phases or None). The phase under
        way counts for its model until a phase of that model has finished: the share of its work
        done (from its ETA) at the CPU it took."""
        done = {m: list(fc) for m, fc in self.done.items()}
        shared = list(self.shared)
        k = self.current
        if k is not None and phase_eta_s is not None and self.phases[k].flops > 0 \
                and self.phases[k].model not in done:
            wall, cpu = self.wall() - self.mark[0], self.cpu() - self.mark[1]
            fraction = wall / (wall + phase_eta_s) if wall + phase_eta_s > 0 else 0.0
            if fraction > 0 and cpu > 0:
                done[self.phases[k].model] = [self.phases[k].flops * fraction, cpu]
                if self.phases[k].shared and not shared[1]:
                    shared = [wall, cpu]
        measured = {m: c / f for m, (f, c) in done.items()}
        predicted = sum(self.calibrated[m] * f for m, (f, _) in done.items() if m in self.calibrated)
        actual = sum(c for m, (_, c) in done.items() if m in self.calibrated)
        return measured, (actual / predicted if predicted > 0 else 1.0), (shared[0] / shared[1] if shared[1] else None)

    def left_s(self, phase_eta_s: float | None) -> float | None:
        """Seconds left in the run: the current phase's own ETA (`phase_eta_s`, from its
        progress line; None at its start: its whole estimate), plus the phases after it. None
        until something has been measured."""
        k = self.current
        if k is None:
            return None
        measured, correction, shared_ratio = self.rates(phase_eta_s)
        if not measured:
            return None
        overall = sum(fc[1] for fc in self.done.values()) / sum(fc[0] for fc in self.done.values()) \
            if self.done else next(iter(measured.values()))
        rest = self.phases[k + 1:] if phase_eta_s is not None else self.phases[k:]
        seconds = phase_eta_s or 0.0
        for p in rest:
            rate = measured.get(p.model) or (self.calibrated[p.model] * correction if p.model in self.calibrated
                                              else overall)
            seconds += p.flops * rate * (max(shared_ratio or 1.0, 1.0) if p.shared else 1.0) / p.threads
        return seconds if math.isfinite(seconds) else None

    def suffix(self, phase_eta_s: float) -> str:
        """What a training loop's progress line ends with: the run's time left."""
        left = self.left_s(phase_eta_s)
        return f" | run {clock_text(left)} left" if left is not None else ""

    def _say(self, text):
        for sink in self.sinks:
            sink(text)


CALIBRATION_FLOPS = 4e9  # a calibration step's budget (about 0.1 CPU s): its batch is cut to fit


def calibrate(build, input_shape, num_classes: int, batch_size: int) -> float | None:
    """CPU seconds per FLOP of a training step (forward, backward, Adam; FLOPs as training_flops
    counts them) of the model build() makes, on random inputs: the second of two steps (the
    first pays for allocations), at most batch_size inputs and CALIBRATION_FLOPS. The random
    number generators are left as they were."""
    with torch.random.fork_rng(devices=[]):
        model = build()
        flops = forward_flops(model, input_shape)
        if flops <= 0:
            return None
        batch = int(max(2, min(batch_size, CALIBRATION_FLOPS // (3 * flops))))
        x, y = torch.rand(batch, *input_shape), torch.randint(0, num_classes, (batch,))
        optimizer = torch.optim.Adam(model.parameters())
        model.train()
        for _ in range(2):
            cpu = time.process_time()
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            cpu = time.process_time() - cpu
    return cpu / (3 * batch * flops) if cpu > 0 else None


def calibrated_rates(run) -> dict:
    """{model: CPU s per FLOP} of the models this rank trains (phases_of's PhaseWork.model), one
    calibration step each on the CPU; nothing on a GPU (its CPU time is not its work)."""
    ctx, args, plan = run.ctx, run.args, run.plan
    if ctx.device.type != "cpu":
        return {}
    info, dec, work, cnn = plan.info, plan.decomposition, plan.work, cnn_config(args)
    C, K = info.channels, info.num_classes
    builds = {}
    if work.width:
        builds["subnet"] = (lambda: build_subnet(C, K, info.spatial_shape, cnn, args.subnets), info.image_shape,
                            args.batch_size)
    if work.local or work.coherent:
        builds["local"] = (lambda: build_cnn(C, K, dec.subimage_shape, cnn, plan.width_factor),
                           (C, *dec.subimage_shape), args.batch_size)
    if work.local and ctx.master_process:
        N = dec.num_subdomains
        builds["coarse"] = (lambda: CoarseDNN(N * K, K, args.coarse_hidden, args.coarse_dropout), (N * K,),
                            coarse_options(args).batch_size)
    if (work.global_cnn and run.global_ranks is not None) or (work.width and ctx.master_process):
        builds["global"] = (lambda: build_cnn(C, K, info.spatial_shape, cnn), info.image_shape, args.batch_size)
    rates = {m: calibrate(build, shape, K, batch) for m, (build, shape, batch) in builds.items()}
    return {m: r for m, r in rates.items() if r is not None}


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
                f_sub, args.subnet_epochs, n_sub, sizes["val"], sizes["val"] + sizes["test"]), True, model="subnet"),
            PhaseWork("recomposed", "the recomposed network, then the global CNN from random weights (rank 0)",
                      alone if ctx.master_process else 0.0, False, model="global")]
    forward = model_flops(plan, args)
    f_local = forward.get("local_forward", 0)
    mine = len(ctx.mine)
    if work.local:
        phases.append(PhaseWork("local", f"local CNNs {ctx.mine} of {dec.num_subdomains}", mine * training_flops(
            f_local, args.epochs, n_tr, n_val, n_tr + n_val + n_test), True, model="local"))
        phases.append(PhaseWork("gather", "gather the class probabilities to rank 0", 0.0, True))
        coarse = CoarseDNN(dec.num_subdomains * K, K, args.coarse_hidden, args.coarse_dropout)
        opts = coarse_options(args)
        steps = coarse_epochs(sizes["train"], opts, args.coarse_steps) * -(-sizes["train"] // opts.batch_size)
        f_dnn = 2 * count_parameters(coarse)
        phases.append(PhaseWork("coarse", "coarse DNN, average and vote (rank 0)", f_dnn * (
            3 * steps * opts.batch_size + sizes["val"] * opts.epochs) if ctx.master_process else 0.0, False,
            model="coarse"))
    names = {"random": "coherent CNN-DNN from random weights", "pretrained": "coherent CNN-DNN, transfer learning"}
    for init in work.coherent:
        flops = mine * training_flops(f_local, args.coherent_epochs, n_tr, n_val, n_test)
        phases.append(PhaseWork(f"coherent_{init}", f"{names[init]} (model parallel, every rank)", flops, True,
                                model="local"))
    if work.global_cnn:
        ranks = run.global_ranks or 1
        f_glob = forward["global_forward"]
        n = {s: -(-sizes[s] // ranks) for s in sizes}
        flops = training_flops(f_glob, args.epochs, n["train"], n["val"], n["train"] + n["val"] + n["test"])
        title = (f"global CNN, data parallel over {ranks} ranks" if ranks > 1 else
                 f"global CNN on rank 0 with {run.global_threads} thread{'s' if run.global_threads > 1 else ''}")
        phases.append(PhaseWork("global", title, flops if run.global_ranks is not None else 0.0, ranks > 1,
                                run.global_threads / run.threads, model="global"))
    return phases


def dense_phases(args, plan, mine: list, master_process: bool) -> list[PhaseWork]:
    """This rank's phases for RunProgress, with their training FLOPs (a U-Net's forward FLOPs x3
    a training sample, x1 an evaluated one): the local U-Nets (each rank its own), the gather and
    coarse network (every rank decodes its subdomains each step), each coherent model, the
    domain-parallel U-Net (each rank its tiles), the global U-Net (rank 0 alone; the other ranks
    wait)."""
    from ..options import dense_config
    from ..unet import build_unet
    info, dec, cfg = plan.info, plan.decomposition, dense_config(args)
    C, out = info.channels, info.targets.channels
    n = info.sizes
    local = forward_flops(build_unet(C, out, dec.subimage_shape, cfg.unet, plan.width_factor),
                          (C,) + dec.subimage_shape)
    mine_flops = local * len(mine)
    evaluated = n["val"] + n["test"]
    titles = {"local": f"local U-Nets {mine} of {dec.num_subdomains}", "coarse": "gather and coarse network",
              "coherent_random": "coherent (random init)", "coherent_pretrained": "coherent (transfer learning)",
              "domain_parallel": "global U-Net, domain parallel", "global": "global U-Net on rank 0"}
    phases = []
    if "local_only" in plan.models:
        phases += [PhaseWork("local", titles["local"], training_flops(mine_flops, args.epochs, n["train"], n["val"],
                                                                     evaluated), True, model="local"),
                   PhaseWork("coarse", titles["coarse"], training_flops(mine_flops, args.coarse_epochs, n["train"],
                                                                        n["val"], evaluated), True, model="coarse")]
    for name in ("coherent_random", "coherent_pretrained"):
        if name in plan.models:
            phases.append(PhaseWork(name, titles[name], training_flops(mine_flops, args.coherent_epochs, n["train"],
                                                                       n["val"], evaluated), True, model="coherent"))
    if "domain_parallel" in plan.models:  # this rank's tiles of the global U-Net, every step
        tiles = forward_flops(build_unet(C, out, dec.tile_shape, cfg.unet), (C,) + dec.tile_shape) * len(mine)
        phases.append(PhaseWork("domain_parallel", titles["domain_parallel"],
                                training_flops(tiles, args.epochs, n["train"], n["val"], evaluated), True,
                                model="domain_parallel"))
    if "global" in plan.models:
        whole = forward_flops(build_unet(C, out, dec.shape, cfg.unet), (C,) + dec.shape) if master_process else 0
        phases.append(PhaseWork("global", titles["global"],
                                training_flops(whole, args.epochs, n["train"], n["val"], evaluated), False,
                                model="global"))
    return phases
