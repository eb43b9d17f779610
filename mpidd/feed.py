"""What a training loop reads, and in which order: an epoch's sample order (epoch_order; how
mixed a file's blocks are: classes_per_block), its mini-batches (batch_bounds) and evaluation
batches (eval_batches), and the images of a batch (Feed: from memory, or read ahead from a
stream, mpidd.stream.BoxStream). Pure torch and numpy, no MPI; the loops are in mpidd.engine.
"""

from __future__ import annotations

import numpy as np
import torch


def epoch_order(n: int, generator: torch.Generator, block: int = 1, buffer: int = 8) -> torch.Tensor:
    """The order of an epoch's n samples, drawn from `generator` alone (so the same at every
    rank count and data access, and again after a resume from the generator's state).

    block 1: a uniform permutation. block B > 1: the blocks of B consecutive samples (the file's
    chunk rows) in a random order, and the samples of every `buffer` consecutive blocks of that
    order shuffled together: an epoch then reads each block once, `buffer` of them at a time."""
    if block <= 1:
        return torch.randperm(n, generator=generator)
    blocks = torch.randperm(-(-n // block), generator=generator)
    order = []
    for w in range(0, len(blocks), buffer):
        samples = torch.cat([torch.arange(b * block, min((b + 1) * block, n)) for b in blocks[w:w + buffer].tolist()])
        order.append(samples[torch.randperm(len(samples), generator=generator)])
    return torch.cat(order)


def classes_per_block(labels, block: int) -> float:
    """The mean number of distinct classes among the labels of each block of `block` consecutive
    samples: how mixed the file's chunk rows are, which is all the blocks order (epoch_order)
    can mix beyond its buffer. A file in class order has about 1."""
    labels = np.asarray(labels)
    starts = range(0, len(labels), max(1, block))
    return float(np.mean([len(np.unique(labels[a:a + block])) for a in starts])) if len(labels) else 0.0


class Feed:
    """A loop's images, batch by batch: from an array in memory (indexed directly, moved to
    `device` once) or from a stream (mpidd.stream.BoxStream), whose batches are announced in
    order with plan() so that they are read ahead. take(idx): the images of sample indices idx,
    in idx's order, as a tensor (a stream's on the CPU)."""

    def __init__(self, x, device=None):
        self.stream = x if hasattr(x, "batches") else None
        self.x = None if self.stream is not None else torch.as_tensor(x)
        if self.x is not None and device is not None:
            self.x = self.x.to(device)
        self.pending = None

    def __len__(self):
        return len(self.stream if self.stream is not None else self.x)

    def dim(self) -> int:
        return self.stream.ndim if self.stream is not None else self.x.dim()

    def plan(self, index_lists):
        """The batches that take() will be asked for next, in order (a stream reads them ahead)."""
        if self.stream is not None:
            self.close()
            self.pending = self.stream.batches([torch.as_tensor(i).cpu().numpy() for i in index_lists])

    def take(self, idx) -> torch.Tensor:
        if self.stream is None:  # index_select: about 2.5x faster than x[idx] for a batch of rows
            return self.x.index_select(0, idx) if isinstance(idx, torch.Tensor) else self.x[idx]
        if self.pending is None:  # nothing announced: read now
            return torch.from_numpy(self.stream[torch.as_tensor(idx).cpu().numpy()])
        return torch.from_numpy(self.pending.take(idx))

    def close(self):
        if self.pending is not None:
            self.pending.close()
            self.pending = None


def as_feed(x, device=None) -> Feed:
    return x if isinstance(x, Feed) else Feed(x, device)


def batch_bounds(n: int, batch_size: int) -> list[int]:
    """Start indices of the mini-batches of an epoch, plus n. No batch of one image: BatchNorm
    cannot normalise it on 1x1 maps, so a last batch of one joins the one before."""
    bounds = list(range(0, n, batch_size)) + [n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        del bounds[-2]
    return bounds


def eval_batches(n: int, total: int, batch_size: int, group=None) -> list[slice]:
    """The evaluation batches of this rank's n samples (of `total`). In a data-parallel group
    every rank takes the same number (shares differ by at most one sample, so a rank's last
    batch may be empty), so that collective calls inside them (stop polls, BatchNorm) match."""
    longest = -(-total // (group.size if group is not None else 1))
    return [slice(min(s, n), min(s + batch_size, n)) for s in range(0, max(longest, 1), batch_size)]
