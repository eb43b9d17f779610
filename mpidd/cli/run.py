"""What the command line gives its methods (methods.context's interfaces): stops agreed by every
rank (SIGTERM/SIGUSR1, exit 75), the run directory's checkpoints and marker, per-rank logs and
rank 0's progress lines; Run, one rank's state in mpidd.train; and what both kinds of run
(classify, dense) do at their ends: start_segment (the run directory, config.json, the marker)
and stop_here (an agreed stop: every rank saves, rank 0 records it)."""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import sys
from dataclasses import dataclass, field


from .. import data, parallel, rundir
from ..engine import Control, Preempted
from ..methods.context import Checkpoints, Context, PhaseTimer, Progress, Stops, print_flushed
from ..results import slurm_job, source_commit
from ..stream import StreamStats
from .arguments import NOT_RECORDED
from .plan import Plan
from .progress import RunProgress


EXIT_USAGE = 2


EXIT_PREEMPTED = parallel.EXIT_PREEMPTED


# Ranks that train one model together agree on a stop every this many steps (or evaluation
# batches): a stop comes at most this many steps late, and the agreement costs 1/AGREE_EVERY
# of a small allreduce per step.
AGREE_EVERY = 10


log = logging.getLogger("mpidd")


class AgreedStops(Stops):
    """The command line's stops: SIGTERM/SIGUSR1 on any rank stops every rank at the same step
    (parallel.StopAgreement), and a stop at a phase boundary (sync) is timed as "wait"."""

    def __init__(self, stopper: parallel.StopAgreement, timer: PhaseTimer, wait_interval: float | None = None):
        self.stopper, self.timer = stopper, timer
        self.wait_interval = wait_interval  # sleep between tests of a pending MPI request (None: spin)
        self.polls = {}  # collective stop polls so far, per communicator

    def poll(self) -> bool:
        return self.stopper.poll()

    def poll_group(self, group) -> bool:
        return self._agree("group", group.comm)

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
        with self.timer("wait"):
            if self.stopper.sync():
                raise SyncedStop("stop agreed at a phase boundary")


class RunDirectory(Checkpoints):
    """The command line's checkpoints: this rank's files in RUN/checkpoints, resumed from when
    `resuming`, and the marker RUN/progress.json (`marker`, written by rank 0) that says how far
    the run has come."""

    def __init__(self, out: str, rank: int, args, stopper: parallel.StopAgreement, resuming: bool = False,
                 marker: dict | None = None):
        self.out, self.rank, self.args, self.stopper = out, rank, args, stopper
        self.resuming = resuming
        self.marker = marker or {}

    def path(self, name):
        return rundir.checkpoint_path(self.out, name)

    def saved(self, name):
        """This run's checkpoint `name` if it is resuming and has one (else None)."""
        return rundir.load_checkpoint(self.path(name)) if self.resuming else None

    def mark(self, **updates):
        """Rank 0: record progress in the marker (after the ranks' checkpoints it speaks for)."""
        if self.rank == 0:
            self.marker.update(updates)
            rundir.write_progress(self.out, self.marker)

    def control(self, name, stop, write=True, epoch_saves=True, **fields) -> Control:
        """Checkpoint `name` each epoch (epoch_saves; else only the last) and at a stop (if
        `write`), resumed from when resuming. A loop saved only at its end and at stops is redone
        from its start after a kill, computing the same: cheaper for short epochs than a file each."""
        def save(state):
            if write and (epoch_saves or state.get("stopped") or state.get("done")):
                rundir.save_checkpoint(self.path(name), **checkpoint_fields(state), **fields, args=vars(self.args))
        return Control(stop=stop, save=save, resume=loop_state(self.saved(name)))

    def coherent_control(self, name, stop) -> Control:
        """Every rank saves its part of the coherent model each epoch; once all have, rank 0
        records the position in the marker (so it never promises more than the files hold)."""
        def save(state):
            position = {"epoch": state["epoch"], "step": state["step"]}
            path, previous = map(self.path, rundir.coherent_state_checkpoints(name, self.rank))
            if os.path.exists(path):
                os.replace(path, previous)
            rundir.save_checkpoint(path, position=position, loop=state)
            if state.get("stopped"):  # the stop path agrees and records the position
                self.marker[name] = position
                return
            stop_now = self.stopper.sync()  # every rank has saved this position: rank 0 records it
            self.mark(**{name: position})
            if stop_now:
                raise SyncedStop("stop agreed at a phase boundary")
        return Control(stop=stop, save=save, resume=self.coherent_state(name))

    def coherent_state(self, name: str):
        """This rank's saved state of coherent phase `name` at the position the marker agreed on
        (the newest file, or the one before it: a rank may have saved one position ahead)."""
        position = self.marker.get(name)
        if not self.resuming or position is None:
            return None
        for file in rundir.coherent_state_checkpoints(name, self.rank):  # the newest first
            saved = rundir.load_checkpoint(self.path(file))
            if saved is not None and saved["position"] == position:
                return saved["loop"]
        raise RuntimeError(f"rank {self.rank} has no state of {name} at {position}, which the marker records")


def progress_to_log(master_process: bool) -> Progress:
    """Progress lines to the rank's log, and to stdout on rank 0."""
    return Progress(sinks=(log.info, print_flushed) if master_process else (log.info,))


@dataclass(kw_only=True)
class Run:
    """One rank's state in mpidd.train: the job's options and plan, the Context its methods
    receive (ctx, holding this run's stops, directory and progress), and what the phases
    measure. It stays in the command line: the methods see only ctx."""
    ctx: Context
    args: object
    plan: Plan
    threads: int
    bytes_whole: int = 0           # bytes of whole images read (global CNN, width mode)
    access: str = "memory"         # this rank's data access: memory or stream (--data-access)
    io: StreamStats = field(default_factory=StreamStats)  # what this rank's streams read and waited
    run_progress: RunProgress | None = None  # the phase lines and the whole run's time left
    trains_global: bool = False      # this rank trains the global CNN (plan.global_share)
    global_size: int = 1             # how many ranks train it (the same on every rank)
    global_threads: int = 1          # torch threads of this rank while it trains it

    @property
    def global_ranks(self) -> int | None:
        """Ranks that share the global CNN's samples with this rank, None where it does not train it."""
        return self.global_size if self.trains_global else None

    def begin(self, phase: str):
        """Phase `phase` of run_progress starts (its line; nothing without run_progress)."""
        if self.run_progress is not None:
            self.run_progress.start(phase)

    @property
    def stops(self) -> AgreedStops:
        return self.ctx.stops

    @property
    def directory(self) -> RunDirectory:
        return self.ctx.checkpoints

    def with_group(self, group) -> "Run":
        """This run with its models trained data parallel over `group`."""
        return dataclasses.replace(self, ctx=dataclasses.replace(self.ctx, group=group))


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


def start_segment(comm, directory: RunDirectory, args, threads: int):
    """Collective: rank 0 makes the run directory, config.json and the marker (resuming: records
    a new segment in the marker); every rank then holds the marker as written and logs to
    RUN/logs/rank<r>.log."""
    if comm.Get_rank() == 0:
        segment = {"started": datetime.datetime.now().isoformat(timespec="seconds"), "threads": threads,
                   "device": args.device, "slurm": slurm_job(), "source": source_commit()}
        if directory.resuming:
            directory.marker["segments"].append(segment)
            directory.mark(state="running")
        else:
            rundir.prepare(args.out)
            rundir.write_json(os.path.join(args.out, "config.json"),
                              {k: v for k, v in vars(args).items() if k not in NOT_RECORDED})
            directory.marker = {"world_size": comm.Get_size(), "mode": args.mode,
                                "data": data.fingerprint(args.data, args.task), "state": "running", "stops": [],
                                "segments": [segment]}
            directory.mark()
    directory.marker = parallel.root_decides(comm, lambda: directory.marker)  # the marker as rank 0 wrote it
    parallel.sleepy_barrier(comm)  # the run directory exists before any rank writes into it
    setup_logging(args.out, comm.Get_rank(), append=directory.resuming)


def stop_here(run: Run, error: Preempted) -> int:
    """Every rank stops here after saving (see StopAgreement); rank 0 records the stop last."""
    ctx = run.ctx
    if not isinstance(error, SyncedStop):
        run.stops.stopper.sync(stopping=True)  # in place of the phase boundary this rank did not reach
    rundir.write_json(run.directory.path(rundir.phases_file(ctx.rank)), ctx.timer.seconds)
    run.stops.stopper.barrier()  # every rank has written its part
    reason = run.stops.stopper.reason or "a stop"
    log.info("stopped (%s); state saved", reason)
    if ctx.master_process:
        stops = run.directory.marker.get("stops", []) + [
            {"time": datetime.datetime.now().isoformat(timespec="seconds"), "reason": reason}]
        run.directory.mark(state="stopped", stops=stops)
        size = ctx.comm.Get_size()
        print(f"mpidd: stopped ({reason}); every rank saved its state in {run.args.out}. Continue with:\n"
              f"  mpirun -n {size} python -m mpidd.train --resume {run.args.out}", flush=True)
    run.stops.stopper.barrier()  # the marker is written before any rank exits
    return EXIT_PREEMPTED


