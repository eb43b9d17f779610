"""Everything that touches MPI: start-up, failure handling, threads, and the gather.

Run under `mpirun -n P python -m mpidd.train ...`. Invariants the rest of mpidd relies on:
- an uncaught exception on any rank aborts MPI_COMM_WORLD (no rank is left waiting in a
  collective), after printing a message that names the rank;
- every collective here is entered by all ranks of the communicator, in the same order.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import traceback

import numpy as np
from mpi4py import MPI


def install_abort_on_error(comm=MPI.COMM_WORLD):
    """Make an uncaught exception on this rank end the whole job, naming the rank."""
    rank, host = comm.Get_rank(), socket.gethostname()

    def hook(exc_type, exc, tb):
        text = "".join(traceback.format_exception(exc_type, exc, tb))
        sys.stderr.write(f"mpidd: rank {rank} on {host} failed, aborting all ranks:\n{text}")
        sys.stderr.flush()
        comm.Abort(1)

    sys.excepthook = hook


def tune_malloc():
    """Keep freed memory in the heap instead of returning it to the kernel at every batch.

    glibc's default hands large blocks straight back (munmap/trim), so every mini-batch pays
    page faults for its activations again: for the small local CNNs that was about 25% of
    the CPU time, as system time. Linux/glibc only; elsewhere a no-op.
    """
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024)  # glibc's maximum on 64-bit
        libc.mallopt(M_TRIM_THRESHOLD, 1024 * 1024 * 1024)
    except (OSError, AttributeError):
        pass


def warm_up_torch():
    """Run one tiny optimizer step so that torch's lazy imports (about 1.5 CPU s, paid at the
    first optimizer.step) happen at start-up, not inside the timed training phases."""
    import torch
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p])
    p.sum().backward()
    opt.step()


def node_comm(comm=MPI.COMM_WORLD):
    """Communicator of the ranks sharing this node (shared-memory split)."""
    return comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())


def default_threads(comm=MPI.COMM_WORLD) -> int:
    """Cores available to this node's ranks divided by the ranks on the node, at least 1.

    The cores are the union of the ranks' CPU affinity sets, so this is right both when ranks
    share the node's cores (plain mpirun) and when a launcher pins each rank to its own cores.
    """
    local = node_comm(comm)
    try:
        cores = set().union(*local.allgather(sorted(os.sched_getaffinity(0))))
        return max(1, len(cores) // local.Get_size())
    finally:
        local.Free()


def sleepy_barrier(comm=MPI.COMM_WORLD, interval: float = 0.01):
    """A barrier that sleeps while it waits: busy-polling MPI waits would steal the cores of
    ranks that are still computing when ranks outnumber cores."""
    request = comm.Ibarrier()
    while not request.Test():
        time.sleep(interval)


def root_decides(comm, decide, root=0):
    """Run decide() on `root` only; every rank returns its result (root validates, all obey)."""
    return comm.bcast(decide() if comm.Get_rank() == root else None, root=root)


def gather_to_root(comm, obj, root=0):
    """Every rank's `obj`, as a list in rank order on `root`; None elsewhere."""
    return comm.gather(obj, root=root)


def agree(comm, error: str | None):
    """All ranks learn whether any rank hit `error`; returns (rank, message) of the first, or None."""
    for rank, message in enumerate(comm.allgather(error)):
        if message is not None:
            return rank, message
    return None


def gather_probabilities(comm, local: dict, num_subdomains: int, n: int, num_classes: int, root: int = 0):
    """MPI_Gatherv of each rank's {subdomain: (n, K) float32 probabilities} to `root`.

    Returns, on root, the (n, N*K) array whose columns [i*K:(i+1)*K] are subdomain i's
    probabilities (subdomain order, whatever rank computed them); None elsewhere.
    """
    mine = sorted(local)
    send = np.ascontiguousarray(
        np.stack([local[i] for i in mine]) if mine else np.empty((0, n, num_classes)), dtype=np.float32)
    owners = comm.gather(mine, root=root)
    if comm.Get_rank() != root:
        comm.Gatherv(send, None, root=root)
        return None
    counts = [len(o) * n * num_classes for o in owners]
    recv = np.empty(sum(counts), dtype=np.float32)
    comm.Gatherv(send, (recv, counts), root=root)
    order = [i for o in owners for i in o]
    stacked = recv.reshape(len(order), n, num_classes)
    out = np.empty((num_subdomains, n, num_classes), dtype=np.float32)
    out[order] = stacked
    return np.ascontiguousarray(out.transpose(1, 0, 2).reshape(n, num_subdomains * num_classes))


def library_version() -> str:
    return MPI.Get_library_version().strip().splitlines()[0].strip()


def peak_rss_bytes() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
