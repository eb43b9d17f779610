"""The mpidd HDF5 layout, its validation and per-subdomain hyperslab reads. No MPI.

Layout (see shared DESIGN.md):
    /train, /val, /test             groups
        images  (n, C, H, W) or (n, C, D, H, W), uint8 or float32, chunked in small tiles
        labels  (n,) int64 in [0, K)
    root attributes: classes (K names), layout ("NCHW" or "NCDHW")

Readers open the file read-only and read only the box of their subdomain, in blocks of
samples, so a rank never holds (or touches) more than its own subimages.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field

import h5py
import numpy as np

SPLITS = ("train", "val", "test")
IMAGE_DTYPES = (np.uint8, np.float32)


class DataError(ValueError):
    """The data file is missing or does not follow the layout."""


@dataclass
class DataInfo:
    path: str
    image_shape: tuple  # (C, H, W) or (C, D, H, W)
    dtype: str
    num_classes: int
    classes: list
    sizes: dict = field(default_factory=dict)  # split -> n

    @property
    def channels(self) -> int:
        return self.image_shape[0]

    @property
    def spatial_shape(self) -> tuple:
        return tuple(self.image_shape[1:])


def inspect(path: str, check_labels: bool = True) -> DataInfo:
    """Validate the layout of `path` and return its metadata; raise DataError with one clear line."""
    if not os.path.exists(path):
        raise DataError(f"data file {path} does not exist")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise DataError(f"data file {path} is not a readable HDF5 file ({e})") from None
    with f:
        for split in SPLITS:
            if split not in f or not isinstance(f[split], h5py.Group):
                raise DataError(f"{path}: group /{split} is missing (need /train, /val, /test)")
            for name in ("images", "labels"):
                if name not in f[split]:
                    raise DataError(f"{path}: dataset /{split}/{name} is missing")
        image_shape = dtype = None
        sizes = {}
        for split in SPLITS:
            images, labels = f[split]["images"], f[split]["labels"]
            if images.ndim not in (4, 5):
                raise DataError(
                    f"{path}: /{split}/images has shape {images.shape}; expected (n, C, H, W) "
                    f"or (n, C, D, H, W)")
            if images.dtype not in IMAGE_DTYPES:
                raise DataError(f"{path}: /{split}/images has dtype {images.dtype}; "
                                f"expected uint8 or float32")
            if image_shape is None:
                image_shape, dtype = images.shape[1:], images.dtype
            elif images.shape[1:] != image_shape or images.dtype != dtype:
                raise DataError(
                    f"{path}: /{split}/images is {images.dtype}{images.shape[1:]} but /train/images "
                    f"is {dtype}{image_shape}: all splits need the same image shape and dtype")
            if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
                raise DataError(f"{path}: /{split}/labels has shape {labels.shape}; "
                                f"expected ({images.shape[0]},), one label per image")
            if not np.issubdtype(labels.dtype, np.integer):
                raise DataError(f"{path}: /{split}/labels has dtype {labels.dtype}; expected int64")
            if images.shape[0] == 0:
                raise DataError(f"{path}: /{split} holds no images")
            sizes[split] = int(images.shape[0])
        classes = [c.decode() if isinstance(c, bytes) else str(c)
                   for c in f.attrs.get("classes", [])]
        if check_labels:
            lo, hi = None, None
            for split in SPLITS:
                lab = f[split]["labels"][...]
                lo = lab.min() if lo is None else min(lo, lab.min())
                hi = lab.max() if hi is None else max(hi, lab.max())
            if lo < 0:
                raise DataError(f"{path}: labels out of range: found label {lo} < 0")
            if classes and hi >= len(classes):
                raise DataError(f"{path}: labels out of range: found label {hi} but the file "
                                f"names {len(classes)} classes (labels must be 0..{len(classes) - 1})")
            num_classes = len(classes) if classes else int(hi) + 1
        else:
            num_classes = len(classes)
        if num_classes < 2:
            raise DataError(f"{path}: need at least 2 classes, found {num_classes}")
        if not classes:
            classes = [str(k) for k in range(num_classes)]
    return DataInfo(path=path, image_shape=tuple(int(s) for s in image_shape),
                    dtype=str(np.dtype(dtype)), num_classes=int(num_classes),
                    classes=classes, sizes=sizes)


def read_box(images, box_slices, block: int = 4096, check_finite: bool = True, name: str = "images",
             rows: tuple[int, int] | None = None):
    """Read images[lo:hi, :, *box] in blocks of `block` samples; return (array, bytes_read).

    `images` is an h5py Dataset (or anything with shape, dtype and numpy-style slicing);
    `rows` = (lo, hi) the samples to read (default: all). Only the hyperslab of the box is ever
    requested, so the memory held is the box's alone.
    """
    lo, hi = rows if rows is not None else (0, images.shape[0])
    channels = images.shape[1]
    box_shape = tuple(s.stop - s.start for s in box_slices)
    out = np.empty((hi - lo, channels) + box_shape, dtype=images.dtype)
    for start in range(lo, hi, block):
        stop = min(start + block, hi)
        out[start - lo:stop - lo] = images[(slice(start, stop), slice(None)) + tuple(box_slices)]
        if check_finite and out.dtype.kind == "f":
            finite = np.isfinite(out[start - lo:stop - lo]).reshape(stop - start, -1).all(axis=1)
            if finite.all():
                continue
            bad = start + int(np.flatnonzero(~finite)[0])
            raise DataError(f"{name}: image {bad} holds NaN or inf values; clean the data file")
    return out, out.nbytes


def load_split(path: str, split: str, box_slices, block: int = 4096, rows: tuple[int, int] | None = None):
    """Read one split's images inside `box_slices` and its labels, samples `rows` = (lo, hi)
    only if given; return (x, y, bytes_read)."""
    with h5py.File(path, "r") as f:
        grp = f[split]
        x, nbytes = read_box(grp["images"], box_slices, block=block, name=f"{path}:/{split}/images", rows=rows)
        y = (grp["labels"][rows[0]:rows[1]] if rows is not None else grp["labels"][...]).astype(np.int64)
    return x, y, nbytes + y.nbytes


def load_labels(path: str) -> dict:
    """Every split's labels (small: what rank 0 needs when it holds only a share of the images)."""
    with h5py.File(path, "r") as f:
        return {s: f[s]["labels"][...].astype(np.int64) for s in SPLITS}


def fingerprint(path: str) -> dict:
    """What identifies a data file for --resume: its size, shapes, and a CRC of its labels."""
    import zlib
    info = inspect(path, check_labels=False)
    crc = 0
    for labels in load_labels(path).values():
        crc = zlib.crc32(np.ascontiguousarray(labels).tobytes(), crc)
    return {"bytes": os.path.getsize(path), "sizes": info.sizes, "image_shape": list(info.image_shape),
            "dtype": info.dtype, "labels_crc32": crc}


def default_chunks(shape, tile: int | None = None, samples: int = 1024):
    """Small tiles: (up to 1024 samples, C, tile, tile); tile 7 for 28-pixel images, else 8."""
    spatial = shape[2:]
    if tile is None:
        tile = 7 if all(s % 7 == 0 for s in spatial[-2:]) else 8
    return (min(shape[0], samples), shape[1]) + tuple(min(s, tile) for s in spatial)


def default_file_mode() -> int:
    """0o666 less the umask: what open() would give (mkstemp's temporary files are 0o600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def atomic_path(path: str):
    """Yield a temporary name beside `path`; on success it is renamed to `path` (with the
    permissions open() would give), on failure removed, so `path` is never left half written."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_dataset(path: str, splits: dict, classes=None, tile: int | None = None, attrs=None):
    """Write {split: (images, labels)} in the mpidd layout, atomically (temporary file + rename)."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        layout = None
        for split, (images, labels) in splits.items():
            images = np.asarray(images)
            labels = np.asarray(labels, dtype=np.int64)
            layout = "NCHW" if images.ndim == 4 else "NCDHW"
            g = f.create_group(split)
            g.create_dataset("images", data=images, chunks=default_chunks(images.shape, tile))
            g.create_dataset("labels", data=labels)
        if classes is not None:
            f.attrs["classes"] = [str(c) for c in classes]
        f.attrs["layout"] = layout or "NCHW"
        for k, v in (attrs or {}).items():
            f.attrs[k] = v
    return path
