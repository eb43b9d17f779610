"""Small collectives every part of mpidd uses: waits that sleep while ranks share cores, a
decision taken on the root and obeyed everywhere, agreement on an error, and the gather of the
local class probabilities (the two-level method's only communication).

Invariant: every collective here is entered by all ranks of the communicator, in the same order.
"""

from __future__ import annotations

import time

import numpy as np


# Waits at phase boundaries (a rank may wait minutes while rank 0 trains alone) sleep from
# 1 ms, doubling up to this: a prompt return for short waits, and few wake-ups (each one takes a
# core from the ranks that work, threads of rank 0 included) for long ones.
LONG_WAIT_SLEEP_S = 0.1


def sleepy_wait(request, interval: float | None, longest: float | None = None, between=None):
    """Wait for a non-blocking MPI request, sleeping `interval` seconds between tests: busy-
    polling MPI waits would steal the cores of ranks that are still computing when ranks
    outnumber cores. interval None: MPI's own (busy, lowest-latency) Wait. `longest`: the
    sleep doubles after each test up to it; `between`: called before each sleep."""
    if interval is None:
        request.Wait()
        return
    while not request.Test():
        if between is not None:
            between()
        time.sleep(interval)
        if longest is not None:
            interval = min(2 * interval, longest)


def sleepy_barrier(comm):
    """A barrier that sleeps while it waits (see sleepy_wait), for phase boundaries."""
    sleepy_wait(comm.Ibarrier(), 1e-3, longest=LONG_WAIT_SLEEP_S)


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


GATHER_ROUND_BYTES = 1 << 20  # the root's receive buffer per round: the gather's transient, whatever n


def gather_probabilities(comm, local: dict, num_subdomains: int, n: int, num_classes: int, root: int = 0,
                         starts: dict | None = None):
    """MPI_Gatherv of each rank's {subdomain: (rows, K) float32 probabilities} to `root`.

    A rank's block for subdomain i holds samples starts[i] .. starts[i] + rows (default: all n
    samples from 0; data parallel, several ranks hold parts of one subdomain). Returns, on
    root, the (n, N*K) array whose columns [i*K:(i+1)*K] are subdomain i's probabilities
    (subdomain order, whatever rank computed them); None elsewhere.

    The samples go in rounds of GATHER_ROUND_BYTES on the root (one Gatherv each, the same
    rounds on every rank since n, N and K are): the root holds the result and one round's
    buffer, never a second copy of the whole.
    """
    N, K = num_subdomains, num_classes
    mine = sorted(local)
    blocks = [(i, (starts or {}).get(i, 0), len(local[i])) for i in mine]
    owners = comm.gather(blocks, root=root)
    is_root = comm.Get_rank() == root
    out = np.empty((n, N, K), dtype=np.float32) if is_root else None
    rows_per_round = max(1, GATHER_ROUND_BYTES // (N * K * 4))
    for lo in range(0, n, rows_per_round):
        hi = min(lo + rows_per_round, n)
        # this round's samples lo..hi of each block (a block holds samples start..start+rows)
        parts = [local[i][max(lo - start, 0):max(hi - start, 0)].reshape(-1) for i, start, _ in blocks]
        send = np.ascontiguousarray(np.concatenate(parts) if parts else np.empty(0), dtype=np.float32)
        if not is_root:
            comm.Gatherv(send, None, root=root)
            continue
        spans = [[(i, max(lo, start), min(hi, start + rows)) for i, start, rows in o] for o in owners]
        counts = [sum(max(b - a, 0) for _, a, b in o) * K for o in spans]
        recv = np.empty(sum(counts), dtype=np.float32)
        comm.Gatherv(send, (recv, counts), root=root)
        offset = 0
        for i, a, b in (span for o in spans for span in o if span[2] > span[1]):
            out[a:b, i] = recv[offset:offset + (b - a) * K].reshape(b - a, K)
            offset += (b - a) * K
    if not is_root:
        return None
    for i in range(N):  # every sample of every subdomain must have come from exactly one rank
        spans = sorted((start, start + rows) for o in owners for j, start, rows in o if j == i and rows > 0)
        if [a for a, _ in spans] != [0] + [b for _, b in spans[:-1]] or (spans[-1][1] if spans else 0) != n:
            raise RuntimeError(f"gather_probabilities: the samples of subdomain {i} do not come from the ranks "
                               f"exactly once ({spans} for {n} samples)")
    return out.reshape(n, N * K)
