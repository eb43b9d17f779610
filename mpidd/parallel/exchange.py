"""The model-parallel exchanges as autograd operators: GatherToRoot (forward: Gatherv of every
rank's local outputs to the root; adjoint: Scatterv of their gradients back), the coherent
CNN-DNN's; and its adjoint ScatterFromRoot (forward: Scatterv of the root's (B, N*F) to the
ranks' subdomains; adjoint: Gatherv of their gradients), the dense two-level method's coarse
corrections."""

from __future__ import annotations

import time

import numpy as np
import torch

from .collectives import sleepy_wait


class ModelParallelExchange:
    """The coherent CNN-DNN's only communication, as an autograd layer (see mpidd.coherent_model).

    forward:  each rank's local outputs for its rows of the batch, (b_r, m_r*K) with its m_r
              subdomains in ascending order, are gathered (MPI_Igatherv) to `root` as
              (B, N*K) in batch order and subdomain order. Other ranks get an empty (b_r, 0)
              tensor that carries the autograd graph.
    backward: root cuts dL/d(B, N*K) into the ranks' rows and columns and scatters them back
              (MPI_Iscatterv); each rank continues back-propagation through its local CNNs.
              Ranks other than root start it with backward(out, zeros_like(out)).
    Rows: with P <= N every rank computes every row of the batch (b_r = B). With P = G*N
    (`member` = (g, G): member g of its subdomain's data-parallel group) rank r holds samples
    [g*n//G, (g+1)*n//G) of a split of n and computes the rows of the batch (global sample
    indices `idx`) that fall there; the root assembles them, so the coherent model is model
    parallel across subdomains and data parallel inside each group.
    Invariant: every rank calls forward and backward the same number of times, in the same
    order, with the same idx and n. What crosses the wire is B*N*K float32 values each way per
    step. `seconds` counts the wall time in the exchange, waits for slower ranks included;
    `cpu_seconds` the CPU time it used; `bytes` this rank's part. `poll_interval`: seconds to
    sleep between tests of a pending exchange (for ranks that outnumber cores), or None for
    MPI's busy Wait (a core per rank: lowest latency).
    """

    def __init__(self, comm, mine, num_subdomains: int, num_classes: int, root: int = 0,
                 poll_interval: float | None = 1e-4, member: tuple[int, int] | None = None):
        self.comm, self.root, self.K, self.N = comm, root, num_classes, num_subdomains
        self.mine = sorted(mine)
        self.owners = comm.allgather(self.mine)  # rank r's subdomains, ascending
        self.members = comm.allgather(member)    # rank r's (g, G), or None: every row
        self.rank = comm.Get_rank()
        self.is_root = self.rank == root
        self.poll_interval = poll_interval
        self.seconds, self.cpu_seconds, self.bytes, self.calls = 0.0, 0.0, 0, 0

    def __call__(self, local, idx=None, n=None):
        """local: this rank's outputs for its rows of the batch `idx` (global sample indices of a
        split of n samples); idx None: every rank computes every row."""
        return GatherToRoot.apply(local, self, idx, n)

    def rows(self, idx, n, batch: int) -> list:
        """[rank r's rows of the batch] (positions in idx of the samples rank r holds)."""
        out = []
        for member in self.members:
            if member is None or idx is None:
                out.append(np.arange(batch))
            else:
                g, G = member
                idx = np.asarray(idx)
                out.append(np.flatnonzero((idx >= g * n // G) & (idx < (g + 1) * n // G)))
        return out

    def gather(self, local: np.ndarray, rows: list, batch: int) -> np.ndarray | None:
        if local.shape != (len(rows[self.rank]), len(self.mine) * self.K):
            raise ValueError(f"exchange: rank {self.rank} owns subdomains {self.mine} and {len(rows[self.rank])} "
                             f"rows of the batch, so it must send {len(rows[self.rank])} x {len(self.mine) * self.K} "
                             f"outputs, not {local.shape}")
        start = time.perf_counter(), time.process_time()
        if self.is_root:
            counts = [len(r) * len(o) * self.K for r, o in zip(rows, self.owners)]
            recv = np.empty(sum(counts), dtype=np.float32)
            sleepy_wait(self.comm.Igatherv(local, (recv, counts), root=self.root), self.poll_interval)
            out = np.zeros((batch, self.N, self.K), dtype=np.float32)
            for r, owned, block in zip(rows, self.owners, np.split(recv, np.cumsum(counts)[:-1])):
                out[np.ix_(r, owned)] = block.reshape(len(r), len(owned), self.K)
            result = out.reshape(batch, self.N * self.K)
        else:
            sleepy_wait(self.comm.Igatherv(local, None, root=self.root), self.poll_interval)
            result = None
        self._count(start, local.nbytes)
        return result

    def scatter(self, grad: np.ndarray | None, rows: list, batch: int) -> np.ndarray:
        start = time.perf_counter(), time.process_time()
        mine = len(rows[self.rank])
        recv = np.empty(mine * len(self.mine) * self.K, dtype=np.float32)
        if self.is_root:
            g = grad.reshape(batch, self.N, self.K)
            send = np.concatenate([g[np.ix_(r, owned)].ravel() for r, owned in zip(rows, self.owners)])
            counts = [len(r) * len(o) * self.K for r, o in zip(rows, self.owners)]
            request = self.comm.Iscatterv((send, counts), recv, root=self.root)
        else:
            request = self.comm.Iscatterv(None, recv, root=self.root)
        sleepy_wait(request, self.poll_interval)
        self._count(start, recv.nbytes)
        return recv.reshape(mine, len(self.mine) * self.K)

    def _count(self, start, nbytes):
        self.seconds += time.perf_counter() - start[0]
        self.cpu_seconds += time.process_time() - start[1]
        self.bytes += nbytes
        self.calls += 1


def _float32_array(tensor):
    return np.ascontiguousarray(tensor.detach().cpu().numpy(), dtype=np.float32)


class GatherToRoot(torch.autograd.Function):
    """forward: Gatherv of the ranks' local outputs to the root; backward (its adjoint): Scatterv."""

    @staticmethod
    def forward(ctx, local, exchange, idx, n):
        batch = len(idx) if idx is not None else local.shape[0]
        ctx.exchange, ctx.batch, ctx.rows = exchange, batch, exchange.rows(idx, n, batch)
        gathered = exchange.gather(_float32_array(local), ctx.rows, batch)
        if gathered is None:
            return local.new_empty((local.shape[0], 0))
        return torch.from_numpy(gathered).to(device=local.device, dtype=local.dtype)

    @staticmethod
    def backward(ctx, grad):
        ex = ctx.exchange
        received = ex.scatter(_float32_array(grad) if ex.is_root else None, ctx.rows, ctx.batch)
        return torch.from_numpy(received).to(device=grad.device, dtype=grad.dtype), None, None, None


class ScatterFromRoot(torch.autograd.Function):
    """forward: Scatterv of the root's (B, N*F) (batch rows, subdomains in order) to every rank,
    which gets its (b_r, m_r*F); backward (its adjoint): Gatherv of those gradients to the root.
    Ranks other than the root pass `whole` as a placeholder that requires grad (e.g.
    torch.zeros(0, requires_grad=True)), so that their backward runs and joins the gather.
    Same invariant as GatherToRoot: every rank calls forward and backward alike."""

    @staticmethod
    def forward(ctx, whole, exchange, idx, n, batch):
        ctx.exchange, ctx.batch, ctx.rows = exchange, batch, exchange.rows(idx, n, batch)
        ctx.placeholder = None if exchange.is_root else whole
        received = exchange.scatter(_float32_array(whole) if exchange.is_root else None, ctx.rows, batch)
        return torch.from_numpy(received).to(device=whole.device, dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad):
        ex = ctx.exchange
        gathered = ex.gather(_float32_array(grad), ctx.rows, ctx.batch)
        if gathered is None:
            return torch.zeros_like(ctx.placeholder), None, None, None, None
        return torch.from_numpy(gathered).to(device=grad.device, dtype=grad.dtype), None, None, None, None
