"""Convert a MedMNIST-style .npz (train/val/test images and labels) into the mpidd HDF5 layout.

    python -m data_prep.medmnist pathmnist.npz --out data/pathmnist.h5
    python -m data_prep.medmnist organmnist3d.npz --out data/organ3d.h5 --classes a,b,c,...
    python -m data_prep.medmnist volumes.npz --out data/vol.h5 --3d

The npz holds train_images, train_labels, val_images, val_labels, test_images, test_labels
(np.savez or np.savez_compressed). Images (n, H, W) are grey -> (n, 1, H, W); (n, H, W, 3) are
RGB -> (n, 3, H, W); any other 4-D (n, D, H, W) are volumes -> (n, 1, D, H, W). A 4-D array
whose last axis is 3 is read as RGB unless --3d says it holds volumes of 3 slices. uint8
images stay uint8, other numbers become float32 (and must be finite). Labels (n,) or (n, 1)
are class indices; (n, k > 1) are multi-label and refused. Class names are --classes or
"0".."K-1" with K = the largest label + 1. The arrays are streamed a block of samples at a
time, never held whole.

Refused with one line, exit code 2 and nothing written: a missing file or one that is not an npz,
a missing key, a wrong array rank, labels whose count differs from the images', different image
shapes across splits, multi-label labels (n, k > 1), NaN or inf (or float64 values beyond float32)
in float images, uint8 mixed with float splits, negative or non-integer labels, Fortran-ordered
arrays, --classes with too few or empty names.
"""

from __future__ import annotations

import os
import sys
import zipfile
import zlib

import numpy as np
from numpy.lib import format as npy

from data_prep.common import ConvertError, Progress, main_of, require_path
from mpidd.data import SPLITS
from mpidd.writer import DatasetWriter

BLOCK = 1024  # samples per read
KEYS = [f"{s}_{w}" for s in SPLITS for w in ("images", "labels")]


class Member:
    """One NAME.npy of the npz, opened as a stream: its header, then rows on demand."""

    def __init__(self, zf: zipfile.ZipFile, path: str, key: str):
        self.zf, self.path, self.key = zf, path, key
        if key + ".npy" not in zf.namelist():
            raise ConvertError(f"{path}: key {key!r} is missing (need {', '.join(KEYS)})")
        try:
            with zf.open(key + ".npy") as f:
                version = npy.read_magic(f)
                if version not in ((1, 0), (2, 0)):  # 3.0 only adds utf-8 field names
                    raise ValueError(f"version {version}, expected 1.0 or 2.0")
                read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
                self.shape, fortran_order, self.dtype = read_header(f)
                self.offset = f.tell()  # where the rows begin
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            raise ConvertError(f"{path}: {key} is not a readable .npy array ({e})") from None
        if fortran_order:
            raise ConvertError(f"{path}: {key} is stored in Fortran order; save it C-ordered (np.ascontiguousarray)")
        if self.dtype.kind not in "uif" or not self.shape:
            raise ConvertError(f"{path}: {key} is {self.dtype}{self.shape}; expected an array of numbers")
        self.row_bytes = self.dtype.itemsize * int(np.prod(self.shape[1:]))

    def blocks(self):
        """Yield the rows BLOCK at a time, each an array of shape (rows,) + shape[1:]; every
        call streams the member afresh from its first row."""
        block = BLOCK
        try:
            with self.zf.open(self.key + ".npy") as f:
                f.read(self.offset)
                for lo in range(0, self.shape[0], block):
                    rows = min(block, self.shape[0] - lo)
                    raw = f.read(rows * self.row_bytes)
                    if len(raw) != rows * self.row_bytes:
                        raise ConvertError(f"{self.path}: {self.key} is truncated (its header says {self.shape})")
                    yield np.frombuffer(raw, dtype=self.dtype).reshape((rows,) + self.shape[1:])
        except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            raise ConvertError(f"{self.path}: {self.key} cannot be read ({e}); the file is damaged") from None


def image_layout(images: Member, volumes: bool):
    """(function turning a block as stored into (n, C, ...), the image shape (C, ...))."""
    shape = images.shape
    if 0 in shape[1:]:
        raise ConvertError(f"{images.path}: {images.key} has shape {shape}: empty images")
    if len(shape) == 3:  # (n, H, W) grey
        return (lambda x: x[:, None]), (1,) + shape[1:]
    if len(shape) == 4 and shape[3] == 3 and not volumes:  # (n, H, W, 3) RGB
        return (lambda x: x.transpose(0, 3, 1, 2)), (3,) + shape[1:3]
    if len(shape) == 4:  # (n, D, H, W) volumes
        return (lambda x: x[:, None]), (1,) + shape[1:]
    raise ConvertError(f"{images.path}: {images.key} has shape {shape}; expected (n, H, W), "
                       f"(n, H, W, 3) or (n, D, H, W)")


def check_labels(labels: Member, n: int):
    if labels.dtype.kind not in "ui":
        raise ConvertError(f"{labels.path}: {labels.key} is {labels.dtype}; expected integer class indices")
    if len(labels.shape) == 2 and labels.shape[1] > 1:
        raise ConvertError(f"{labels.path}: {labels.key} has shape {labels.shape}: multi-label data "
                           f"cannot be converted, mpidd trains single-label classifiers")
    if len(labels.shape) not in (1, 2):
        raise ConvertError(f"{labels.path}: {labels.key} has shape {labels.shape}; expected (n,) or (n, 1)")
    if labels.shape[0] != n:
        raise ConvertError(f"{labels.path}: {labels.shape[0]} labels in {labels.key} but {n} images")


def convert(args) -> dict:
    path = require_path(args.npz, "a MedMNIST-style .npz file")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ConvertError(f"{path}: not an npz (zip) file ({e})") from None
    with zf:
        m = {key: Member(zf, path, key) for key in KEYS}
        images = {s: m[f"{s}_images"] for s in SPLITS}
        to_channels, image_shape = image_layout(images["train"], args.volumes)
        for s in SPLITS:
            if images[s].shape[1:] != images["train"].shape[1:]:
                raise ConvertError(f"{path}: {s}_images are {images[s].shape[1:]} but train_images "
                                   f"{images['train'].shape[1:]}: one image shape for all splits")
            if (images[s].dtype == np.uint8) != (images["train"].dtype == np.uint8):
                raise ConvertError(f"{path}: {s}_images are {images[s].dtype} but train_images "
                                   f"{images['train'].dtype}: one kind of pixel for all splits")
            check_labels(m[f"{s}_labels"], images[s].shape[0])
        # Labels are streamed twice (they are small next to the images): first for their range.
        lo = hi = 0
        for s in SPLITS:
            for y in m[f"{s}_labels"].blocks():
                lo, hi = min(lo, int(y.min(initial=0))), max(hi, int(y.max(initial=0)))
        if lo < 0:
            raise ConvertError(f"{path}: negative label {lo}; labels must be class indices 0..K-1")
        classes = [str(k) for k in range(hi + 1)]
        if args.classes is not None:
            classes = [c.strip() for c in args.classes.split(",")]
            if not all(classes):
                raise ConvertError(f"--classes {args.classes!r}: a class name is empty")
            if len(classes) <= hi:
                raise ConvertError(f"--classes names {len(classes)} classes but the labels reach {hi}: "
                                   f"need at least {hi + 1} names")
        dtype = np.uint8 if images["train"].dtype == np.uint8 else np.float32
        sizes = {s: images[s].shape[0] for s in SPLITS}
        progress = Progress(sum(sizes.values()), "images")
        attrs = {"source": os.path.abspath(path), "dataset": os.path.splitext(os.path.basename(path))[0]}
        with DatasetWriter(args.out, image_shape, dtype, sizes, classes, attrs=attrs, tile=args.tile) as w:
            for s in SPLITS:
                done = 0
                for x, y in zip(images[s].blocks(), m[f"{s}_labels"].blocks()):
                    with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf is refused below
                        x = np.ascontiguousarray(to_channels(x), dtype=dtype)
                    if dtype == np.float32 and not np.isfinite(x).all():
                        bad = done + int(np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(1))[0])
                        raise ConvertError(f"{path}: {s}_images image {bad} holds NaN or inf values "
                                           f"(or values too large for float32)")
                    w.write(s, x, y.reshape(-1))
                    done += len(x)
                    progress(len(x))
    return sizes


def add_arguments(p):
    p.add_argument("npz", metavar="FILE.npz", help="MedMNIST-style npz")
    p.add_argument("--out", required=True, help="HDF5 file to write")
    p.add_argument("--classes", default=None, help="comma-separated class names (default 0..K-1)")
    p.add_argument("--3d", dest="volumes", action="store_true",
                   help="read 4-D images as volumes (n, D, H, W) even when the last axis is 3")


main = main_of("data_prep.medmnist", __doc__, add_arguments, convert)

if __name__ == "__main__":
    sys.exit(main())
