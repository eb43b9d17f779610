"""An RGB set made of real photographs shipped with scikit-image and scikit-learn (no
download): 32x32 patches cut from 8 colour photographs, label = the photograph. It checks
the 3-channel path on real colour statistics; its labels are by construction (which photo a
patch comes from), not a recognition task from the papers.

    python -m data_prep.photos                                # -> data/photos.h5
    python -m data_prep.photos --out FILE --size 32 --train 600 --val 100 --test 200 --seed 0

Each photo is cut into three vertical bands, left to right: the first 70% of its width gives
the training patches, the next 15% the validation patches, the last 15% the test patches, so
no test pixel was ever seen in training. Patches are cut at seeded random positions inside
their band; stored uint8 (n, 3, size, size).
"""

from __future__ import annotations

import sys

import numpy as np

from data_prep.common import ConvertError, main_of
from mpidd.writer import DatasetWriter

SKIMAGE = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")
SKLEARN = ("china.jpg", "flower.jpg")
BANDS = {"train": (0.0, 0.70), "val": (0.70, 0.85), "test": (0.85, 1.0)}


def photographs() -> dict:
    """{name: uint8 (H, W, 3)} of the 8 photos."""
    try:
        import skimage.data
        from sklearn.datasets import load_sample_image
    except ImportError:
        raise ConvertError("scikit-image and scikit-learn are needed: pip install scikit-image scikit-learn "
                           "(or pip install -e '.[data,test]')") from None
    photos = {name: getattr(skimage.data, name)() for name in SKIMAGE}
    photos.update({name.split(".")[0]: load_sample_image(name) for name in SKLEARN})
    return photos


def band_columns(photo, band, size):
    """(first, end) columns of the band (fractions of the width); refused where a patch of
    `size` does not fit it."""
    h, w, _ = photo.shape
    lo, hi = int(band[0] * w), int(band[1] * w)
    if hi - lo < size or h < size:
        raise ConvertError(f"--size {size} does not fit a band {hi - lo} pixels wide of a {h}x{w} photo")
    return lo, hi


def patches(photo, band, count, size, rng):
    """`count` size x size patches at random positions inside the band (fractions of the width)."""
    h = photo.shape[0]
    lo, hi = band_columns(photo, band, size)
    top = rng.integers(0, h - size + 1, count)
    left = rng.integers(lo, hi - size + 1, count)
    return np.stack([photo[t:t + size, x:x + size].transpose(2, 0, 1) for t, x in zip(top, left)])


def add_arguments(p):
    p.add_argument("--out", default="data/photos.h5", help="HDF5 file to write (default %(default)s)")
    p.add_argument("--size", type=int, default=32, help="patch size in pixels (default %(default)s)")
    for split, n in (("train", 600), ("val", 100), ("test", 200)):
        p.add_argument(f"--{split}", type=int, default=n, help=f"{split} patches per photo (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the patch positions")


def convert(args) -> dict:
    counts = {s: getattr(args, s) for s in BANDS}
    if min(counts.values()) < 1 or args.size < 4:
        raise ConvertError("--train, --val and --test must be >= 1 and --size >= 4")
    photos = photographs()
    for photo in photos.values():  # before anything is written
        for band in BANDS.values():
            band_columns(photo, band, args.size)
    rng = np.random.default_rng(args.seed)
    sizes = {s: n * len(photos) for s, n in counts.items()}
    with DatasetWriter(args.out, (3, args.size, args.size), "uint8", sizes, list(photos), tile=args.tile,
                       attrs={"source": "skimage.data " + " ".join(SKIMAGE) + "; sklearn " + " ".join(SKLEARN),
                              "labels": "by construction: the photograph a patch is cut from"}) as w:
        for split, band in BANDS.items():
            for label, photo in enumerate(photos.values()):
                w.write(split, patches(photo, band, counts[split], args.size, rng), np.full(counts[split], label))
    return sizes


main = main_of("data_prep.photos", __doc__, add_arguments, convert)

if __name__ == "__main__":
    sys.exit(main())
