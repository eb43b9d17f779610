"""Convert the extracted python version of CIFAR-10 or CIFAR-100 into the mpidd HDF5 layout.

    python -m data_prep.cifar cifar-10-batches-py --out data/cifar10.h5
    python -m data_prep.cifar cifar-100-python --out data/cifar100.h5 --labels coarse --val 5000

SOURCE is the folder of the "CIFAR-10 python version" archive (data_batch_1..5, test_batch,
batches.meta) or of the CIFAR-100 one (train, test, meta); which one is seen from its files.
Images are stored uint8 (n, 3, 32, 32); the last --val training images become the validation
split, the test batch the test split. --labels (CIFAR-100 only) picks the 100 fine or the 20
coarse classes. Batches are read one at a time (each twice: once to count, once to write).
The batch files are pickles: only numpy arrays, lists, dicts and strings are unpickled, so a
foreign or tampered file is refused instead of running code.

Refused with one line, exit code 2 and nothing written: a missing folder or one that is neither
layout, a missing batch or meta file, a truncated or non-pickle file, a pickle that refers to
anything but arrays, lists, dicts and strings, data that is not uint8 (n, 3072) (wrong rank,
width or dtype), a label count unlike the image count, labels out of range of the label names,
--val outside 1..n_train-1, --labels on CIFAR-10.
"""

from __future__ import annotations

import os
import pickle
import sys

import numpy as np

from data_prep.common import ConvertError, Progress, main_of
from mpidd.writer import DatasetWriter

PIXELS = 3 * 32 * 32
# What the real batch files (pickled by Python 2, or by Python 3 with any protocol) refer to.
SAFE_GLOBALS = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")} | {
    (m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric",
                     "numpy._core.numeric") for n in ("_reconstruct", "_frombuffer", "scalar")}


class SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: CIFAR batches hold only "
                                         f"numpy arrays, lists and dicts")
        return super().find_class(module, name)


def load_pickle(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConvertError(f"{path} is missing: SOURCE must hold every file of the extracted archive")
    try:
        with open(path, "rb") as f:
            obj = SafeUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError, AttributeError,
            ImportError, IndexError, KeyError, MemoryError) as e:
        raise ConvertError(f"{path}: not a readable CIFAR pickle ({e}); is it truncated, damaged or foreign?") from None
    if not isinstance(obj, dict):
        raise ConvertError(f"{path}: holds a {type(obj).__name__}, expected a dict like CIFAR's batches")
    return obj


def load_names(path: str, key: bytes) -> list:
    names = load_pickle(path).get(key)
    if not isinstance(names, list) or not all(isinstance(n, (bytes, str)) for n in names):
        raise ConvertError(f"{path}: no list of class names under {key!r}")
    return [n.decode() if isinstance(n, bytes) else n for n in names]


def load_batch(path: str, label_key: bytes, num_classes: int):
    """(images uint8 (n, 3, 32, 32), labels int64 (n,)) of one batch file, checked."""
    batch = load_pickle(path)
    data, labels = batch.get(b"data"), batch.get(label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != PIXELS:
        what = f"{data.dtype}{data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ConvertError(f"{path}: b'data' is {what}; expected uint8 (n, {PIXELS}) (3 planes of 32x32)")
    if labels is None:
        raise ConvertError(f"{path}: no labels under {label_key!r}")
    labels = np.asarray(labels)
    if labels.ndim != 1 or (labels.size and labels.dtype.kind not in "ui"):
        raise ConvertError(f"{path}: {label_key!r} must be a list of integers")
    if len(labels) != len(data):
        raise ConvertError(f"{path}: {len(data)} images but {len(labels)} labels under {label_key!r}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ConvertError(f"{path}: labels out of range: found {labels.min()}..{labels.max()}, "
                           f"but there are {num_classes} class names")
    # The rows are the R, G and B planes one after the other: NCHW as they stand.
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def layout(src: str, labels: str | None):
    """(train files, test files, meta file, names key, labels key, data set name) of SOURCE."""
    has = lambda name: os.path.exists(os.path.join(src, name))  # noqa: E731
    if has("batches.meta") or has("data_batch_1") or has("test_batch"):
        if labels is not None:
            raise ConvertError(f"--labels applies to CIFAR-100 only; {src} is CIFAR-10")
        return ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta",
                b"label_names", b"labels", "cifar-10")
    if has("meta") or has("train"):
        kind = labels or "fine"
        return ["train"], ["test"], "meta", f"{kind}_label_names".encode(), f"{kind}_labels".encode(), \
            f"cifar-100 {kind}"
    raise ConvertError(f"{src} holds neither CIFAR-10 (data_batch_1..5, test_batch, batches.meta) "
                       f"nor CIFAR-100 (train, test, meta) python batches")


def convert(args) -> dict:
    src = args.source
    if not os.path.isdir(src):
        raise ConvertError(f"{src} is not a folder: pass the extracted cifar-10-batches-py or cifar-100-python")
    train_files, test_files, meta, names_key, label_key, dataset = layout(src, args.labels)
    path = lambda name: os.path.join(src, name)  # noqa: E731
    classes = load_names(path(meta), names_key)
    # First pass: check every file and count its images, keeping nothing.
    counts = {name: len(load_batch(path(name), label_key, len(classes))[1]) for name in train_files + test_files}
    n_train = sum(counts[name] for name in train_files)
    if not 0 < args.val < n_train:
        raise ConvertError(f"--val {args.val} must be between 1 and {n_train - 1} "
                           f"(there are {n_train} training images)")
    cut = n_train - args.val
    sizes = {"train": cut, "val": args.val, "test": sum(counts[name] for name in test_files)}
    progress = Progress(sum(counts.values()), "images")
    attrs = {"source": os.path.abspath(src), "dataset": dataset}
    with DatasetWriter(args.out, (3, 32, 32), "uint8", sizes, classes, attrs=attrs, tile=args.tile) as w:
        seen = 0
        for name in train_files + test_files:
            x, y = load_batch(path(name), label_key, len(classes))
            if name in test_files:
                w.write("test", x, y)
            else:  # rows before the cut go to train, the rest to val
                k = min(max(cut - seen, 0), len(x))
                w.write("train", x[:k], y[:k])
                w.write("val", x[k:], y[k:])
                seen += len(x)
            progress(len(x))
            del x, y  # one batch in memory at a time
    return sizes


def add_arguments(p):
    p.add_argument("source", metavar="SOURCE", help="extracted cifar-10-batches-py or cifar-100-python folder")
    p.add_argument("--out", required=True, help="HDF5 file to write")
    p.add_argument("--val", type=int, default=5000, help="the last VAL training images become the validation split "
                                                        "(default 5000)")
    p.add_argument("--labels", choices=("fine", "coarse"), default=None,
                   help="CIFAR-100 only: 100 fine or 20 coarse classes (default fine)")


main = main_of("data_prep.cifar", __doc__, add_arguments, convert)

if __name__ == "__main__":
    sys.exit(main())
