"""The mpidd HDF5 layout, its validation and per-subdomain hyperslab reads. No MPI.

Layout (docs/data.md describes it for users):
    /train, /val, /test             groups
        images  (n, C, H, W) or (n, C, D, H, W), uint8 or float32, chunked in small tiles
        labels  (n,) int64 in [0, K)
    root attributes: classes (K names), layout ("NCHW" or "NCDHW")

Readers open the file read-only and read only the box of their subdomain, in blocks of
samples, so a rank never holds (or touches) more than its own subimages.
"""

from __future__ import annotations

import os
import sys
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
    mean: tuple | None = None  # per-channel mean and std of the training split, in the units
    std: tuple | None = None   # mpidd trains on (uint8 / 255); None: the file has none
    chunk_samples: int | None = None  # the training images' chunk extent along the samples (None: not chunked)

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
        mean, std = channel_stats(f, path, image_shape[0])
        chunks = f["train"]["images"].chunks
    return DataInfo(path=path, image_shape=tuple(int(s) for s in image_shape),
                    dtype=str(np.dtype(dtype)), num_classes=int(num_classes),
                    classes=classes, sizes=sizes, mean=mean, std=std,
                    chunk_samples=int(chunks[0]) if chunks else None)


def channel_stats(f, path: str, channels: int):
    """The file's (channel_mean, channel_std) as tuples of floats, or (None, None) if it has none."""
    if "channel_mean" not in f.attrs and "channel_std" not in f.attrs:
        return None, None
    try:
        mean = np.asarray(f.attrs["channel_mean"], dtype=np.float64).reshape(-1)
        std = np.asarray(f.attrs["channel_std"], dtype=np.float64).reshape(-1)
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{path}: attributes channel_mean and channel_std must both be lists of numbers") from None
    if len(mean) != channels or len(std) != channels:
        raise DataError(f"{path}: channel_mean and channel_std need {channels} values (one per channel), "
                        f"found {len(mean)} and {len(std)}")
    if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
        raise DataError(f"{path}: channel_mean must be finite and channel_std finite and > 0")
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


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


def load_split_labels(path: str, split: str, rows: tuple[int, int] | None = None) -> np.ndarray:
    """One split's labels, samples `rows` = (lo, hi) only if given, as int64."""
    with h5py.File(path, "r") as f:
        labels = f[split]["labels"]
        return (labels[rows[0]:rows[1]] if rows is not None else labels[...]).astype(np.int64)


def load_labels(path: str, splits=SPLITS) -> dict:
    """The labels of `splits` (default every split; small: what rank 0 needs when it holds only
    a share of the images)."""
    with h5py.File(path, "r") as f:
        return {s: f[s]["labels"][...].astype(np.int64) for s in splits}


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


class DatasetWriter:
    """Write the mpidd layout block by block, atomically, with the training split's per-channel
    mean and standard deviation (the numbers mpidd normalises with).

        with DatasetWriter(path, (C, H, W), "uint8", {"train": n1, "val": n2, "test": n3},
                           classes=names) as w:
            for x, y in blocks:            # any number of samples per call, in order
                w.write("train", x, y)

    Nothing is visible at `path` until every split is complete and the block exits cleanly; on an
    error the temporary file is removed. Images are (n, C, H, W) or (n, C, D, H, W), uint8 or
    float32 (float images must be finite); labels int in [0, len(classes)).
    """

    def __init__(self, path: str, image_shape, dtype, sizes: dict, classes, tile: int | None = None,
                 attrs=None, chunk_samples: int = 1024):
        self.path, self.image_shape, self.dtype = path, tuple(int(s) for s in image_shape), np.dtype(dtype)
        if self.dtype not in IMAGE_DTYPES:
            raise DataError(f"images must be uint8 or float32, not {self.dtype}")
        if len(self.image_shape) not in (3, 4):
            raise DataError(f"image shape {self.image_shape}: expected (C, H, W) or (C, D, H, W)")
        missing = [s for s in SPLITS if sizes.get(s, 0) < 1]
        if missing:
            raise DataError(f"split(s) {', '.join(missing)} would be empty: every one of train, val, test needs images")
        self.sizes, self.classes = {s: int(sizes[s]) for s in SPLITS}, [str(c) for c in classes]
        if len(self.classes) < 2:
            raise DataError(f"need at least 2 classes, got {len(self.classes)}")
        self.tile, self.attrs, self.chunk_samples = tile, dict(attrs or {}), int(chunk_samples)
        self.filled = dict.fromkeys(SPLITS, 0)
        self.stats = ChannelStats(self.image_shape[0])

    def __enter__(self):
        self._atomic = atomic_path(self.path)
        tmp = self._atomic.__enter__()
        try:
            self.file = h5py.File(tmp, "w")
            for split in SPLITS:
                shape = (self.sizes[split],) + self.image_shape
                g = self.file.create_group(split)
                g.create_dataset("images", shape=shape, dtype=self.dtype,
                                 chunks=default_chunks(shape, self.tile, self.chunk_samples))
                g.create_dataset("labels", shape=(self.sizes[split],), dtype=np.int64)
        except BaseException:
            self._atomic.__exit__(*sys.exc_info())
            raise
        return self

    def write(self, split: str, images, labels):
        """Append a block of samples to `split`."""
        images, labels = np.asarray(images), np.asarray(labels)
        if images.shape[1:] != self.image_shape:
            raise DataError(f"{split}: a block of images of shape {images.shape[1:]} does not match "
                            f"the data set's {self.image_shape}")
        if labels.shape != images.shape[:1]:
            raise DataError(f"{split}: {len(images)} images but labels of shape {labels.shape}")
        if labels.size and (labels.min() < 0 or labels.max() >= len(self.classes)):
            raise DataError(f"{split}: labels out of range: found {labels.min()}..{labels.max()}, "
                            f"{len(self.classes)} classes")
        if images.dtype != self.dtype:
            if self.dtype == np.uint8 and not (images.dtype.kind in "ui" and images.min(initial=0) >= 0
                                               and images.max(initial=0) <= 255):
                raise DataError(f"{split}: {images.dtype} images cannot be stored as uint8 exactly")
            images = images.astype(self.dtype)
        if self.dtype.kind == "f" and not np.isfinite(images).all():
            bad = self.filled[split] + int(np.flatnonzero(~np.isfinite(images.reshape(len(images), -1)).all(1))[0])
            raise DataError(f"{split}: image {bad} holds NaN or inf values")
        lo, hi = self.filled[split], self.filled[split] + len(images)
        if hi > self.sizes[split]:
            raise DataError(f"{split}: more than the {self.sizes[split]} images announced")
        self.file[split]["images"][lo:hi] = images
        self.file[split]["labels"][lo:hi] = labels.astype(np.int64)
        self.filled[split] = hi
        if split == "train":
            self.stats.add(images)

    def __exit__(self, *exc):
        try:
            if exc[0] is None:
                short = [f"{s} {self.filled[s]} of {self.sizes[s]}" for s in SPLITS if self.filled[s] != self.sizes[s]]
                if short:
                    raise DataError(f"{self.path}: incomplete splits ({', '.join(short)})")
                mean, std = self.stats.result()
                f = self.file
                f.attrs["classes"] = self.classes
                f.attrs["layout"] = "NCHW" if len(self.image_shape) == 3 else "NCDHW"
                f.attrs["channel_mean"], f.attrs["channel_std"] = mean, std
                f.attrs["channel_stats_units"] = STATS_UNITS[self.dtype.name]
                for k, v in self.attrs.items():
                    f.attrs[k] = v
        except BaseException:
            self.file.close()
            self._atomic.__exit__(*sys.exc_info())
            raise
        self.file.close()
        return self._atomic.__exit__(*exc)


STATS_UNITS = {"uint8": "pixel values / 255 (what mpidd trains on)", "float32": "stored values"}


class ChannelStats:
    """Per-channel mean and standard deviation over a stream of image blocks, in the units
    mpidd trains on (uint8 / 255), combined block by block (Chan et al.) in float64."""

    def __init__(self, channels: int):
        self.n, self.mean, self.m2 = 0, np.zeros(channels), np.zeros(channels)

    def add(self, images):
        x = np.asarray(images, dtype=np.float64)
        if images.dtype == np.uint8:
            x /= 255.0
        x = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)
        n = x.shape[1]
        if n == 0:
            return
        mean = x.mean(axis=1)
        m2 = ((x - mean[:, None]) ** 2).sum(axis=1)
        total = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * n / total
        self.m2 = self.m2 + m2 + delta ** 2 * self.n * n / total
        self.n = total

    def result(self):
        """(mean, std) float64 arrays; a constant channel gets std 1 (nothing to scale)."""
        std = np.sqrt(self.m2 / max(self.n, 1))
        return self.mean.copy(), np.where(std > 1e-12, std, 1.0)


def write_dataset(path: str, splits: dict, classes=None, tile: int | None = None, attrs=None,
                  block: int = 1024, chunk_samples: int = 1024) -> str:
    """Write numpy arrays as an mpidd data file, atomically (temporary file + rename).

    splits: {"train": (images, labels), "val": (...), "test": (...)}, images (n, C, H, W) or
    (n, C, D, H, W), uint8 (stored as is; mpidd divides by 255) or float (stored float32);
    labels integers 0..K-1. classes: K names (default "0".."K-1"). The training split's
    per-channel mean and standard deviation go into the file (attributes channel_mean and
    channel_std), and mpidd normalises every model's input with them. Chunks hold up to
    `chunk_samples` samples (the blocks that streaming and --shuffle blocks read). Returns `path`.
    """
    arrays = {}
    for split in SPLITS:
        if split not in splits:
            raise DataError(f"split {split!r} is missing: pass train, val and test")
        images, labels = splits[split]
        images = np.asarray(images)
        if images.ndim not in (4, 5):
            raise DataError(f"{split}: images of shape {images.shape}; expected (n, C, H, W) or (n, C, D, H, W)")
        arrays[split] = (images, np.asarray(labels))
    first = arrays["train"][0]
    dtype = np.uint8 if first.dtype == np.uint8 else np.float32
    for split, (images, labels) in arrays.items():
        if images.shape[1:] != first.shape[1:]:
            raise DataError(f"{split}: images {images.shape[1:]} but train {first.shape[1:]}: "
                            f"one image shape for all splits")
        if labels.shape != images.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"{split}: labels must be integers of shape ({len(images)},), "
                            f"not {labels.dtype}{labels.shape}")
    if classes is None:
        classes = [str(k) for k in range(int(max(y.max() for _, y in arrays.values())) + 1)]
    sizes = {s: len(arrays[s][0]) for s in SPLITS}
    with DatasetWriter(path, first.shape[1:], dtype, sizes, classes, tile=tile, attrs=attrs,
                       chunk_samples=chunk_samples) as w:
        for split, (images, labels) in arrays.items():
            for lo in range(0, len(images), block):
                w.write(split, images[lo:lo + block], labels[lo:lo + block])
    return path


def write_subset(src: str, dst: str, sizes: dict) -> str:
    """dst: the first sizes[split] samples of every split of src (fewer where src has fewer),
    its class names, and the subset's own channel statistics: small data for quick runs."""
    info = inspect(src)
    with h5py.File(src, "r") as f:
        splits = {s: (f[s]["images"][:n], f[s]["labels"][:n]) for s, n in sizes.items()}
    return write_dataset(dst, splits, classes=info.classes)
