"""Everything that touches MPI: start-up, failure handling, threads, the gather of local
probabilities and the model-parallel exchange of the coherent CNN-DNN.

Run under `mpirun -n P python -m mpidd.train ...`. Invariants the rest of mpidd relies on:
- an uncaught exception on any rank aborts MPI_COMM_WORLD (no rank is left waiting in a
  collective), after printing a message that names the rank;
- every collective here is entered by all ranks of the communicator, in the same order.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
import traceback

import numpy as np
import torch
from mpi4py import MPI


# Seconds a failing rank waits between printing its traceback and MPI_Abort. The launcher
# forwards each rank's stderr through a pipe; MPICH's Hydra kills the job on MPI_Abort and
# can drop what it had not forwarded yet (seen: the whole message lost in about 1 run in 15).
ABORT_GRACE_S = 1.0


def install_abort_on_error(comm=MPI.COMM_WORLD, logger_name="mpidd"):
    """Make an uncaught exception on this rank end the whole job, naming the rank. The message
    goes to stderr and, once logging is set up, to the rank's own log file as well (which
    survives whatever the launcher does with stderr at the abort)."""
    rank, host = comm.Get_rank(), socket.gethostname()

    def hook(exc_type, exc, tb):
        text = "".join(traceback.format_exception(exc_type, exc, tb))
        message = f"mpidd: rank {rank} on {host} failed, aborting all ranks:\n{text}"
        sys.stderr.write(message)
        sys.stderr.flush()
        logger = logging.getLogger(logger_name)
        for handler in logger.handlers:
            handler.handle(logger.makeRecord(logger_name, logging.CRITICAL, __file__, 0, message.rstrip(), None, None))
            handler.flush()
        time.sleep(ABORT_GRACE_S)
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
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p])
    p.sum().backward()
    opt.step()


def node_comm(comm=MPI.COMM_WORLD):
    """Communicator of the ranks sharing this node (shared-memory split)."""
    return comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())


def node_cores_and_ranks(comm=MPI.COMM_WORLD) -> tuple[int, int]:
    """(cores available to this node's ranks, ranks on this node). The cores are the union of
    the ranks' CPU affinity sets, so this is right both when ranks share the node's cores
    (plain mpirun) and when a launcher pins each rank to its own cores."""
    local = node_comm(comm)
    try:
        return len(set().union(*local.allgather(sorted(os.sched_getaffinity(0))))), local.Get_size()
    finally:
        local.Free()


def default_threads(comm=MPI.COMM_WORLD) -> int:
    """Cores available to this node's ranks divided by the ranks on the node, at least 1."""
    cores, ranks = node_cores_and_ranks(comm)
    return max(1, cores // ranks)


def oversubscribed(comm, threads: int) -> bool:
    """Do this node's ranks x threads outnumber its cores? (Then waits should sleep, not spin.)"""
    cores, ranks = node_cores_and_ranks(comm)
    return ranks * threads > cores


def sleepy_wait(request, interval: float | None):
    """Wait for a non-blocking MPI request, sleeping `interval` seconds between tests: busy-
    polling MPI waits would steal the cores of ranks that are still computing when ranks
    outnumber cores. interval None: MPI's own (busy, lowest-latency) Wait."""
    if interval is None:
        request.Wait()
        return
    while not request.Test():
        time.sleep(interval)


def sleepy_barrier(comm=MPI.COMM_WORLD, interval: float = 0.01):
    """A barrier that sleeps while it waits (see sleepy_wait)."""
    sleepy_wait(comm.Ibarrier(), interval)


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


class ModelParallelExchange:
    """The coherent CNN-DNN's only communication, as an autograd layer (see mpidd.coherent).

    forward:  each rank's (B, m_r*K) local outputs, its m_r subdomains in ascending order,
              are gathered (MPI_Igatherv) to `root` as (B, N*K) in subdomain order. Other
              ranks get an empty (B, 0) tensor that carries the autograd graph.
    backward: root cuts dL/d(B, N*K) into the ranks' columns and scatters them back
              (MPI_Iscatterv); each rank continues back-propagation through its local CNNs.
              Ranks other than root start it with backward(out, zeros_like(out)).
    Invariant: every rank calls forward and backward the same number of times, in the same
    order, with the same B (the same sample indices). What crosses the wire is B*N*K float32
    values each way per step. `seconds` counts the wall time in the exchange, waits for
    slower ranks included; `cpu_seconds` the CPU time it used; `bytes` this rank's part.
    `poll_interval`: seconds to sleep between tests of a pending exchange (for ranks that
    outnumber cores), or None for MPI's busy Wait (a core per rank: lowest latency).
    """

    def __init__(self, comm, mine, num_subdomains: int, num_classes: int, root: int = 0,
                 poll_interval: float | None = 1e-4):
        self.comm, self.root, self.K, self.N = comm, root, num_classes, num_subdomains
        self.mine = sorted(mine)
        self.owners = comm.allgather(self.mine)  # rank r's subdomains, ascending
        self.rank = comm.Get_rank()
        self.is_root = self.rank == root
        self.poll_interval = poll_interval
        self.seconds, self.cpu_seconds, self.bytes, self.calls = 0.0, 0.0, 0, 0

    def __call__(self, local):
        return _Exchange.apply(local, self)

    def _counts(self, batch):
        return [batch * len(o) * self.K for o in self.owners]

    def gather(self, local: np.ndarray) -> np.ndarray | None:
        batch = local.shape[0]
        if local.shape[1] != len(self.mine) * self.K:
            raise ValueError(f"exchange: rank {self.rank} owns subdomains {self.mine}, so it must send "
                             f"{len(self.mine)} x {self.K} outputs per sample, not {local.shape[1]}")
        start = time.perf_counter(), time.process_time()
        if self.is_root:
            counts = self._counts(batch)
            recv = np.empty(sum(counts), dtype=np.float32)
            sleepy_wait(self.comm.Igatherv(local, (recv, counts), root=self.root), self.poll_interval)
            out = np.empty((batch, self.N, self.K), dtype=np.float32)
            for owned, block in zip(self.owners, np.split(recv, np.cumsum(counts)[:-1])):
                out[:, owned, :] = block.reshape(batch, len(owned), self.K)
            result = out.reshape(batch, self.N * self.K)
        else:
            sleepy_wait(self.comm.Igatherv(local, None, root=self.root), self.poll_interval)
            result = None
        self._count(start, local.nbytes)
        return result

    def scatter(self, grad: np.ndarray | None, batch: int) -> np.ndarray:
        start = time.perf_counter(), time.process_time()
        recv = np.empty(batch * len(self.mine) * self.K, dtype=np.float32)
        if self.is_root:
            g = grad.reshape(batch, self.N, self.K)
            send = np.concatenate([g[:, owned, :].ravel() for owned in self.owners])
            request = self.comm.Iscatterv((send, self._counts(batch)), recv, root=self.root)
        else:
            request = self.comm.Iscatterv(None, recv, root=self.root)
        sleepy_wait(request, self.poll_interval)
        self._count(start, recv.nbytes)
        return recv.reshape(batch, len(self.mine) * self.K)

    def _count(self, start, nbytes):
        self.seconds += time.perf_counter() - start[0]
        self.cpu_seconds += time.process_time() - start[1]
        self.bytes += nbytes
        self.calls += 1


def _float32_array(tensor):
    return np.ascontiguousarray(tensor.detach().cpu().numpy(), dtype=np.float32)


class _Exchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local, exchange):
        ctx.exchange, ctx.batch = exchange, local.shape[0]
        gathered = exchange.gather(_float32_array(local))
        if gathered is None:
            return local.new_empty((local.shape[0], 0))
        return torch.from_numpy(gathered).to(device=local.device, dtype=local.dtype)

    @staticmethod
    def backward(ctx, grad):
        ex = ctx.exchange
        received = ex.scatter(_float32_array(grad) if ex.is_root else None, ctx.batch)
        return torch.from_numpy(received).to(device=grad.device, dtype=grad.dtype), None


def library_version() -> str:
    return MPI.Get_library_version().strip().splitlines()[0].strip()


def peak_rss_bytes() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
