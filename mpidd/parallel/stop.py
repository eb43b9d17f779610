"""Agreed stops on SIGTERM/SIGUSR1 (Slurm's warning before the walltime, a preemption): every
rank stops at its next step boundary, saves, and the job exits with EXIT_PREEMPTED."""

from __future__ import annotations

import signal

import numpy as np
from mpi4py import MPI

from .. import signals as stop_signals
from .collectives import LONG_WAIT_SLEEP_S, sleepy_wait


# Exit code of a run stopped on SIGTERM or SIGUSR1 after saving its state: resume it with
# `--resume RUN_DIR` (EX_TEMPFAIL of sysexits.h, "try again later"; batch scripts requeue on it).
EXIT_PREEMPTED = 75


_TAG_REQUEST, _TAG_STOP = 7101, 7102


class StopAgreement:
    """SIGTERM or SIGUSR1 to any rank: every rank stops at its next step boundary and saves.

    The handler only sets a flag. poll(), called at every step boundary and evaluation batch,
    turns it into a decision that reaches every rank, on a communicator of its own:
    - a rank that sees its own signal stops and tells the root (one message); the root, on its
      own signal or such a message, tells every rank (one message each), so a signal sent to a
      single process (or a launcher that signals only some) still stops the whole job;
    - sync() is every phase boundary: a non-blocking MAX-allreduce of "I am stopping". A rank
      that stops in the middle of a phase saves, then enters that same allreduce (sync(True))
      in place of the boundary it did not reach, so ranks already waiting there learn of the
      stop from its result, and nobody is left in a collective the others never enter.
    Invariant: every rank calls sync() at the same phase boundaries in the same order; a
    stopping rank calls it once more, with stopping=True, and then no collective but barrier().
    Where ranks train one model together (coherent, data parallel) they agree step by step
    with any(), a blocking allreduce on their own communicator.
    """

    def __init__(self, comm, root=0, signals=stop_signals.STOP_SIGNALS, install=True):
        self.comm = comm.Dup()  # control messages never match the training's own collectives
        self.rank, self.size, self.root = self.comm.Get_rank(), self.comm.Get_size(), root
        # set by the handler (the only thing it does); or a signal caught before this existed
        self.signal = stop_signals.received[0] if install and stop_signals.received else None
        self.requested = False  # this rank knows that the job stops
        self.reason = None
        self._told_root = self._told_all = False
        self._sends = []
        if install:
            for sig in signals:
                signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.signal = signum

    def poll(self) -> bool:
        """Has a stop been requested (here, or anywhere, as far as messages have arrived)?"""
        if self.signal is not None and not self.requested:
            self.requested, self.reason = True, signal.Signals(self.signal).name
        if self.rank == self.root:
            if not self.requested and self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=_TAG_REQUEST):
                status = MPI.Status()
                name = self.comm.recv(source=MPI.ANY_SOURCE, tag=_TAG_REQUEST, status=status)
                self.requested, self.reason = True, f"{name} on rank {status.Get_source()}"
            if self.requested and not self._told_all:
                self._told_all = True
                self._sends += [self.comm.isend(self.reason, dest=r, tag=_TAG_STOP)
                                for r in range(self.size) if r != self.root]
        else:
            if self.requested and not self._told_root:
                self._told_root = True
                self._sends.append(self.comm.isend(self.reason, dest=self.root, tag=_TAG_REQUEST))
            if not self.requested and self.comm.Iprobe(source=self.root, tag=_TAG_STOP):
                self.requested, self.reason = True, self.comm.recv(source=self.root, tag=_TAG_STOP)
                self._told_root = True  # the root knows: it told us
        return self.requested

    def sync(self, stopping: bool = False) -> bool:
        """A phase boundary (collective). Returns True when the job stops here: some rank is
        stopping (or learnt of a stop before it arrived). Waits sleep, polling for signals."""
        mine = np.array([1 if stopping or self.poll() else 0], dtype=np.int32)
        agreed = np.zeros(1, dtype=np.int32)
        # the root relays signals that reach waiting ranks
        sleepy_wait(self.comm.Iallreduce(mine, agreed, op=MPI.MAX), 1e-3, longest=LONG_WAIT_SLEEP_S,
                    between=self.poll)
        if agreed[0] and not self.requested:  # the root, too, has learnt it from this allreduce
            self.requested, self.reason, self._told_root = True, "a stop on another rank", True
        return bool(agreed[0])

    def any(self, comm, interval: float | None = None) -> bool:
        """Collective over `comm` (ranks that step together): does any of them stop now?
        Waits as sleepy_wait(interval) does (ranks that share cores must not spin here)."""
        mine = np.array([1 if self.poll() else 0], dtype=np.int32)
        agreed = np.zeros(1, dtype=np.int32)
        sleepy_wait(comm.Iallreduce(mine, agreed, op=MPI.MAX), interval)
        return bool(agreed[0])

    def barrier(self):
        """After a stop: every rank has saved; then collect what is left of the messages."""
        self.comm.Barrier()
        MPI.Request.Waitall(self._sends)
        while self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG):
            self.comm.recv(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG)
