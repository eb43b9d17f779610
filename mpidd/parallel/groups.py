"""Data-parallel groups (P = G*N ranks: G per subdomain) and their differentiable sum AllSum
(forward: Allreduce SUM over the group; adjoint: Allreduce SUM of the gradients); SubdomainSum,
a sum over every subdomain in subdomain order (the same bits at every rank count)."""

from __future__ import annotations

import numpy as np
import torch
from mpi4py import MPI

from ..tiled_unet import ordered_sum
from .collectives import sleepy_wait


class DataParallelGroup:
    """The ranks that train one model together, data parallel (P = G*N: G ranks a subdomain).

    Member g of a group of G holds samples [g*n//G, (g+1)*n//G) of every split of n samples
    (share), reads only those, and computes the part of each global mini-batch that falls in
    it. mpidd.engine normalises the loss by the global batch size and calls sum_gradients
    after backward, and models.GroupBatchNorm sums BatchNorm statistics over the group with
    allreduce(), so a group step is the single-process step on the whole batch, up to the
    order of floating-point sums. Invariant: the members make the same collective calls in
    the same order (same batches, same evaluation batch counts, same stop polls).
    """

    def __init__(self, comm=None, color: int = 0, key: int = 0, *, split=None, wait_interval=None):
        """The group of this rank: comm.Split(color, key), or `split`, a communicator already
        split that way (kept and freed by its maker). wait_interval: seconds to sleep between
        tests of a pending sum (ranks that share cores; a spinning wait would take the core of
        a member still computing), None: MPI's blocking Allreduce."""
        self.comm = split if split is not None else comm.Split(color, key)
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.wait_interval = wait_interval
        self.bytes = 0  # payload this rank contributed to the group's gradient sums

    def share(self, n: int) -> tuple[int, int]:
        return self.rank * n // self.size, (self.rank + 1) * n // self.size

    def sum(self, values) -> list:
        """Element-wise sum over the group of a few numbers (float64)."""
        out = np.array(values, dtype=np.float64)
        _allreduce_array(self.comm, out, self.wait_interval)
        return out.tolist()

    def sum_gradients(self, model):
        """Sum every parameter's gradient over the group, in one message."""
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:  # a member whose share of the batch was empty
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params]).float().cpu().numpy()
        _allreduce_array(self.comm, flat, self.wait_interval)
        self.bytes += flat.nbytes
        summed = torch.from_numpy(flat)
        offset = 0
        for p in params:
            p.grad.copy_(summed[offset:offset + p.numel()].view_as(p.grad))
            offset += p.numel()

    def allreduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Differentiable sum over the group (the adjoint of a sum is a sum of the gradients)."""
        return AllSum.apply(tensor, self.comm, self.wait_interval)


def cached_group(cache: dict, layout, comm, color: int, key: int) -> DataParallelGroup:
    """This rank's DataParallelGroup (its own byte count) on comm.Split(color, key), split once
    per `layout` and kept in `cache` for the next call (free_groups frees them)."""
    if layout not in cache:
        cache[layout] = comm.Split(color, key)
    return DataParallelGroup(split=cache[layout])


def free_groups(cache: dict):
    """Free the communicators cached_group kept in `cache`. Collective over each."""
    for split in cache.values():
        split.Free()
    cache.clear()


def _allreduce_array(comm, array, wait_interval=None):
    """Sum `array` over comm in place: blocking, or non-blocking with sleeps (wait_interval)."""
    if wait_interval is None:
        comm.Allreduce(MPI.IN_PLACE, array, op=MPI.SUM)
    else:
        sleepy_wait(comm.Iallreduce(MPI.IN_PLACE, array, op=MPI.SUM), wait_interval)


def _allreduce_tensor(comm, tensor, wait_interval=None):
    array = np.ascontiguousarray(tensor.detach().cpu().numpy())
    _allreduce_array(comm, array, wait_interval)
    return torch.from_numpy(array).to(tensor.device)


class AllSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, comm, wait_interval=None):
        ctx.comm, ctx.wait_interval = comm, wait_interval
        return _allreduce_tensor(comm, tensor, wait_interval)

    @staticmethod
    def backward(ctx, grad):
        return _allreduce_tensor(ctx.comm, grad.contiguous(), ctx.wait_interval), None, None


class SubdomainSum:
    """sum(rows): the sum over every subdomain of comm's ranks of one row each, in subdomain
    order, on every rank; rows (S, ...) are this rank's subdomains' (`mine`, ascending). Every
    rank gathers all N rows and adds them in the same order (tiled_unet.ordered_sum), so the
    result has the same bits at every rank count, where an Allreduce adds the ranks' partial
    sums, grouped by rank. Costs N rows received per rank, where an Allreduce costs about one."""

    def __init__(self, comm, mine, num_subdomains: int, wait_interval=None):
        self.comm, self.mine, self.wait_interval = comm, sorted(mine), wait_interval
        owners = comm.allgather(self.mine)
        self.order = np.argsort(np.concatenate([np.asarray(o, dtype=np.int64) for o in owners]), kind="stable")
        self.counts = [len(o) for o in owners]
        if len(self.order) != num_subdomains or sorted(np.concatenate(owners).tolist()) != list(range(num_subdomains)):
            raise ValueError(f"subdomain sum: the ranks' subdomains {owners} must cover the {num_subdomains} "
                             f"subdomains once each")

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        mine = np.ascontiguousarray(rows.detach().cpu().numpy())
        if mine.shape[0] != len(self.mine):
            raise ValueError(f"subdomain sum: {mine.shape[0]} rows for {len(self.mine)} subdomains")
        row = int(np.prod(mine.shape[1:]))
        gathered = np.empty((len(self.order),) + mine.shape[1:], mine.dtype)
        sleepy_wait(self.comm.Iallgatherv(mine, [gathered, [c * row for c in self.counts]]), self.wait_interval)
        return ordered_sum(torch.from_numpy(gathered[self.order])).to(rows.device)
