"""Convert scikit-image's `lfw_subset` (real photographs: 100 faces and 100 non-faces from
Labeled Faces in the Wild, 25x25 gray; shipped with scikit-image, no download) into the mpidd
HDF5 layout, through mpidd.write_dataset (the numpy-array path).

    python -m data_prep.lfw_subset                           # -> data/lfw_subset.h5
    python -m data_prep.lfw_subset --out FILE --val 30 --test 50 --seed 0

Classes: 0 face, 1 non-face. The 200 images are shuffled once with --seed, then split into
test (the first --test), val (the next --val) and train (the rest). Values in [0, 1] are
stored float32 as they come.
"""

from __future__ import annotations

import sys

import numpy as np

from data_prep.common import ConvertError, main_of, seeded_split
from mpidd.writer import write_dataset

CLASSES = ["face", "non-face"]


def load():
    """(float32 images (200, 1, 25, 25), int64 labels): skimage.data.lfw_subset, faces first."""
    try:
        from skimage.data import lfw_subset
    except ImportError:
        raise ConvertError("scikit-image is not installed: pip install scikit-image "
                           "(or pip install -e '.[data]')") from None
    images = lfw_subset().astype(np.float32)[:, None]
    labels = np.repeat([0, 1], len(images) // 2).astype(np.int64)  # 100 faces, then 100 non-faces
    return images, labels


def add_arguments(p):
    p.add_argument("--out", default="data/lfw_subset.h5", help="HDF5 file to write (default %(default)s)")
    p.add_argument("--val", type=int, default=30, help="validation images (default %(default)s)")
    p.add_argument("--test", type=int, default=50, help="test images (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the one shuffle before the split")


def convert(args) -> dict:
    images, labels = load()
    parts = seeded_split(len(labels), args.val, args.test, args.seed)
    write_dataset(args.out, {s: (images[i], labels[i]) for s, i in parts.items()}, classes=CLASSES, tile=args.tile,
                  attrs={"source": "skimage.data.lfw_subset"})
    return {s: len(parts[s]) for s in ("train", "val", "test")}


main = main_of("data_prep.lfw_subset", __doc__, add_arguments, convert)

if __name__ == "__main__":
    sys.exit(main())
