"""What every converter shares: its one-line refusal (exit 2, nothing written), progress lines
for long conversions, and the seeded train/val/test split.

A converter module defines `add_arguments(parser)` and `convert(args) -> {split: n written}`,
`main = main_of("data_prep.NAME", __doc__, add_arguments, convert)`, and ends with
`if __name__ == "__main__": sys.exit(main())`.
Its convert writes through mpidd.writer.DatasetWriter (block by block, atomically, with the
training split's per-channel mean and std), so a refused or failed conversion leaves no file.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from mpidd.data import DataError


class ConvertError(ValueError):
    """Bad input: the converter prints this one line and exits with 2, writing nothing."""


EXIT_BAD_INPUT = 2


class Progress:
    """`done/total what` lines on stderr, at most one every `every` seconds, and one at the end
    when the work took longer than that (short conversions print nothing)."""

    def __init__(self, total: int, what: str, every: float = 5.0, stream=None):
        self.total, self.what, self.every = total, what, every
        self.stream = stream or sys.stderr
        self.start = self.last = time.monotonic()
        self.done = 0

    def __call__(self, count: int = 1):
        self.done += count
        now = time.monotonic()
        if now - self.last >= self.every or (self.done >= self.total and now - self.start >= self.every):
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            print(f"{self.done}/{self.total} {self.what} ({rate:.0f}/s, ETA {eta:.0f} s)",
                  file=self.stream, flush=True)
            self.last = now


def seeded_split(n: int, val: int, test: int, seed: int) -> dict:
    """{"train", "val", "test": sorted indices}: one seeded shuffle of range(n), test first, then
    val, the rest train; each split must get at least one sample."""
    if val < 1 or test < 1 or val + test >= n:
        raise ConvertError(f"--val {val} and --test {test} must be >= 1 and leave training samples "
                           f"(there are {n})")
    order = np.random.default_rng(seed).permutation(n)
    return {"test": np.sort(order[:test]), "val": np.sort(order[test:test + val]),
            "train": np.sort(order[test + val:])}


def parse_shape(text: str, ndim: int, flag: str) -> tuple[int, ...]:
    """'32x32' (ndim 2) or '32x64x64' (ndim 3) -> a tuple of positive ints."""
    try:
        shape = tuple(int(s) for s in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) != ndim or min(shape) < 1:
        example = "x".join(["32"] * ndim)
        raise ConvertError(f"{flag} {text!r}: expected {ndim} positive sizes like {example}")
    return shape


def main_of(module: str, doc: str, add_arguments, convert):
    """The converter's main(argv=None): parse, convert, print what was written; one line and
    exit 2 on bad input."""
    prog = f"python -m {module}"

    def main(argv=None) -> int:
        p = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0], epilog=doc.split("\n\n", 1)[-1],
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        add_arguments(p)
        p.add_argument("--tile", type=int, default=None,
                       help="spatial edge of the HDF5 chunks (default: 7 when the image edges are multiples of 7, "
                       "else 8); a rank reads whole chunks, so a grid whose subimage edges are multiples of the tile "
                       "reads no more than its share: 7 suits 2x2 and 4x4 on 28x28, 4 suits 7x7 "
                       "(benchmarks/io_chunks.py)")
        args = p.parse_args(argv)
        try:
            if args.tile is not None and args.tile < 1:
                raise ConvertError(f"--tile {args.tile}: must be at least 1")
            sizes = convert(args)
        except (ConvertError, DataError) as e:
            print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)  # one line
            return EXIT_BAD_INPUT
        print(f"wrote {args.out}: " + ", ".join(f"{k} {v}" for k, v in sizes.items()), flush=True)
        return 0

    return main


def require_path(path: str, what: str) -> str:
    if not os.path.exists(path):
        raise ConvertError(f"{path} does not exist ({what})")
    return path
