"""The coherent CNN-DNN's model-parallel exchange as an autograd operator, GatherToRoot
(forward: Gatherv of every rank's local outputs to the root; adjoint: Scatterv of their
gradients back)."""

from __future__ import annotations

import time

import numpy as np
import torch

from .collectives import sleepy_wait


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
        return GatherToRoot.apply(local, self)

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


class GatherToRoot(torch.autograd.Function):
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
