"""What a method needs from its caller, besides the data: a `Context`. No MPI import here.

The base class is what the Python API uses: no checkpoints, no stop signals, no progress
unless asked. The command line (mpidd.train) subclasses it to add the run directory's
checkpoints and resume, the agreed stops on SIGTERM/SIGUSR1, per-rank logs and progress.
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


def progress_printer(name, epochs, models_after=0, sinks=(print,)):
    """One progress line per epoch (and per `log_interval` batches) to every sink, e.g. print
    and a logger. The ETA covers `models_after` more models of the same size on this rank."""
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
        for sink in sinks:
            sink(text)
    return report


@dataclass
class Context:
    """One rank's part in a method: the communicator, the device, its subdomains and its
    data-parallel group, and hooks (stop polls, checkpoints, progress) that do nothing here.

    comm:    the communicator every collective of the method runs on (never COMM_WORLD
             unless the caller passed it);
    mine:    this rank's subdomains (or width sub-networks);
    group:   the mpidd.parallel.DataParallelGroup that trains this rank's model(s) with it, if any;
    precision: the CNNs' forward passes, "32" or "bf16-mixed" (engine.PRECISIONS); the coarse
             DNN runs in float32 either way.
    """
    comm: object
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "32"
    mine: list = field(default_factory=list)
    group: object = None
    verbose: bool = False
    phases: PhaseTimer = field(default_factory=PhaseTimer)  # ctx.phases("name"): times a phase

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

    # --- hooks: the command line overrides them -------------------------------------------

    def poll(self) -> bool:
        """Stop? For a model this rank trains alone."""
        return False

    def poll_group(self) -> bool:
        """Stop? Agreed by the data-parallel group that trains the model (collective there)."""
        return False

    def poll_world(self) -> bool:
        """Stop? Agreed by every rank (collective): the coherent model's steps."""
        return False

    def sync(self):
        """A phase boundary that every rank reaches (collective in the command line)."""

    def control(self, name: str, stop, write: bool = True, **fields) -> Control:
        """How the training loop of checkpoint `name` stops, saves and resumes (here: it
        only stops when `stop()` says so)."""
        return Control(stop=stop)

    def coherent_control(self, name: str) -> Control:
        """How the coherent model's loop (every rank in every step) stops, saves and resumes."""
        return Control(stop=self.poll_world)

    def log_progress(self, name, epochs, models_after=0):
        """Progress callback of a training loop: rank 0 prints when verbose."""
        if self.verbose and self.master_process:
            return progress_printer(name, epochs, models_after, sinks=(lambda t: print(t, flush=True),))
        return None
