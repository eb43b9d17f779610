"""Everything that talks MPI, and the only package of mpidd that imports mpi4py.

    collectives  sleeping waits, root_decides, agree, broadcast_from_root, allgather, gather_to_root,
                 gather_probabilities
    exchange     ModelParallelExchange and its autograd operator GatherToRoot (coherent CNN-DNN)
    groups       DataParallelGroup and its autograd operator AllSum (P = G*N ranks)
    stop         StopAgreement: SIGTERM/SIGUSR1 on any rank stops every rank (exit 75)
    launch       what only the command lines install or choose: the abort hook, devices,
                 threads, the Slurm task check

Invariants the rest of mpidd relies on:
- every collective is entered by all ranks of the communicator it is given, in the same
  order; none uses COMM_WORLD unless handed it (world_dup() is what comm=None means);
- under the command lines, an uncaught exception on any rank aborts the job (no rank is left
  waiting in a collective), after a message that names the rank.
"""

from .collectives import (agree, allgather, broadcast_from_root, gather_probabilities, gather_to_root, root_decides,
                          sleepy_barrier, sleepy_wait)
from .exchange import GatherToRoot, ModelParallelExchange
from .groups import AllSum, DataParallelGroup
from .launch import (StartupError, check_slurm_tasks, default_threads, device_name, install_abort_on_error,
                     library_version, memory_per_rank, mpi4py_version, node_comm, node_cores_and_ranks, oversubscribed,
                     select_device, tune_malloc, warm_up_torch)
from .stop import EXIT_PREEMPTED, StopAgreement


def world_dup():
    """A duplicate of MPI_COMM_WORLD: what comm=None means in the API (its own message space)."""
    from mpi4py import MPI
    return MPI.COMM_WORLD.Dup()


def world():
    """MPI_COMM_WORLD, for the command lines (the launch's own communicator)."""
    from mpi4py import MPI
    return MPI.COMM_WORLD


__all__ = ["agree", "allgather", "broadcast_from_root", "gather_probabilities", "gather_to_root", "root_decides",
           "sleepy_barrier", "sleepy_wait",
           "GatherToRoot", "ModelParallelExchange", "AllSum", "DataParallelGroup", "StartupError",
           "check_slurm_tasks", "default_threads", "device_name", "install_abort_on_error", "library_version",
           "memory_per_rank", "mpi4py_version", "node_comm", "node_cores_and_ranks", "oversubscribed",
           "select_device", "tune_malloc", "warm_up_torch", "EXIT_PREEMPTED", "StopAgreement", "world_dup", "world"]
