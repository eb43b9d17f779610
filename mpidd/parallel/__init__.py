"""Everything that talks MPI, and the only package of mpidd that imports mpi4py.

    collectives  sleeping waits, root_decides, agree, broadcast_from_root, allgather, gather_to_root,
                 gather_probabilities
    exchange     ModelParallelExchange and its autograd operators GatherToRoot (coherent CNN-DNN)
                 and ScatterFromRoot (dense two-level coarse corrections)
    groups       DataParallelGroup and its autograd operator AllSum (P = G*N ranks); SubdomainSum
                 (one row per subdomain added in subdomain order: the domain-parallel U-Net's sums)
    halo         HaloExchange and its autograd operator HaloPad: neighbours' boundary layers
                 around each subdomain's feature map (convolutions across the tiles' faces)
    stop         StopAgreement: SIGTERM/SIGUSR1 on any rank stops every rank (exit 75)
    launch       what only the command lines install or choose: the abort hook, devices,
                 threads, the Slurm task check

Invariants the rest of mpidd relies on:
- every collective is entered by all ranks of the communicator it is given, in the same
  order; none uses COMM_WORLD unless handed it (shared_world() is what comm=None means);
- under the command lines, an uncaught exception on any rank aborts the job (no rank is left
  waiting in a collective), after a message that names the rank.
"""

from .collectives import (agree, allgather, broadcast_from_root, gather_probabilities, gather_to_root, root_decides,
                          sleepy_barrier, sleepy_wait)
from .exchange import GatherToRoot, ModelParallelExchange, ScatterFromRoot
from .groups import AllSum, DataParallelGroup, SubdomainSum, cached_group, free_groups
from .halo import HaloExchange, HaloPad
from .launch import (StartupError, check_slurm_tasks, default_threads, device_name, install_abort_on_error,
                     library_version, memory_per_rank, mpi4py_version, node_comm, node_cores_and_ranks, node_leaders,
                     oversubscribed,
                     select_device, tune_malloc, warm_up_torch)
from .stop import EXIT_PREEMPTED, StopAgreement


_SHARED = {}        # "world": the one duplicate of MPI_COMM_WORLD that comm=None means
SHARED_GROUPS = {}  # (subdomains, ranks) -> the data-parallel groups' communicator split off it


def shared_world():
    """The duplicate of MPI_COMM_WORLD that every API estimator made with comm=None uses (its
    own message space, apart from the caller's messages on COMM_WORLD). One per process, made
    at the first call, which is collective over COMM_WORLD: every rank makes it at the same
    point of the same program. Estimators share it safely because each call on it is a
    sequence of collectives that every rank enters in the same order. Never freed: it lives as
    long as MPI."""
    if "world" not in _SHARED:
        from mpi4py import MPI
        _SHARED["world"] = MPI.COMM_WORLD.Dup()
    return _SHARED["world"]


def world():
    """MPI_COMM_WORLD, for the command lines (the launch's own communicator)."""
    from mpi4py import MPI
    return MPI.COMM_WORLD


__all__ = ["agree", "allgather", "broadcast_from_root", "gather_probabilities", "gather_to_root", "root_decides",
           "sleepy_barrier", "sleepy_wait",
           "GatherToRoot", "ModelParallelExchange", "ScatterFromRoot", "AllSum", "DataParallelGroup", "SubdomainSum",
           "cached_group", "free_groups",
           "HaloExchange", "HaloPad", "StartupError",
           "check_slurm_tasks", "default_threads", "device_name", "install_abort_on_error", "library_version",
           "memory_per_rank", "mpi4py_version", "node_comm", "node_cores_and_ranks", "node_leaders",
           "oversubscribed",
           "select_device", "tune_malloc", "warm_up_torch", "EXIT_PREEMPTED", "StopAgreement",
           "shared_world", "SHARED_GROUPS", "world"]
