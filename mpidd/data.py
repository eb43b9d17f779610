"""The mpidd HDF5 layout, its validation and per-subdomain hyperslab reads. No MPI.

Layout (docs/data.md describes it for users):
    /train, /val, /test             groups
        images  (n, C, H, W) or (n, C, D, H, W), uint8 or float32, chunked in small tiles
        labels  (n,) int64 in [0, K)  (optional where the file holds targets)
        targets (dense tasks, optional) masks (n, H, W) / (n, D, H, W) of integers in [0, M)
                for segmentation, or fields (n, C_out, H, W) / (n, C_out, D, H, W) float32
                for regression; the same spatial shape as the images
    root attributes: classes (K names), layout ("NCHW" or "NCDHW"); with masks, target_classes
    (M names)

Readers open the file read-only and read only the box of their subdomain, in blocks of
samples, so a rank never holds (or touches) more than its own subimages.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import h5py
import numpy as np

SPLITS = ("train", "val", "test")
IMAGE_DTYPES = (np.uint8, np.float32)
TASKS = ("classify", "segment", "regress")  # what a run learns: labels, masks or fields
TARGET_KINDS = {"segment": "mask", "regress": "field"}  # the targets each dense task needs


class DataError(ValueError):
    """The data file is missing or does not follow the layout."""


@dataclass
class TargetInfo:
    """A file's dense targets: "mask" (integer classes per pixel, `shape` (H, W) or (D, H, W))
    or "field" (float values per pixel, `shape` (C_out, H, W) or (C_out, D, H, W))."""
    kind: str
    shape: tuple
    dtype: str
    classes: list = field(default_factory=list)  # masks: the M class names (target_classes)

    @property
    def channels(self) -> int:
        """Output channels a model predicts: M class scores for a mask, C_out for a field."""
        return len(self.classes) if self.kind == "mask" else self.shape[0]


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
    targets: TargetInfo | None = None  # dense targets, where the file holds them

    @property
    def channels(self) -> int:
        return self.image_shape[0]

    @property
    def spatial_shape(self) -> tuple:
        return tuple(self.image_shape[1:])


def inspect(path: str, check_labels: bool = True, task: str = "classify") -> DataInfo:
    """Validate the layout of `path` for `task` (TASKS) and return its metadata; raise DataError
    with one clear line. classify needs labels; segment needs mask targets, regress field
    targets (labels are then optional)."""
    if task not in TASKS:
        raise DataError(f"unknown task {task!r} ({', '.join(TASKS)})")
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
            if "images" not in f[split]:
                raise DataError(f"{path}: dataset /{split}/images is missing")
        has_targets = all("targets" in f[s] for s in SPLITS)
        has_labels = all("labels" in f[s] for s in SPLITS)
        if task == "classify" or not has_targets:
            for split in SPLITS:
                if "labels" not in f[split]:
                    hint = (" (this file holds targets: train it with --task segment or regress)"
                            if "targets" in f[split] and task == "classify" else "")
                    raise DataError(f"{path}: dataset /{split}/labels is missing{hint}")
        image_shape = dtype = None
        sizes = {}
        for split in SPLITS:
            images = f[split]["images"]
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
            if has_labels:
                labels = f[split]["labels"]
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
        if not has_labels:
            num_classes = len(classes)
        elif check_labels:
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
        if has_labels and num_classes < 2:
            raise DataError(f"{path}: need at least 2 classes, found {num_classes}")
        if has_labels and not classes:
            classes = [str(k) for k in range(num_classes)]
        targets = target_info(f, path, tuple(image_shape), sizes) if has_targets else None
        if task != "classify":
            want = TARGET_KINDS[task]
            if targets is None:
                what = "integer masks (n, [D,] H, W)" if want == "mask" else "float fields (n, C_out, [D,] H, W)"
                raise DataError(f"{path}: --task {task} needs /train, /val and /test each with a `targets` dataset "
                                f"({what})")
            if targets.kind != want:
                raise DataError(f"{path}: its targets are {targets.kind}s {targets.dtype}{targets.shape}, but --task "
                                f"{task} needs {want}s (--task {'segment' if targets.kind == 'mask' else 'regress'} "
                                f"trains on these)")
        mean, std = channel_stats(f, path, image_shape[0])
        chunks = f["train"]["images"].chunks
    return DataInfo(path=path, image_shape=tuple(int(s) for s in image_shape),
                    dtype=str(np.dtype(dtype)), num_classes=int(num_classes),
                    classes=classes, sizes=sizes, mean=mean, std=std,
                    chunk_samples=int(chunks[0]) if chunks else None, targets=targets)


def target_kind(shape, dtype, image_shape) -> str:
    """"mask" or "field" for targets of per-sample `shape` and `dtype` beside images of
    `image_shape` (C, *spatial); a message naming the mismatch otherwise (see TargetInfo)."""
    spatial = tuple(image_shape[1:])
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer) and tuple(shape) == spatial:
        return "mask"
    if dtype.kind == "f" and len(shape) == len(spatial) + 1 and tuple(shape[1:]) == spatial:
        return "field"
    raise DataError(f"targets of shape {tuple(shape)} and dtype {dtype} do not fit images of spatial shape "
                    f"{spatial}: expected integer masks {spatial} or float fields (C_out,) + {spatial}")


def target_info(f, path: str, image_shape: tuple, sizes: dict) -> TargetInfo:
    """The targets of every split, checked against the images (shape, count, one kind)."""
    first = f["train"]["targets"]
    for split in SPLITS:
        t = f[split]["targets"]
        if t.shape[0] != sizes[split]:
            raise DataError(f"{path}: /{split}/targets holds {t.shape[0]} samples but /{split}/images {sizes[split]}")
        if t.shape[1:] != first.shape[1:] or t.dtype != first.dtype:
            raise DataError(f"{path}: /{split}/targets is {t.dtype}{t.shape[1:]} but /train/targets "
                            f"{first.dtype}{first.shape[1:]}: all splits need the same target shape and dtype")
        try:
            kind = target_kind(t.shape[1:], t.dtype, image_shape)
        except DataError as e:
            raise DataError(f"{path}: /{split}/{e}") from None
    if kind == "field" and first.dtype != np.float32:
        raise DataError(f"{path}: /train/targets are {first.dtype} fields; store them as float32")
    classes = []
    if kind == "mask":
        classes = [c.decode() if isinstance(c, bytes) else str(c) for c in f.attrs.get("target_classes", [])]
        if len(classes) < 2:
            raise DataError(f"{path}: masks need the attribute target_classes naming at least 2 classes "
                            f"(mpidd.write_dataset(..., target_classes=[...]) writes it)")
    return TargetInfo(kind=kind, shape=tuple(int(s) for s in first.shape[1:]), dtype=str(first.dtype),
                      classes=classes)


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


def load_split(path: str, split: str, box_slices, block: int = 4096, rows: tuple[int, int] | None = None,
               labels: bool = True):
    """Read one split's images inside `box_slices` and its labels (labels=False: None, for files
    of dense targets that may hold none), samples `rows` = (lo, hi) only if given; return (x, y,
    bytes_read)."""
    with h5py.File(path, "r") as f:
        grp = f[split]
        x, nbytes = read_box(grp["images"], box_slices, block=block, name=f"{path}:/{split}/images", rows=rows)
        if not labels:
            return x, None, nbytes
        y = (grp["labels"][rows[0]:rows[1]] if rows is not None else grp["labels"][...]).astype(np.int64)
    return x, y, nbytes + y.nbytes


def read_target_box(targets, box_slices, block: int = 4096, rows: tuple[int, int] | None = None,
                    name: str = "targets", num_classes: int | None = None):
    """Read targets[lo:hi, (channels,) *box] in blocks of `block` samples (masks have no channel
    axis); return (array, bytes_read). Fields must be finite, masks in [0, num_classes)."""
    lo, hi = rows if rows is not None else (0, targets.shape[0])
    box = tuple(box_slices)
    channel = () if targets.ndim == len(box) + 1 else (slice(None),)
    out = np.empty((hi - lo,) + tuple(targets.shape[1:1 + len(channel)]) + tuple(s.stop - s.start for s in box),
                   dtype=targets.dtype)
    for start in range(lo, hi, block):
        stop = min(start + block, hi)
        part = out[start - lo:stop - lo]
        part[...] = targets[(slice(start, stop),) + channel + box]
        flat = part.reshape(stop - start, -1)
        if part.dtype.kind == "f":
            bad = ~np.isfinite(flat).all(axis=1)
            if bad.any():
                raise DataError(f"{name}: target {start + int(np.flatnonzero(bad)[0])} holds NaN or inf values; "
                                f"clean the data file")
        elif num_classes is not None and flat.size:
            bad = ((flat < 0) | (flat >= num_classes)).any(axis=1)
            if bad.any():
                k = int(np.flatnonzero(bad)[0])
                value = int(flat[k][(flat[k] < 0) | (flat[k] >= num_classes)][0])
                raise DataError(f"{name}: mask {start + k} holds class {value}, outside 0..{num_classes - 1} "
                                f"(the file names {num_classes} target_classes)")
    return out, out.nbytes


def load_targets(path: str, split: str, box_slices, block: int = 4096, rows: tuple[int, int] | None = None):
    """One split's targets inside `box_slices` (no overlap: the box a subdomain predicts),
    samples `rows` = (lo, hi) only if given, checked (read_target_box); returns (t, bytes_read)."""
    with h5py.File(path, "r") as f:
        classes = f.attrs.get("target_classes")
        return read_target_box(f[split]["targets"], box_slices, block=block, rows=rows,
                               name=f"{path}:/{split}/targets",
                               num_classes=len(classes) if classes is not None else None)


def load_dense_box(path: str, split: str, box_slices, tile_slices=None, block: int = 4096, targets: bool = True):
    """A subdomain's images of one split (no labels) inside `box_slices` and, with `targets`,
    its targets inside `tile_slices` (default: the same box), checked; returns (images, targets
    or None, bytes_read)."""
    x, _, nbytes = load_split(path, split, box_slices, block=block, labels=False)
    if not targets:
        return x, None, nbytes
    t, more = load_targets(path, split, box_slices if tile_slices is None else tile_slices, block=block)
    return x, t, nbytes + more


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


def fingerprint(path: str, task: str = "classify") -> dict:
    """What identifies a data file for --resume: its size, shapes, a CRC of its labels (where
    it has them) and, for a dense task, its targets' kind and shape."""
    import zlib
    info = inspect(path, check_labels=False, task=task)
    crc = 0
    with h5py.File(path, "r") as f:
        for s in SPLITS:
            if "labels" in f[s]:
                crc = zlib.crc32(np.ascontiguousarray(f[s]["labels"][...].astype(np.int64)).tobytes(), crc)
    out = {"bytes": os.path.getsize(path), "sizes": info.sizes, "image_shape": list(info.image_shape),
           "dtype": info.dtype, "labels_crc32": crc}
    if task != "classify":
        out["targets"] = {"kind": info.targets.kind, "shape": list(info.targets.shape)}
    return out
