"""Small collectives every part of mpidd uses: waits that sleep while ranks share cores, a
decision taken on the root and obeyed everywhere, agreement on an error, and the gather of the
local class probabilities (the two-level method's only communication).

Invariant: every collective here is entered by all ranks of the communicator, in the same order.
"""

from __future__ import annotations

import time

import numpy as np


def sleepy_wait(request, interval: float | None):
    """Wait for a non-blocking MPI request, sleeping `interval` seconds between tests: busy-
    polling MPI waits would steal the cores of ranks that are still computing when ranks
    outnumber cores. interval None: MPI's own (busy, lowest-latency) Wait."""
    if interval is None:
        request.Wait()
        return
    while not request.Test():
        time.sleep(interval)


def sleepy_barrier(comm, interval: float = 0.01):
    """A barrier that sleeps while it waits (see sleepy_wait)."""
    sleepy_wait(comm.Ibarrier(), interval)


def root_decides(comm, decide, root=0):
    """Run decide() on `root` only; every rank returns its result (root validates, all obey)."""
    return comm.bcast(decide() if comm.Get_rank() == root else None, root=root)


def broadcast_from_root(comm, obj, root=0):
    """`root`'s obj on every rank (what the other ranks pass is ignored)."""
    return comm.bcast(obj, root=root)


def allgather(comm, obj) -> list:
    """Every rank's obj, as a list in rank order, on every rank."""
    return comm.allgather(obj)


def gather_to_root(comm, obj, root=0):
    """Every rank's `obj`, as a list in rank order on `root`; None elsewhere."""
    return comm.gather(obj, root=root)


def agree(comm, error: str | None):
    """All ranks learn whether any rank hit `error`; returns (rank, message) of the first, or None."""
    for rank, message in enumerate(comm.allgather(error)):
        if message is not None:
            return rank, message
    return None


def gather_probabilities(comm, local: dict, num_subdomains: int, n: int, num_classes: int, root: int = 0,
                         starts: dict | None = None):
    """MPI_Gatherv of each rank's {subdomain: (rows, K) float32 probabilities} to `root`.

    A rank's block for subdomain i holds samples starts[i] .. starts[i] + rows (default: all n
    samples from 0; data parallel, several ranks hold parts of one subdomain). Returns, on
    root, the (n, N*K) array whose columns [i*K:(i+1)*K] are subdomain i's probabilities
    (subdomain order, whatever rank computed them); None elsewhere.
    """
    mine = sorted(local)
    blocks = [(i, (starts or {}).get(i, 0), len(local[i])) for i in mine]
    send = np.ascontiguousarray(
        np.concatenate([local[i].reshape(-1) for i in mine]) if mine else np.empty(0), dtype=np.float32)
    owners = comm.gather(blocks, root=root)
    if comm.Get_rank() != root:
        comm.Gatherv(send, None, root=root)
        return None
    counts = [sum(rows for _, _, rows in o) * num_classes for o in owners]
    recv = np.empty(sum(counts), dtype=np.float32)
    comm.Gatherv(send, (recv, counts), root=root)
    out = np.full((n, num_subdomains, num_classes), np.nan, dtype=np.float32)
    offset = 0
    for i, start, rows in (b for o in owners for b in o):
        out[start:start + rows, i] = recv[offset:offset + rows * num_classes].reshape(rows, num_classes)
        offset += rows * num_classes
    if np.isnan(out).any():  # every sample of every subdomain must have come from some rank
        raise RuntimeError("gather_probabilities: some samples of some subdomains came from no rank")
    return out.reshape(n, num_subdomains * num_classes)
