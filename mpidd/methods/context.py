"""What a method needs from its caller, besides the data: a `Context`. No MPI import here.

A Context is this rank's part (communicator, device, subdomains, data-parallel group, phase
timer) and three small interfaces the caller provides:

    Stops        when a training loop stops (the API: never; the command line: a stop agreed
                 by every rank on SIGTERM/SIGUSR1, cli.run.AgreedStops)
    Checkpoints  how a training loop saves and resumes (the API: it does not; the command
                 line: the run directory's checkpoints and marker, cli.run.RunDirectory)
    Progress     where progress lines go (the API: rank 0's stdout when verbose; the command
                 line: every rank's log and rank 0's stdout)
"""

from __future__ import annotations

import datetime
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..engine import Control
from ..models import group_batchnorm


class PhaseTimer:
    """Wall and CPU seconds per phase of this rank (CPU: process time, all threads), and the
    process's peak resident memory when each phase ended (`peak_rss`: which phase set it)."""

    def __init__(self, seconds=None):
        self.seconds = seconds or {}
        self.peak_rss = {}

    @contextmanager
    def __call__(self, name):
        w, c = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - w, time.process_time() - c)
            self.peak_rss[name] = peak_rss_bytes()

    def add(self, name, wall_s, cpu_s):
        """Count seconds measured elsewhere (e.g. the part of a phase spent in training steps)."""
        entry = self.seconds.setdefault(name, {"wall_s": 0.0, "cpu_s": 0.0})
        entry["wall_s"] += wall_s
        entry["cpu_s"] += cpu_s


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (Linux reports KiB; 0 where unknown)."""
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except (ImportError, OSError):
        return 0


def accuracy_text(value: float) -> str:
    return f"acc {100 * value:.2f}%"


def progress_printer(name, epochs, models_after=0, sinks=(print,), suffix=None, score=accuracy_text):
    """One progress line per epoch (and per `log_interval` batches) to every sink, e.g. print
    and a logger. The ETA covers `models_after` more models of the same size on this rank;
    `suffix(eta_s)`, if given, ends the line (the command line's whole-run estimate);
    score(value) writes a record's acc and val_acc (a dense task's score: its MAE, say)."""
    def report(r):
        if "seconds" in r:
            r = dict(r, eta_s=r["eta_s"] + models_after * epochs * r["seconds"])
        where = f"batch {r['batch']}/{r['batches']} " if "batch" in r else ""
        # the coherent model's loss is known on rank 0 only (other ranks log NaN: leave it out)
        scores = "" if r["loss"] != r["loss"] else f"loss {r['loss']:.4f} {score(r['acc'])} "
        if "batch" not in r and r["val_acc"] == r["val_acc"]:
            scores += f"val {100 * r['val_acc']:.2f}% " if score is accuracy_text else f"val {score(r['val_acc'])} "
        text = (f"{name}: epoch {r['epoch']}/{epochs} {where}{scores}{r['images_per_s']:.0f} img/s "
                f"ETA {datetime.timedelta(seconds=round(r['eta_s']))}")
        if suffix is not None:
            text += suffix(r["eta_s"])
        for sink in sinks:
            sink(text)
    return report


class Stops:
    """When a training loop stops; here never. Each poll is called once per step (or
    evaluation batch) by every rank it names, in the same order."""

    def poll(self) -> bool:
        """Stop? For a model this rank trains alone."""
        return False

    def poll_group(self, group) -> bool:
        """Stop? Agreed by the ranks of `group` (a DataParallelGroup) that train one model."""
        return False

    def poll_world(self) -> bool:
        """Stop? Agreed by every rank of the communicator (the coherent model's steps)."""
        return False

    def sync(self):
        """A phase boundary that every rank reaches (collective in the command line)."""


class Checkpoints:
    """How a training loop saves and resumes; here it does neither (engine.Control)."""

    def control(self, name: str, stop, write: bool = True, epoch_saves: bool = True, **fields) -> Control:
        """The loop of the model saved as checkpoint `name` (`fields` are stored beside it;
        `write`: this rank writes it; epoch_saves: every epoch, else only at its end and at a
        stop). It stops when `stop()` says so."""
        return Control(stop=stop)

    def coherent_control(self, name: str, stop) -> Control:
        """The coherent model's loop (every rank in every step, each saving its part)."""
        return Control(stop=stop)


@dataclass(frozen=True)
class Progress:
    """Where a training loop's progress lines go: every callable in `sinks` (none: silent);
    `suffix(eta_s)`, if set, ends each line."""
    sinks: tuple = ()
    suffix: object = None

    def printer(self, name: str, epochs: int, models_after: int = 0, score=accuracy_text):
        """The progress callback of a training loop (None when silent); the ETA counts
        `models_after` more models of the same size on this rank; score(value): see progress_printer."""
        return progress_printer(name, epochs, models_after, self.sinks, self.suffix, score) if self.sinks else None


def print_flushed(text):
    print(text, flush=True)


@dataclass
class Context:
    """One rank's part in a method and the caller's interfaces (the defaults do nothing).

    comm:    the communicator every collective of the method runs on (never COMM_WORLD
             unless the caller passed it);
    mine:    this rank's subdomains (or width sub-networks);
    group:   the mpidd.parallel.DataParallelGroup that trains this rank's model(s) with it, if any;
    precision: the CNNs' forward passes, "32" or "bf16-mixed" (engine.PRECISIONS); the coarse
             DNN runs in float32 either way;
    timer:   ctx.timer("name") times a phase of this rank.
    """
    comm: object
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "32"
    mine: list = field(default_factory=list)
    group: object = None
    timer: PhaseTimer = field(default_factory=PhaseTimer)
    stops: Stops = field(default_factory=Stops)
    checkpoints: Checkpoints = field(default_factory=Checkpoints)
    progress: Progress = field(default_factory=Progress)

    @property
    def rank(self):
        return self.comm.Get_rank()

    @property
    def master_process(self):
        return self.rank == 0

    @property
    def leader(self):
        """Writes the checkpoints of its group's model (the members hold the same weights)."""
        return self.group is None or self.group.rank == 0

    def on_device(self, model):
        """The model on this rank's device; in a data-parallel group, with group-wide BatchNorm."""
        model = model.to(self.device)
        return group_batchnorm(model, self.group.allreduce) if self.group is not None else model

    def model_stop(self, alone: bool = False):
        """The stop poll of a model this rank trains: alone, or with its data-parallel group."""
        if alone or self.group is None:
            return self.stops.poll
        return lambda: self.stops.poll_group(self.group)
