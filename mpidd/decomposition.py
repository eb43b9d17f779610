"""Pure geometry of the image decomposition: no MPI, no torch.

A grid "AxB" (or "AxBxC" for volumes) cuts every image into N = A*B subimages.
Subdomain i has grid coordinates in C order (row-major: the last axis varies fastest),
so for 2x2 the subdomains are 0=(top, left), 1=(top, right), 2=(bottom, left), 3=(bottom, right).

Border rule (all subimages have the same shape): along an axis of length L cut into A parts,
every box has length  s = ceil(L / A) + 2 * overlap  (or L when A == 1, where no overlap is
added). Box a nominally starts at round(a * L / A) - overlap and is shifted inwards until it
lies inside the image, so boxes at the border reach `2 * overlap` further into the interior
instead of sticking out. Without overlap and with A dividing L the boxes tile the image.
A grid or overlap is refused when s > L; the largest overlap is (L - ceil(L / A)) // 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


class DecompositionError(ValueError):
    """A grid or overlap that does not fit the image."""


def parse_grid(text: str) -> tuple[int, ...]:
    """'2x2' -> (2, 2); '4x4x2' -> (4, 4, 2)."""
    try:
        grid = tuple(int(p) for p in str(text).lower().split("x"))
    except ValueError:
        raise DecompositionError(f"grid {text!r} is not of the form AxB (e.g. 2x2, 4x4)") from None
    if not grid or any(g < 1 for g in grid):
        raise DecompositionError(f"grid {text!r}: every factor must be a positive integer")
    return grid


def format_grid(grid) -> str:
    return "x".join(str(g) for g in grid)


@dataclass(frozen=True)
class Decomposition:
    """Subdomain boxes of a grid over images of spatial shape `shape` (H, W) or (D, H, W)."""

    shape: tuple[int, ...]
    grid: tuple[int, ...]
    overlap: int = 0

    def __post_init__(self):
        shape, grid, delta = tuple(self.shape), tuple(self.grid), int(self.overlap)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "grid", grid)
        if len(grid) != len(shape):
            raise DecompositionError(
                f"grid {format_grid(grid)} has {len(grid)} factors but the images have "
                f"{len(shape)} spatial axes {format_grid(shape)}: give one factor per axis")
        if delta < 0:
            raise DecompositionError(f"overlap must be >= 0, got {delta}")
        for axis, (length, parts) in enumerate(zip(shape, grid)):
            if parts > length:
                raise DecompositionError(
                    f"grid {format_grid(grid)} does not fit images of shape {format_grid(shape)}: "
                    f"axis {axis} has {length} pixels, so at most {length} parts")
            if parts > 1 and math.ceil(length / parts) + 2 * delta > length:
                limit = (length - math.ceil(length / parts)) // 2
                raise DecompositionError(
                    f"overlap {delta} too large for grid {format_grid(grid)} on images "
                    f"{format_grid(shape)}: at most {limit} along axis {axis}")

    @property
    def num_subdomains(self) -> int:
        return math.prod(self.grid)

    @property
    def subimage_shape(self) -> tuple[int, ...]:
        return tuple(_box_length(L, A, self.overlap) for L, A in zip(self.shape, self.grid))

    def coords(self, index: int) -> tuple[int, ...]:
        """Grid coordinates of subdomain `index` (C order)."""
        if not 0 <= index < self.num_subdomains:
            raise IndexError(f"subdomain {index} out of range 0..{self.num_subdomains - 1}")
        out = []
        for parts in reversed(self.grid):
            out.append(index % parts)
            index //= parts
        return tuple(reversed(out))

    def box(self, index: int) -> tuple[tuple[int, int], ...]:
        """Half-open pixel ranges ((y0, y1), (x0, x1)) of subdomain `index`, overlap included."""
        return tuple(_box_range(L, A, a, self.overlap)
                     for L, A, a in zip(self.shape, self.grid, self.coords(index)))

    def slices(self, index: int) -> tuple[slice, ...]:
        return tuple(slice(lo, hi) for lo, hi in self.box(index))

    def boxes(self) -> list[tuple[tuple[int, int], ...]]:
        return [self.box(i) for i in range(self.num_subdomains)]

    # A subdomain's tile is its box without the overlap (the box of overlap 0): the pixels it
    # predicts in a dense task, while its network sees the whole box. Where the grid divides
    # the image, the tiles partition it.

    @property
    def tile_shape(self) -> tuple[int, ...]:
        return tuple(_box_length(L, A, 0) for L, A in zip(self.shape, self.grid))

    @property
    def tiles_are_equal(self) -> bool:
        """Whether the grid divides every axis, so that the tiles are equal and partition the image."""
        return all(g * t == n for g, t, n in zip(self.grid, self.tile_shape, self.shape))

    def tile(self, index: int) -> tuple[tuple[int, int], ...]:
        """Half-open pixel ranges of subdomain `index`'s tile."""
        return tuple(_box_range(L, A, a, 0) for L, A, a in zip(self.shape, self.grid, self.coords(index)))

    def tile_slices(self, index: int) -> tuple[slice, ...]:
        return tuple(slice(lo, hi) for lo, hi in self.tile(index))

    def crop(self, index: int) -> tuple[slice, ...]:
        """Where subdomain `index`'s tile lies inside its box (slices of the box's axes; border
        boxes are shifted inwards, so the offset differs from subdomain to subdomain)."""
        return tuple(slice(t0 - b0, t1 - b0) for (b0, _), (t0, t1) in zip(self.box(index), self.tile(index)))


def grid_neighbour(grid, index: int, axis: int, step: int) -> int | None:
    """The subdomain `step` (+1 or -1) cells from subdomain `index` along `axis` of `grid` (C
    order, as Decomposition.coords), or None where the grid ends."""
    strides = [math.prod(grid[a + 1:]) for a in range(len(grid))]
    coord = index // strides[axis] % grid[axis] + step
    return index + step * strides[axis] if 0 <= coord < grid[axis] else None


def _box_length(length: int, parts: int, delta: int) -> int:
    return length if parts == 1 else math.ceil(length / parts) + 2 * delta


def _box_range(length: int, parts: int, a: int, delta: int) -> tuple[int, int]:
    size = _box_length(length, parts, delta)
    if parts == 1:
        return (0, length)
    start = round(a * length / parts) - delta
    start = min(max(start, 0), length - size)
    return (start, start + size)


def subdomains_of_rank(rank: int, size: int, num_subdomains: int) -> list[int]:
    """Subdomains owned by `rank` of `size` ranks: round robin, rank r takes r, r+P, r+2P, ..."""
    if size > num_subdomains:
        raise DecompositionError(
            f"{size} ranks but only {num_subdomains} subdomains: run with at most "
            f"{num_subdomains} ranks (mpirun -n {num_subdomains}) or use a finer grid")
    return list(range(rank, num_subdomains, size))


def rank_of_subdomain(index: int, size: int) -> int:
    return index % size


def replicas(size: int, num_subdomains: int) -> int:
    """Ranks per subdomain: 1 when P <= N (ranks take subdomains in turn), P/N when P is a
    multiple of N (each subdomain's model trained data parallel by P/N ranks)."""
    if size <= num_subdomains:
        return 1
    if size % num_subdomains:
        raise DecompositionError(
            f"{size} ranks for {num_subdomains} subdomains: with more ranks than subdomains the ranks must be a "
            f"multiple of the subdomains ({num_subdomains * (size // num_subdomains)} or "
            f"{num_subdomains * (size // num_subdomains + 1)} ranks: P/N ranks train each subdomain's model "
            f"data parallel)")
    return size // num_subdomains


def layout(rank: int, size: int, num_subdomains: int) -> tuple[list[int], int, int]:
    """(subdomains of `rank`, ranks per subdomain G, this rank's place in its subdomain's group).

    P <= N: round robin, rank r takes r, r+P, ...; G = 1. P = G*N: rank r trains subdomain
    r % N as member r // N of its group, so ranks 0..N-1 lead the groups (rank i: subdomain i,
    as with P = N).
    """
    g = replicas(size, num_subdomains)
    if g == 1:
        return subdomains_of_rank(rank, size, num_subdomains), 1, 0
    return [rank % num_subdomains], g, rank // num_subdomains


# Longest side over shortest side of a subimage that `choose_grid` still accepts as one subdomain
# per rank (2: 8 ranks on 28x28 give 2x4, subimages 14x7; 3 ranks would give 28x10, too thin).
MAX_ASPECT = 2.0


def _aspect(shape) -> float:
    return max(shape) / min(shape)


def choose_grid(ranks: int, shape) -> tuple[tuple[int, ...], str]:
    """The grid of --grid auto for `ranks` ranks on images of spatial shape `shape`, and why.

    One subdomain per rank where `ranks` factors into a grid (one factor per axis, each at most
    the axis length, at least 2 subdomains) whose subimages are at most MAX_ASPECT times as long
    as wide; among those the most square subimages, then the grid in ascending order (8 ranks
    on 28x28: 2x4; on 16^3 volumes: 2x2x2). Otherwise the smallest square grid k x k (k^d >=
    ranks, k >= 2) that fits: ranks then take several subdomains in turn (5 ranks: 3x3).
    """
    d = len(shape)

    def factorizations(n, axes):
        if axes == 1:
            yield (n,)
            return
        for f in range(1, n + 1):
            if n % f == 0:
                for rest in factorizations(n // f, axes - 1):
                    yield (f,) + rest

    fits = []
    for grid in set(factorizations(ranks, d)):
        if ranks < 2 or any(g > s for g, s in zip(grid, shape)):
            continue
        sub = Decomposition(tuple(shape), grid, 0).subimage_shape
        if _aspect(sub) <= MAX_ASPECT:
            fits.append((_aspect(sub), grid))
    if fits:
        aspect, grid = min(fits, key=lambda t: (round(t[0], 9), t[1]))
        sub = Decomposition(tuple(shape), grid, 0).subimage_shape
        return grid, (f"grid auto: {format_grid(grid)} for {ranks} ranks on {format_grid(shape)} images, one "
                      f"subdomain per rank (subimages {format_grid(sub)})")
    k = 2
    while k ** d < ranks:
        k += 1
    grid = (k,) * d
    if any(k > s for s in shape):
        raise DecompositionError(f"grid auto: {ranks} ranks need a {format_grid(grid)} grid, which does not fit "
                                 f"images of shape {format_grid(shape)}: give --grid")
    sub = Decomposition(tuple(shape), grid, 0).subimage_shape
    why = ("one rank" if ranks == 1 else
           f"{ranks} does not factor into a grid of subimages at most {MAX_ASPECT:g} times as long as wide")
    per_rank = -(-k ** d // ranks)
    return grid, (f"grid auto: {format_grid(grid)} for {ranks} rank{'s' if ranks > 1 else ''} on "
                  f"{format_grid(shape)} images ({why}): "
                  f"{k ** d} subdomains, up to {per_rank} per rank (subimages {format_grid(sub)})")
