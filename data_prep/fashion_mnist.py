"""Convert the four IDX files of Fashion-MNIST (or MNIST) into the mpidd HDF5 layout.

    python -m data_prep.fashion_mnist                         # Debian's dataset-fashion-mnist
    python -m data_prep.fashion_mnist --src DIR --out data/fashion_mnist.h5 --val 5000

Reads train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and
t10k-labels-idx1-ubyte (each optionally .gz) from --src. The last --val training images
become the validation split; t10k is the test split. Images are stored uint8 (n, 1, 28, 28)
in 7x7-pixel tiles, labels int64. The output is written to a temporary name and renamed, so
a failed conversion never leaves a partial file.
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys

import numpy as np

from mpidd.writer import write_dataset

DEBIAN_SRC = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
MNIST_CLASSES = [str(d) for d in range(10)]
FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
         "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
IDX_UBYTE = 0x08


class IDXError(ValueError):
    pass


def find_file(src: str, stem: str) -> str:
    for name in (stem, stem + ".gz"):
        path = os.path.join(src, name)
        if os.path.exists(path):
            return path
    raise IDXError(f"{stem}[.gz] not found in {src}: put the four Fashion-MNIST IDX files there "
                   f"(on Debian: apt-get install dataset-fashion-mnist) or pass --src DIR")


def read_idx(path: str, ndim: int) -> np.ndarray:
    """Read an unsigned-byte IDX file with `ndim` dimensions; refuse truncated or foreign files."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise IDXError(f"{path}: cannot be read ({e}); the file is damaged or truncated") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != IDX_UBYTE or raw[3] != ndim:
        raise IDXError(f"{path}: not an unsigned-byte IDX file with {ndim} dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IDXError(f"{path}: truncated header")
    shape = tuple(int.from_bytes(raw[4 + 4 * k:8 + 4 * k], "big") for k in range(ndim))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise IDXError(f"{path}: {len(raw)} bytes but its header {shape} needs {expected}; "
                       f"the file is truncated or damaged")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def load_pair(src: str, prefix: str, num_classes: int):
    images = read_idx(find_file(src, FILES[f"{prefix}_images"]), 3)
    labels = read_idx(find_file(src, FILES[f"{prefix}_labels"]), 1)
    if len(images) != len(labels):
        raise IDXError(f"{src}: {prefix} has {len(images)} images but {len(labels)} labels; "
                       f"the files do not belong together")
    if labels.max() >= num_classes:
        raise IDXError(f"{src}: {prefix} labels reach {labels.max()}, expected < {num_classes}")
    return images[:, None, :, :], labels.astype(np.int64)


def convert(src: str, out: str, val: int = 5000, dataset: str = "fashion", tile: int | None = None) -> dict:
    classes = FASHION_CLASSES if dataset == "fashion" else MNIST_CLASSES
    x_train, y_train = load_pair(src, "train", len(classes))
    x_test, y_test = load_pair(src, "test", len(classes))
    if x_train.shape[1:] != x_test.shape[1:]:
        raise IDXError(f"{src}: training images {x_train.shape[2:]} and test images "
                       f"{x_test.shape[2:]} differ in size")
    if not 0 < val < len(x_train):
        raise IDXError(f"--val {val} must be between 1 and {len(x_train) - 1}")
    cut = len(x_train) - val
    splits = {"train": (x_train[:cut], y_train[:cut]), "val": (x_train[cut:], y_train[cut:]),
              "test": (x_test, y_test)}
    write_dataset(out, splits, classes=classes, tile=tile,
                  attrs={"source": os.path.abspath(src), "dataset": dataset})
    return {k: len(v[0]) for k, v in splits.items()}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m data_prep.fashion_mnist", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--src", default=DEBIAN_SRC, help="directory holding the four IDX files")
    p.add_argument("--out", default="data/fashion_mnist.h5", help="HDF5 file to write")
    p.add_argument("--val", type=int, default=5000, help="last VAL training images become the validation split")
    p.add_argument("--dataset", choices=("fashion", "mnist"), default="fashion", help="class names to store")
    p.add_argument("--tile", type=int, default=None,
                   help="spatial edge of the HDF5 chunks (default: 7 when the image edges are multiples of 7, "
                   "else 8); a rank reads whole chunks, so a grid whose subimage edges are multiples of the tile "
                   "reads no more than its share: 7 suits 2x2 and 4x4 on 28x28, 4 suits 7x7 (benchmarks/io_chunks.py)")
    args = p.parse_args(argv)
    try:
        sizes = convert(args.src, args.out, args.val, args.dataset, args.tile)
    except IDXError as e:
        print(f"python -m data_prep.fashion_mnist: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v}" for k, v in sizes.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
