"""Writing the mpidd HDF5 layout (see mpidd.data for what it holds): DatasetWriter block by block,
write_dataset from numpy arrays, write_subset of a file, each atomically (a temporary file
renamed at the end: atomic_path); and the per-channel statistics every writer stores. No MPI.
"""

from __future__ import annotations

import os
import sys
import tempfile
from contextlib import contextmanager

import h5py
import numpy as np

from .data import IMAGE_DTYPES, SPLITS, DataError, inspect, target_kind


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
    Dense targets: `targets` = (per-sample shape, dtype) of integer masks (H, W) / (D, H, W) in
    [0, len(target_classes)) or float32 fields (C_out, H, W) / (C_out, D, H, W), written with
    write(split, x, y, t); with targets, classes may be None (no labels: write(split, x, None, t)).
    """

    def __init__(self, path: str, image_shape, dtype, sizes: dict, classes, tile: int | None = None,
                 attrs=None, chunk_samples: int = 1024, targets=None, target_classes=None):
        self.path, self.image_shape, self.dtype = path, tuple(int(s) for s in image_shape), np.dtype(dtype)
        if self.dtype not in IMAGE_DTYPES:
            raise DataError(f"images must be uint8 or float32, not {self.dtype}")
        if len(self.image_shape) not in (3, 4):
            raise DataError(f"image shape {self.image_shape}: expected (C, H, W) or (C, D, H, W)")
        missing = [s for s in SPLITS if sizes.get(s, 0) < 1]
        if missing:
            raise DataError(f"split(s) {', '.join(missing)} would be empty: every one of train, val, test needs images")
        self.sizes = {s: int(sizes[s]) for s in SPLITS}
        self.classes = None if classes is None else [str(c) for c in classes]
        if targets is None and self.classes is None:
            raise DataError("classes are needed: a file without targets holds labels")
        if self.classes is not None and len(self.classes) < 2:
            raise DataError(f"need at least 2 classes, got {len(self.classes)}")
        self.targets = None
        if targets is not None:
            shape, tdtype = tuple(int(v) for v in targets[0]), np.dtype(targets[1])
            kind = target_kind(shape, tdtype, self.image_shape)
            tdtype = np.dtype(np.float32) if kind == "field" else np.dtype(np.int64 if tdtype.itemsize > 1 else tdtype)
            self.targets = (shape, tdtype, kind)
            self.target_classes = [str(c) for c in (target_classes or [])]
            if kind == "mask" and len(self.target_classes) < 2:
                raise DataError("masks need target_classes: the names of at least 2 classes")
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
                if self.classes is not None:
                    g.create_dataset("labels", shape=(self.sizes[split],), dtype=np.int64)
                if self.targets is not None:
                    tshape, tdtype, kind = self.targets
                    full = (self.sizes[split],) + tshape
                    chunks = default_chunks(full if kind == "field" else full[:1] + (1,) + full[1:],
                                            self.tile, self.chunk_samples)
                    g.create_dataset("targets", shape=full, dtype=tdtype,
                                     chunks=chunks if kind == "field" else chunks[:1] + chunks[2:])
        except BaseException:
            self._atomic.__exit__(*sys.exc_info())
            raise
        return self

    def write(self, split: str, images, labels, targets=None):
        """Append a block of samples to `split` (targets: where the file holds them)."""
        images = np.asarray(images)
        if images.shape[1:] != self.image_shape:
            raise DataError(f"{split}: a block of images of shape {images.shape[1:]} does not match "
                            f"the data set's {self.image_shape}")
        if (labels is None) != (self.classes is None):
            raise DataError(f"{split}: {'labels are needed' if labels is None else 'this file holds no labels'}")
        if labels is not None:
            labels = np.asarray(labels)
            if labels.shape != images.shape[:1]:
                raise DataError(f"{split}: {len(images)} images but labels of shape {labels.shape}")
            if labels.size and (labels.min() < 0 or labels.max() >= len(self.classes)):
                raise DataError(f"{split}: labels out of range: found {labels.min()}..{labels.max()}, "
                                f"{len(self.classes)} classes")
        if (targets is None) != (self.targets is None):
            raise DataError(f"{split}: {'targets are needed' if targets is None else 'this file holds no targets'}")
        if targets is not None:
            targets = self._checked_targets(split, np.asarray(targets), len(images))
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
        if labels is not None:
            self.file[split]["labels"][lo:hi] = labels.astype(np.int64)
        if targets is not None:
            self.file[split]["targets"][lo:hi] = targets
        self.filled[split] = hi
        if split == "train":
            self.stats.add(images)

    def _checked_targets(self, split, targets, n):
        shape, dtype, kind = self.targets
        if targets.shape != (n,) + shape:
            raise DataError(f"{split}: {n} images but targets of shape {targets.shape}; expected {(n,) + shape}")
        flat = targets.reshape(n, -1)
        if kind == "field":
            bad = ~np.isfinite(flat.astype(np.float32)).all(axis=1)
            if bad.any():
                raise DataError(f"{split}: target {self.filled[split] + int(np.flatnonzero(bad)[0])} holds NaN or "
                                f"inf values")
            return targets.astype(np.float32)
        if not np.issubdtype(targets.dtype, np.integer):
            raise DataError(f"{split}: masks must be integers, not {targets.dtype}")
        if flat.size and (flat.min() < 0 or flat.max() >= len(self.target_classes)):
            raise DataError(f"{split}: masks out of range: found {flat.min()}..{flat.max()}, "
                            f"{len(self.target_classes)} target_classes")
        return targets.astype(dtype)

    def __exit__(self, *exc):
        try:
            if exc[0] is None:
                short = [f"{s} {self.filled[s]} of {self.sizes[s]}" for s in SPLITS if self.filled[s] != self.sizes[s]]
                if short:
                    raise DataError(f"{self.path}: incomplete splits ({', '.join(short)})")
                mean, std = self.stats.result()
                f = self.file
                if self.classes is not None:
                    f.attrs["classes"] = self.classes
                if self.targets is not None and self.targets[2] == "mask":
                    f.attrs["target_classes"] = self.target_classes
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
                  block: int = 1024, chunk_samples: int = 1024, target_classes=None) -> str:
    """Write numpy arrays as an mpidd data file, atomically (temporary file + rename).

    splits: {"train": (images, labels), "val": (...), "test": (...)}, images (n, C, H, W) or
    (n, C, D, H, W), uint8 (stored as is; mpidd divides by 255) or float (stored float32);
    labels integers 0..K-1. classes: K names (default "0".."K-1"). The training split's
    per-channel mean and standard deviation go into the file (attributes channel_mean and
    channel_std), and mpidd normalises every model's input with them. Chunks hold up to
    `chunk_samples` samples (the blocks that streaming and --shuffle blocks read). Returns `path`.

    Dense tasks: (images, labels, targets) per split, targets integer masks (n, [D,] H, W) in
    0..M-1 with `target_classes` (M names, default "0".."M-1") for --task segment, or float
    fields (n, C_out, [D,] H, W) for --task regress; labels may then be None (no labels).
    """
    arrays = {}
    for split in SPLITS:
        if split not in splits:
            raise DataError(f"split {split!r} is missing: pass train, val and test")
        images, labels, *targets = splits[split]
        images = np.asarray(images)
        if images.ndim not in (4, 5):
            raise DataError(f"{split}: images of shape {images.shape}; expected (n, C, H, W) or (n, C, D, H, W)")
        arrays[split] = (images, None if labels is None else np.asarray(labels),
                         np.asarray(targets[0]) if targets and targets[0] is not None else None)
    first, _, first_targets = arrays["train"]
    dtype = np.uint8 if first.dtype == np.uint8 else np.float32
    for split, (images, labels, targets) in arrays.items():
        if images.shape[1:] != first.shape[1:]:
            raise DataError(f"{split}: images {images.shape[1:]} but train {first.shape[1:]}: "
                            f"one image shape for all splits")
        if labels is None and targets is None:
            raise DataError(f"{split}: labels are needed (they may be None only beside targets)")
        if labels is not None and (labels.shape != images.shape[:1] or not np.issubdtype(labels.dtype, np.integer)):
            raise DataError(f"{split}: labels must be integers of shape ({len(images)},), "
                            f"not {labels.dtype}{labels.shape}")
        if (targets is None) != (first_targets is None) or (labels is None) != (arrays["train"][1] is None):
            raise DataError(f"{split}: every split needs the same arrays as train (labels, targets)")
    has_labels = arrays["train"][1] is not None
    if classes is None and has_labels:
        classes = [str(k) for k in range(int(max(y.max() for _, y, _ in arrays.values())) + 1)]
    spec = None
    if first_targets is not None:
        spec = (first_targets.shape[1:], first_targets.dtype)
        if np.issubdtype(first_targets.dtype, np.integer) and target_classes is None:
            target_classes = [str(k) for k in range(int(max(t.max() for _, _, t in arrays.values())) + 1)]
    sizes = {s: len(arrays[s][0]) for s in SPLITS}
    with DatasetWriter(path, first.shape[1:], dtype, sizes, classes if has_labels else None, tile=tile, attrs=attrs,
                       chunk_samples=chunk_samples, targets=spec, target_classes=target_classes) as w:
        for split, (images, labels, targets) in arrays.items():
            for lo in range(0, len(images), block):
                w.write(split, images[lo:lo + block], None if labels is None else labels[lo:lo + block],
                        None if targets is None else targets[lo:lo + block])
    return path


def write_subset(src: str, dst: str, sizes: dict) -> str:
    """dst: the first sizes[split] samples of every split of src (fewer where src has fewer),
    its class names, and the subset's own channel statistics: small data for quick runs."""
    info = inspect(src)
    with h5py.File(src, "r") as f:
        splits = {s: (f[s]["images"][:n], f[s]["labels"][:n]) for s, n in sizes.items()}
    return write_dataset(dst, splits, classes=info.classes)
