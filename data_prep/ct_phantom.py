"""Synthetic chest-CT-like volumes at CT size: a body, two lungs and 0 to 3 lesions.

    python -m data_prep.ct_phantom                                    # -> data/ct_phantom.h5: 300/50/50 of 128x128x64
    python -m data_prep.ct_phantom --out data/ct_small.h5 --shape 64x64x32 --train 96 --val 32 --test 32

No labelled CT set can be downloaded here (the COVID-19 CT collections need the internet), so this
writes volumes of the size the Keras example "3D image classification from CT scans" resizes
scans to, 128x128x64 voxels, in the axis order data_prep.nifti gives real scans ((x, y, z) as
(D, H, W): D left->right, H posterior->anterior, W inferior->superior), windowed to uint8 as
`data_prep.nifti --window -1000,400 --dtype uint8` would.

Each volume, in Hounsfield units before the window: air (-1000) around an elliptic body of soft
tissue (+40) with a denser spine (+400), two elliptic lungs (-850) and voxel noise (sd 60 HU); the
shape, size and position of each part vary from volume to volume. The class is the number of
lesions, 0, 1, 2 or 3 (equally likely): opacities, blobs of up to +600 HU and a random radius of
5 to 10 voxels centred anywhere in either lung. One subvolume of a decomposition sees
some of a volume's lesions at most, so the count needs every subvolume: what the coarse DNN
combines. Chunks hold one sample of --tile^3 voxels (default 32: on 128x128x64 each subvolume of
4x4x2 is one chunk, and `--shuffle exact` streams as fast as in memory).
"""

from __future__ import annotations

import os
import sys

import numpy as np

from data_prep.common import ConvertError, Progress, main_of, parse_shape
from mpidd.writer import DatasetWriter

CLASSES = ["no lesion", "1 lesion", "2 lesions", "3 lesions"]
WINDOW = (-1000.0, 400.0)


def phantom(rng: np.random.Generator, shape=(128, 128, 64), lesions: int = 0) -> np.ndarray:
    """One volume in Hounsfield units, float32 of `shape` (D, H, W), with `lesions` lesions."""
    D, H, W = shape
    x = (np.arange(D, dtype=np.float32)[:, None, None] + 0.5) / D - 0.5  # [-0.5, 0.5) on every axis
    y = (np.arange(H, dtype=np.float32)[None, :, None] + 0.5) / H - 0.5
    z = (np.arange(W, dtype=np.float32)[None, None, :] + 0.5) / W - 0.5
    u = rng.uniform
    cx, cy = u(-0.03, 0.03), u(-0.03, 0.03)
    body = ((x - cx) / u(0.40, 0.46)) ** 2 + ((y - cy) / u(0.30, 0.36)) ** 2 <= 1
    vol = np.full(shape, -1000.0, dtype=np.float32)
    vol[np.broadcast_to(body, shape)] = 40.0
    spine = ((x - cx) / 0.05) ** 2 + ((y - cy + u(0.20, 0.24)) / 0.05) ** 2 <= 1
    vol[np.broadcast_to(spine, shape)] = 400.0
    lungs = np.zeros(shape, dtype=bool)
    cz, rz = u(-0.05, 0.05), u(0.36, 0.44)
    for side in (-1, 1):
        lungs |= ((x - cx - side * u(0.16, 0.20)) / u(0.11, 0.14)) ** 2 \
            + ((y - cy - u(0.0, 0.04)) / u(0.17, 0.21)) ** 2 + ((z - cz) / rz) ** 2 <= 1
    vol[lungs] = -850.0
    inside = np.flatnonzero(lungs)
    for _ in range(lesions):  # a blob centred at a random lung voxel, confined to the lungs
        centre = np.unravel_index(inside[rng.integers(len(inside))], shape)
        radius = u(5.0, 10.0)
        d2 = sum(((np.arange(n, dtype=np.float32) - c) ** 2).reshape([-1 if a == k else 1 for a in range(3)])
                 for k, (n, c) in enumerate(zip(shape, centre)))
        vol += np.where(lungs, 600.0 * np.exp(-d2 / (2 * (radius / 1.5) ** 2)), 0.0).astype(np.float32)
    vol += rng.normal(0.0, 60.0, shape).astype(np.float32)
    return vol


def windowed(vol: np.ndarray) -> np.ndarray:
    """Hounsfield units -> uint8 as data_prep.nifti --window -1000,400 --dtype uint8."""
    lo, hi = WINDOW
    return np.rint((np.clip(vol, lo, hi) - lo) / (hi - lo) * 255).astype(np.uint8)


def add_arguments(p):
    p.add_argument("--out", default="data/ct_phantom.h5", help="HDF5 file to write (default: data/ct_phantom.h5)")
    p.add_argument("--shape", default="128x128x64", help="volume DxHxW in voxels (default: 128x128x64)")
    p.add_argument("--train", type=int, default=300, help="training volumes (default: 300)")
    p.add_argument("--val", type=int, default=50, help="validation volumes (default: 50)")
    p.add_argument("--test", type=int, default=50, help="test volumes (default: 50)")
    p.add_argument("--seed", type=int, default=0, help="seed of every draw (default: 0)")


def convert(args) -> dict:
    shape = parse_shape(args.shape, 3, "--shape")
    if min(shape) < 8:
        raise ConvertError(f"--shape {args.shape}: every edge needs at least 8 voxels")
    sizes = {"train": args.train, "val": args.val, "test": args.test}
    if min(sizes.values()) < 1:
        raise ConvertError("--train, --val and --test must each be at least 1")
    tile = args.tile or 32
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    progress = Progress(sum(sizes.values()), "volumes")
    rng = np.random.default_rng(args.seed)
    with DatasetWriter(args.out, (1, *shape), "uint8", sizes, CLASSES, tile=tile, chunk_samples=1,
                       attrs={"source": "data_prep.ct_phantom", "window_hu": list(WINDOW),
                              "axes": "D left-right, H posterior-anterior, W inferior-superior"}) as w:
        for split, n in sizes.items():
            for _ in range(n):
                label = int(rng.integers(len(CLASSES)))
                w.write(split, windowed(phantom(rng, shape, label))[None, None], np.array([label]))
                progress()
    return sizes


main = main_of("data_prep.ct_phantom", __doc__, add_arguments, convert)

if __name__ == "__main__":
    sys.exit(main())
