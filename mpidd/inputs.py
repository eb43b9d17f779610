"""The estimators' inputs (mpidd.api's forms a, b, c), checked and prepared on one rank: images
and labels, images named by a data file, normalization=, pixels, and the seeded validation
hold-out. No MPI: the estimators make every rank agree on the errors raised here.
"""

from __future__ import annotations

import numpy as np

from .seeds import seed_for
from .stream import file_images, is_stream


def from_torch(x):
    """Torch tensors (a GPU solver's fields) as numpy arrays: a CPU tensor shares its memory
    (DLPack, no copy), a GPU tensor is copied to the host once; a dict of them alike; anything
    else as it is. (Recognised without importing torch.)"""
    if isinstance(x, dict):
        return {k: from_torch(v) for k, v in x.items()}
    if type(x).__module__.split(".")[0] == "torch" and hasattr(x, "__dlpack__"):
        x = x.detach()
        return np.from_dlpack(x if x.device.type == "cpu" else x.cpu())
    return x


def from_file(x, y, split: str, what: str, labels: bool = True, stats=None):
    """(x, y) with images in an HDF5 file (see mpidd.api, form c) as a stream.BoxStream
    (counting its reads in `stats`) and, where y is None, the labels beside them; arrays pass
    as they are."""
    images, file_labels = file_images(x, split, stats)
    if images is None:
        return x, y
    if y is None and labels:
        if file_labels is None:
            raise ValueError(f"{what}: {images.name} has no labels beside it: pass them")
        y = file_labels
    return images, y


def normalization_pair(value) -> tuple[tuple, tuple]:
    """normalization= None, (mean, std) or {"mean": ..., "std": ...} -> (mean tuple, std tuple)."""
    if value is None:
        return (), ()
    mean, std = (value["mean"], value["std"]) if isinstance(value, dict) else value
    mean, std = tuple(float(v) for v in np.ravel(mean)), tuple(float(v) for v in np.ravel(std))
    if len(mean) != len(std) or not mean or not all(np.isfinite(mean)) or not all(s > 0 for s in std):
        raise ValueError(f"normalization needs one finite mean and one std > 0 per channel, got {value!r}")
    return mean, std


def count_samples(x) -> int:
    """The number of samples of images in any form (0 for an empty dict)."""
    return len(next(iter(x.values()))) if isinstance(x, dict) and x else (0 if isinstance(x, dict) else len(x))


def dtype_name(x) -> str:
    """"uint8" for uint8 images, else "float32" (what the models see them as)."""
    first = next(iter(x.values())) if isinstance(x, dict) else x
    return "uint8" if (first.dtype if is_stream(first) else np.asarray(first).dtype) == np.uint8 else "float32"


def pixels(a) -> np.ndarray:
    """uint8 stays uint8 (scaled batch by batch); anything else becomes float32. A stream stays
    as it is (its batches are read as they are needed)."""
    if is_stream(a):
        return a
    a = np.asarray(a)
    return np.ascontiguousarray(a) if a.dtype == np.uint8 else np.ascontiguousarray(a, dtype=np.float32)


def subimages(x, i, slices, rows):
    """Subdomain i's subimages (box `slices`) of samples rows[0]:rows[1]: form (b) holds them,
    form (c) reads them from its file batch by batch, form (a) cuts them out of whole images."""
    if isinstance(x, dict):
        return np.asarray(x[i])[rows[0]:rows[1]]
    if is_stream(x):  # its box of the file, read batch by batch
        return x.share(*rows).in_box(slices)
    return x[(slice(rows[0], rows[1]), slice(None)) + slices]


def take(x, idx):
    """Samples `idx` of images in any form."""
    if isinstance(x, dict):
        return {i: np.asarray(v)[idx] for i, v in x.items()}
    return x.take(idx) if is_stream(x) else x[idx]


def hold_out(x, y, n, fraction, seed):
    """(train part, its labels, validation part, its labels): a share `fraction` of the n
    samples drawn with seed_for(seed, "validation"); the same on every rank that calls it alike."""
    if not 0 < fraction < 1:
        raise ValueError(f"validation_fraction must be in (0, 1) when fit gets no x_val, got {fraction}")
    order = np.random.default_rng(seed_for(seed, "validation")).permutation(n)
    n_val = max(1, int(round(fraction * n)))
    val, train = np.sort(order[:n_val]), np.sort(order[n_val:])
    return take(x, train), y[train], take(x, val), y[val]


def check_images(x, y, image_shape, what, num_classes=None, owned=None, values=True):
    """(image_shape, n) of images in form (a) or (b) (or a stream, form c) and their labels y
    (None: unchecked); ValueError with one line otherwise. Form (b) needs owned(image_shape) ->
    (the Decomposition, this rank's subdomains). values=False: the NaN and inf of whole images
    (form a) are left to the caller, who checks the parts it uses."""
    if isinstance(x, dict):
        if image_shape is None:
            raise ValueError(f"{what} holds subimages by subdomain: pass image_shape=(C, H, W) of the whole images")
        image_shape = tuple(int(s) for s in image_shape)
        dec, mine = owned(image_shape)
        if sorted(x) != sorted(mine):
            raise ValueError(f"{what} holds subdomains {sorted(x)}, but this rank owns {mine} of the "
                             f"{dec.num_subdomains} (see local_boxes)")
        sizes = {len(v) for v in x.values()}
        if len(sizes) > 1:
            raise ValueError(f"{what}: the subdomains hold different numbers of samples {sorted(sizes)}")
        for i, part in x.items():
            part = np.asarray(part)
            want = (len(part), image_shape[0]) + dec.subimage_shape
            if part.shape != want:
                raise ValueError(f"{what}[{i}] has shape {part.shape}, subdomain {i}'s box needs {want}")
            check_values(part, f"{what}[{i}]")
        n = sizes.pop() if sizes else 0
    else:
        x = np.asarray(x) if not hasattr(x, "shape") else x
        if x.ndim not in (4, 5):
            raise ValueError(f"{what} has shape {tuple(x.shape)}: expected (n, C, H, W) or (n, C, D, H, W)")
        if image_shape is not None and tuple(x.shape[1:]) != tuple(image_shape):
            raise ValueError(f"{what} has images of shape {tuple(x.shape[1:])}, expected {tuple(image_shape)}")
        image_shape, n = tuple(int(s) for s in x.shape[1:]), len(x)
        if is_stream(x):  # (its values: in each rank's boxes, when they are read: see TwoLevelClassifier._shards)
            if x.dtype != np.uint8 and x.dtype.kind != "f":
                raise ValueError(f"{what} ({x.name}) has dtype {x.dtype}: expected uint8 or float images")
        elif values:
            check_values(x, what)
        else:
            check_dtype(x, what)
    if y is not None:
        if y.ndim != 1 or len(y) != n:
            raise ValueError(f"labels for {what} have shape {y.shape}, expected ({n},)")
        if num_classes is not None and not (np.issubdtype(y.dtype, np.integer) and (not len(y) or (
                y.min() >= 0 and y.max() < num_classes))):
            raise ValueError(f"labels for {what} must be integers 0..{num_classes - 1} (num_classes is {num_classes})")
    if n == 0:
        raise ValueError(f"{what} holds no images")
    return image_shape, n


def label_classes(labels, num_classes=None) -> np.ndarray:
    """classes_: 0..num_classes-1 where given, else the distinct values of the label arrays,
    sorted (scikit-learn's rule). ValueError if there are fewer than two."""
    if num_classes is not None:
        classes = np.arange(num_classes)
    else:
        try:
            classes = np.unique(np.concatenate([np.asarray(y) for y in labels]))
        except TypeError as e:  # values numpy cannot order, such as None mixed with numbers
            raise ValueError(f"labels must be values of one kind that can be sorted: {e}") from None
    if len(classes) < 2:
        raise ValueError(f"the labels hold {len(classes)} class: a classifier needs at least 2")
    return classes


def encode_labels(y, classes, strict=True) -> np.ndarray:
    """Labels -> their indices in classes_ (sorted), int64; a label not in classes_ raises
    (strict) or becomes -1."""
    y = np.asarray(y)
    if np.issubdtype(classes.dtype, np.integer) and np.array_equal(classes, np.arange(len(classes))) \
            and np.issubdtype(y.dtype, np.integer):
        index = y.astype(np.int64)
        known = (index >= 0) & (index < len(classes))
    else:
        index = np.searchsorted(classes, y).clip(0, len(classes) - 1)
        known = classes[index] == y
    if not known.all():
        if strict:
            raise ValueError(f"labels {sorted(set(np.asarray(y)[~known].tolist()))[:5]} are not among the classes "
                             f"{classes.tolist()[:10]}")
        index = np.where(known, index, -1)
    return index.astype(np.int64)


def check_dtype(a, what):
    if a.dtype != np.uint8 and not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"{what} has dtype {a.dtype}: expected uint8 or float images")


def check_values(a, what):
    """ValueError unless `a` holds uint8 or finite float values."""
    a = np.asarray(a)
    check_dtype(a, what)
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise ValueError(f"{what} holds NaN or inf values")
