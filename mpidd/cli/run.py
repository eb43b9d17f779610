"""The command line's Context: the run directory's checkpoints and marker, stops agreed by every
rank (SIGTERM/SIGUSR1, exit 75), per-rank logs and rank 0's progress lines."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field


from .. import parallel, rundir
from ..engine import Control, Preempted
from ..methods.context import Context, progress_printer
from ..stream import StreamStats
from .plan import Plan


EXIT_USAGE = 2


EXIT_PREEMPTED = parallel.EXIT_PREEMPTED


# Ranks that train one model together agree on a stop every this many steps (or evaluation
# batches): a stop comes at most this many steps late, and the agreement costs 1/AGREE_EVERY
# of a small allreduce per step.
AGREE_EVERY = 10


log = logging.getLogger("mpidd")


@dataclass(kw_only=True)
class Run(Context):
    """The command line's Context: the job, its options and plan, the run directory's
    checkpoints and marker, and how every rank stops together (StopAgreement)."""
    args: object
    plan: Plan
    threads: int
    stopper: parallel.StopAgreement
    progress: dict = field(default_factory=dict)  # the marker (rank 0 writes it)
    resuming: bool = False
    bytes_whole: int = 0           # bytes of whole images read (global CNN, width mode)
    access: str = "memory"         # this rank's data access: memory or stream (--data-access)
    io: StreamStats = field(default_factory=StreamStats)  # what this rank's streams read and waited
    wait_interval: float | None = None  # sleep between tests of a pending MPI request (None: spin)
    polls: dict = field(default_factory=dict)  # collective stop polls so far, per communicator

    def path(self, name):
        return rundir.checkpoint_path(self.args.out, name)

    def poll(self) -> bool:
        return self.stopper.poll()

    def poll_group(self) -> bool:
        return self._agree("group", self.group.comm) if self.group is not None else self.stopper.poll()

    def poll_world(self) -> bool:
        return self._agree("world", self.stopper.comm)

    def _agree(self, key, comm) -> bool:
        """Every AGREE_EVERY-th poll the ranks of `comm` agree (an allreduce that sleeps while
        it waits); in between they only relay signals. Invariant: the ranks of `comm` poll the
        same number of times in the same order, so they agree at the same steps."""
        self.polls[key] = self.polls.get(key, 0) + 1
        if self.polls[key] % AGREE_EVERY:
            self.stopper.poll()
            return False
        return self.stopper.any(comm, self.wait_interval)

    def sync(self):
        """A phase boundary that every rank reaches (collective): raises Preempted if the job stops."""
        with self.phases("wait"):
            if self.stopper.sync():
                raise SyncedStop("stop agreed at a phase boundary")

    def control(self, name, stop, write=True, epoch_saves=True, **fields) -> Control:
        """Checkpoint `name` each epoch (epoch_saves; else only the last) and at a stop (if
        `write`), resumed from when resuming. A loop saved only at its end and at stops is redone
        from its start after a kill, computing the same: cheaper for short epochs than a file each."""
        def save(state):
            if write and (epoch_saves or state.get("stopped") or state.get("done")):
                rundir.save_checkpoint(self.path(name), **checkpoint_fields(state), **fields, args=vars(self.args))
        return Control(stop=stop, save=save, resume=loop_state(self.saved(name)))

    def coherent_control(self, name) -> Control:
        """Every rank saves its part of the coherent model each epoch; once all have, rank 0
        records the position in the marker (so it never promises more than the files hold)."""
        def save(state):
            position = {"epoch": state["epoch"], "step": state["step"]}
            path, previous = map(self.path, rundir.coherent_state_checkpoints(name, self.rank))
            if os.path.exists(path):
                os.replace(path, previous)
            rundir.save_checkpoint(path, position=position, loop=state)
            if state.get("stopped"):  # the stop path agrees and records the position
                self.progress[name] = position
                return
            stop = self.stopper.sync()  # every rank has saved this position: rank 0 records it
            self.mark(**{name: position})
            if stop:
                raise SyncedStop("stop agreed at a phase boundary")
        return Control(stop=self.poll_world, save=save, resume=self.coherent_state(name))

    def coherent_state(self, name: str):
        """This rank's saved state of coherent phase `name` at the position the marker agreed on
        (the newest file, or the one before it: a rank may have saved one position ahead)."""
        position = self.progress.get(name)
        if not self.resuming or position is None:
            return None
        for file in rundir.coherent_state_checkpoints(name, self.rank):  # the newest first
            saved = rundir.load_checkpoint(self.path(file))
            if saved is not None and saved["position"] == position:
                return saved["loop"]
        raise RuntimeError(f"rank {self.rank} has no state of {name} at {position}, which the marker records")

    def log_progress(self, name, epochs, models_after=0):
        """To the rank's log, and to stdout on rank 0."""
        sinks = (log.info, lambda text: print(text, flush=True)) if self.master_process else (log.info,)
        return progress_printer(name, epochs, models_after, sinks)

    def mark(self, **updates):
        """Rank 0: record progress in the marker (after the ranks' checkpoints it speaks for)."""
        if self.master_process:
            self.progress.update(updates)
            rundir.write_progress(self.args.out, self.progress)

    def saved(self, name):
        """This run's checkpoint `name` if it is resuming and has one (else None)."""
        return rundir.load_checkpoint(self.path(name)) if self.resuming else None


class SyncedStop(Preempted):
    """A stop agreed at a phase boundary (sync): every rank has already taken part in it."""


def checkpoint_fields(state: dict) -> dict:
    """A training loop's state as checkpoint fields: model, optimizer and epoch at the top (what
    --from and users read), the rest of the loop under `loop` (what --resume needs)."""
    loop = dict(state)
    model, optimizer = loop.pop("model"), loop.pop("optimizer")
    if loop["done"] and loop["best"] is not None:
        model = loop["best"]  # a model selected on val (coarse DNN): the checkpoint is the selection
    return {"model": model, "optimizer": optimizer, "epoch": loop["epoch"] - 1, "step": loop["step"],
            "done": loop["done"], "loop": loop}


def loop_state(saved: dict | None) -> dict | None:
    """The training loop state inside a checkpoint written through checkpoint_fields."""
    if saved is None or "loop" not in saved:
        return None
    model = saved["model"] if not (saved["loop"]["done"] and saved["loop"]["best"] is not None) else None
    return {**saved["loop"], "model": model if model is not None else saved["loop"]["best"],
            "optimizer": saved["optimizer"]}


def print_error(message):
    print(f"mpidd.train: error: {message}", file=sys.stderr, flush=True)


def refuse(message):
    print_error(message)
    sys.exit(EXIT_USAGE)


def setup_logging(out, rank, append=False):
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    handler = logging.FileHandler(os.path.join(out, "logs", f"rank{rank}.log"), mode="a" if append else "w")
    handler.setFormatter(logging.Formatter(f"%(asctime)s rank {rank} %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False
