"""The halo exchange of a domain-decomposed feature map, as an autograd operator (after DistDL's
HaloExchange): each subdomain's map (B, C, *tile) gets `width` layers of its grid neighbours'
boundary values on every side, and zeros where the image ends. A convolution of kernel
2*width+1 with no padding then computes on the padded tile exactly what the same convolution
with zero padding computes on the whole image, cut to the tile. The adjoint adds each halo's
gradient back onto the boundary layers of the neighbour it came from.

    halo = HaloExchange(comm, grid=(2, 2), mine=[0, 3], width=1)   # this rank's subdomains
    padded = halo(x)        # x (S, B, C, h, w), S = len(mine) -> (S, B, C, h + 2, w + 2)

Axis by axis: the slabs sent along axis a already carry the halos of the axes before it, so
corners (and in 3D edges) arrive without diagonal messages. Neighbours on the same rank are
copied; the others get point-to-point messages tagged with the receiving subdomain and side,
and every received slab is then copied (or, in the adjoint, added) in one fixed order, so the
results are the same bits whichever neighbours share a rank. The maps stay torch tensors in
their memory layout (channels-last maps reach the convolution as such); only the slabs sent
are copied out, as float64 or float32.

Invariant: every rank of comm calls forward and backward alike (same order, same batch); a
call returns only when all its messages have arrived. Tags repeat across axes and calls: since
every rank posts its messages in the same order and MPI keeps the messages of one (source, tag)
in order, each receive matches the message meant for it.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from mpi4py import MPI
from torch import nn

from ..decomposition import grid_neighbour

LOW, HIGH = 0, 1  # a subdomain's halo sides along an axis; tag = 2 * receiving subdomain + side


class HaloExchange:
    """The exchange of `width` boundary layers between the subdomains of `grid`, this rank owning
    `mine` (every subdomain owned by exactly one rank of comm). `poll_interval`: seconds to sleep
    between tests of pending messages (ranks that outnumber cores), None for MPI's busy Waitall.
    `seconds` and `bytes` count the wall time in the exchange and the bytes this rank sent."""

    def __init__(self, comm, grid, mine, width: int = 1, poll_interval: float | None = 1e-4):
        self.comm, self.grid, self.width = comm, tuple(grid), int(width)
        self.mine = sorted(mine)
        self.rank = comm.Get_rank()
        owners = comm.allgather(self.mine)
        self.rank_of = {i: r for r, owned in enumerate(owners) for i in owned}
        if sorted(self.rank_of) != list(range(int(np.prod(self.grid)))) or sum(map(len, owners)) != len(self.rank_of):
            raise ValueError(f"halo exchange: the ranks' subdomains {owners} must cover the "
                             f"{int(np.prod(self.grid))} subdomains of grid {self.grid} once each")
        self.poll_interval = poll_interval
        self.seconds, self.bytes = 0.0, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (S, B, C, *tile): this rank's subdomains in ascending order -> (S, B, C, *(tile + 2 width))."""
        return HaloPad.apply(x, self)

    def _slab(self, axis: int, side: int, length: int, halo: bool) -> tuple:
        """Index of the `width` layers at `side` of one tile (B, C, ...) along spatial `axis`
        (`length` long, halo included): the tile's own outermost layers (halo False) or its
        halo (halo True)."""
        w = self.width
        if halo:
            cut = slice(0, w) if side == LOW else slice(length - w, length)
        else:
            cut = slice(w, 2 * w) if side == LOW else slice(length - 2 * w, length - w)
        return (slice(None),) * (2 + axis) + (cut,)

    def _transfer(self, sends: list, receives: list, add: bool):
        """sends [(subdomain to, side, view)], receives [(subdomain from, tag, view)]: the views
        sent to this rank's own subdomains are read directly, the others travel as messages (as
        float64 or float32: `wire`); once all have arrived, each received view is copied (add
        False) or added (add True) onto its destination in the list's order, whichever rank
        sent it (so the sums are the same at every rank count). Sent and received views of one
        call do not overlap."""
        requests, local, sources = [], {}, []
        for to, side, view in sends:
            tag = 2 * to + side
            if self.rank_of[to] == self.rank:
                local[tag] = view
            else:
                array = view.detach().to("cpu", _wire(view.dtype)).contiguous().numpy()
                requests.append(self.comm.Isend(array, dest=self.rank_of[to], tag=tag))
                self.bytes += array.nbytes
        for source, tag, into in receives:
            if self.rank_of[source] == self.rank:
                sources.append(local[tag])
            else:
                buffer = torch.empty(into.shape, dtype=_wire(into.dtype))
                requests.append(self.comm.Irecv(buffer.numpy(), source=self.rank_of[source], tag=tag))
                sources.append(buffer)
        if self.poll_interval is None:
            MPI.Request.Waitall(requests)
        else:
            while not MPI.Request.Testall(requests):
                time.sleep(self.poll_interval)
        for (_, _, into), source in zip(receives, sources):
            if add:
                into.add_(source.to(into.device, into.dtype))
            else:
                into.copy_(source)

    def _messages(self, y: torch.Tensor, axis: int, send_halo: bool) -> tuple[list, list]:
        """The exchange along `axis` of the padded maps y (S, B, C, *padded tile): forward
        (send_halo False), each tile's outermost layers to the neighbour's halo; adjoint (True),
        each halo back to the layers it came from. Returns (sends, receives (subdomain from, tag,
        where it goes in y))."""
        n = y.shape[3 + axis]
        sends, receives = [], []
        for k, i in enumerate(self.mine):
            for side, step in ((LOW, -1), (HIGH, 1)):
                j = grid_neighbour(self.grid, i, axis, step)
                if j is None:
                    continue  # the image ends: zeros there, and no gradient goes back
                # my low layers fill j's high halo, and the other way round
                sends.append((j, 1 - side, y[k][self._slab(axis, side, n, halo=send_halo)]))
                receives.append((j, 2 * i + side, y[k][self._slab(axis, side, n, halo=not send_halo)]))
        return sends, receives

    def _interior(self, ndim: int) -> tuple:
        w = self.width
        return (slice(None),) * 3 + (slice(w, -w),) * (ndim - 3)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """The forward exchange on maps (S, B, C, *tile): one zero-padded copy in x's memory
        layout (channels-last maps stay so for the convolution), whose halos are filled axis by
        axis (the slabs sent along an axis carry the halos of the axes before it: corners arrive
        without diagonal messages)."""
        start, w = time.perf_counter(), self.width
        if x.shape[0] != len(self.mine):
            raise ValueError(f"halo exchange: rank {self.rank} owns {len(self.mine)} subdomains, "
                             f"not {x.shape[0]}")
        if any(n < w for n in x.shape[3:]):
            raise ValueError(f"halo exchange: tiles {tuple(x.shape[3:])} are thinner than the halo width {w}")
        y = nn.functional.pad(x.flatten(0, 1), [w] * (2 * (x.dim() - 3))).unflatten(0, x.shape[:2])
        for axis in range(len(self.grid)):
            self._transfer(*self._messages(y, axis, send_halo=False), add=False)
        self.seconds += time.perf_counter() - start
        return y

    def unpad(self, grad: torch.Tensor) -> torch.Tensor:
        """The adjoint on maps (S, B, C, *(tile + 2 width)): axis by axis in reverse, each
        halo's gradient added onto the layers it came from, then the halo zeroed (the values it
        held before, zeros, carry no gradient to the axes exchanged before it); the interior."""
        start, w = time.perf_counter(), self.width
        g = grad.clone()
        for axis in reversed(range(len(self.grid))):
            self._transfer(*self._messages(g, axis, send_halo=True), add=True)
            g[(slice(None),) * (3 + axis) + (slice(0, w),)] = 0
            g[(slice(None),) * (3 + axis) + (slice(g.shape[3 + axis] - w, None),)] = 0
        self.seconds += time.perf_counter() - start
        return g[self._interior(g.dim())]


def _wire(dtype):
    """What a map of `dtype` travels as: float64 as it is, anything else as float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class HaloPad(torch.autograd.Function):
    """forward: HaloExchange.pad (neighbours' boundary layers around each tile); backward (its
    adjoint): HaloExchange.unpad."""

    @staticmethod
    def forward(ctx, x, exchange):
        ctx.exchange = exchange
        return exchange.pad(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.exchange.unpad(grad), None
