"""Convert scikit-learn's bundled `digits` (real handwritten digits, 1,797 images of 8x8, 10
classes; no download) into the mpidd HDF5 layout. Small enough for tests on real data.

    python -m data_prep.digits                              # -> data/digits.h5
    python -m data_prep.digits --out FILE --val 300 --test 300 --seed 0

The 17 grey levels (0..16) are scaled to uint8 (x 255/16). The images are shuffled once with
--seed, then split into test (the first --test), val (the next --val) and train (the rest).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from mpidd.writer import write_dataset


def load(val: int = 300, test: int = 300, seed: int = 0) -> dict:
    """{split: (uint8 images (n, 1, 8, 8), int64 labels)} from sklearn.datasets.load_digits."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ValueError("scikit-learn is not installed: "
                         "pip install scikit-learn (or pip install -e '.[test]')") from None
    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)[:, None]
    labels = digits.target.astype(np.int64)
    if val < 1 or test < 1 or val + test >= len(labels):
        raise ValueError(f"--val {val} and --test {test} must be >= 1 and leave training images "
                         f"(there are {len(labels)})")
    order = np.random.default_rng(seed).permutation(len(labels))
    parts = {"test": order[:test], "val": order[test:test + val], "train": order[test + val:]}
    return {s: (images[parts[s]], labels[parts[s]]) for s in ("train", "val", "test")}


def convert(out: str, val: int = 300, test: int = 300, seed: int = 0) -> str:
    return write_dataset(out, load(val, test, seed), classes=[str(d) for d in range(10)],
                         attrs={"source": "sklearn.datasets.load_digits"})


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m data_prep.digits", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="data/digits.h5", help="HDF5 file to write")
    p.add_argument("--val", type=int, default=300, help="validation images")
    p.add_argument("--test", type=int, default=300, help="test images")
    p.add_argument("--seed", type=int, default=0, help="seed of the one shuffle before the split")
    args = p.parse_args(argv)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    try:
        convert(args.out, args.val, args.test, args.seed)
    except ValueError as e:
        print(f"python -m data_prep.digits: error: {e}", file=sys.stderr)
        return 2
    sizes = {s: n for s, n in zip(("train", "val", "test"), (1797 - args.val - args.test, args.val, args.test))}
    print(f"wrote {args.out}: " + ", ".join(f"{s} {n}" for s, n in sizes.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
