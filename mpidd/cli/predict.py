"""Classify images with a trained model: a finished mpidd.train run directory, or a file
written by TwoLevelClassifier.save.

    mpirun -n 4 python -m mpidd.predict runs/demo --data data/fashion_mnist.h5 --out predictions.csv
    mpirun -n 2 python -m mpidd.predict runs/demo --data images/ --out p.csv      # a folder of PNG/JPEG files
    python -m mpidd.predict runs/demo --data x.npy --model average --format h5 --out p.h5

P ranks: any count training allows, 1..N subdomains (rank r classifies subdomains r, r+P, ...)
or a multiple of N. From an HDF5 file each rank reads only its subdomains' boxes of --split,
batch by batch (streamed: the file may be larger than memory).
Rank 0 writes, per image, the predicted class, its name and the K probabilities (CSV, or HDF5
with --format h5), atomically, and prints the accuracy when the input has labels. Bad input
(a model of another image size or channel count, a missing or corrupt model, an image of the
wrong size, an empty folder) is refused with one line and exit code 2, and nothing is written.

A dense run (--task regress or segment) or a TwoLevelUNet.save file: the whole fields or masks
of --data (an HDF5 file or a .npy/.npz array), written by rank 0 to the HDF5 file --out
(/predictions), with the scores where the split holds targets (predict_fields).
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys

import numpy as np

from .. import data, parallel, saved, stream
from ..dense_estimator import FORMAT as DENSE_FORMAT, MODEL_FILE, MODELS as DENSE_MODELS
from ..engine import PRECISIONS
from ..rundir import atomic_write
from .arguments import ArgumentParser, add_version, prog

EXIT_USAGE = 2
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif")


class InputError(ValueError):
    """Input that cannot be classified by this model (one line, exit 2)."""


def get_args_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog=prog("mpidd.predict"), description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_version(p)
    p.add_argument("model", metavar="RUN_DIR", help="a finished mpidd.train run directory (its model.pt), or a "
                                                    "model file written by TwoLevelClassifier.save")
    p.add_argument("--data", required=True,
                   help="an mpidd HDF5 file (see --split), a .npy/.npz array (n, C, H, W) (.npz: key images or x, "
                        "labels or y if present), an image file, or a folder of PNG/JPEG images")
    p.add_argument("--split", default="test", choices=data.SPLITS, help="split of an HDF5 file")
    p.add_argument("--out", default="predictions.csv", help="output file (written by rank 0, atomically)")
    p.add_argument("--format", choices=("csv", "h5"), default=None,
                   help="csv or h5 (default: from the --out suffix, else csv)")
    p.add_argument("--model", dest="kind", default=None,
                   choices=saved.MODELS + DENSE_MODELS,
                   help="which model of the run classifies: the coarse DNN (default), the average or vote of the "
                        "local CNNs, the coherent CNN-DNN (transfer learning if the run has it), the global CNN, "
                        "the recomposed network of --mode width; a dense run's (--task regress or segment): "
                        "local-only, two-level, coherent-random, coherent-pretrained (default: the last the "
                        "run trained)")
    p.add_argument("--batch-size", type=int, default=256, help="inference batch size")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per rank (default: cores on the node / ranks on the node)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: this rank's GPU when torch sees one, else the CPU")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="of the CNNs' forward passes (default: the one the model was trained in where this "
                        "device supports it, else 32)")
    return p


# --- reading the input ---------------------------------------------------------------------------

def read_input(path, split, image_shape, input_dtype, boxes, whole=False):
    """(x, labels or None, names or None): x is {subdomain: (n, C, *box)} for this rank's
    `boxes`, or the whole images (n, C, ...) when `whole`, or, from an HDF5 file, a stream of
    the whole images. InputError if they do not fit."""
    if not os.path.exists(path):
        raise InputError(f"--data {path} does not exist")
    if os.path.isdir(path) or path.lower().endswith(IMAGE_SUFFIXES):
        x, names = read_images(path, image_shape)
        labels = None
    elif path.endswith((".npy", ".npz")):
        x, labels = read_array(path, image_shape)
        names = None
    else:
        return read_hdf5(path, split, image_shape, input_dtype) + (None,)
    check_dtype(x.dtype, input_dtype, path)
    if whole:
        return np.asarray(x), labels, names
    return {i: np.asarray(x[(slice(None), slice(None)) + box]) for i, box in boxes.items()}, labels, names


def check_shape(found, image_shape, what):
    if tuple(found) != tuple(image_shape):
        raise InputError(f"{what} has images of shape {'x'.join(map(str, found))} (C x spatial), but the model takes "
                         f"{'x'.join(map(str, image_shape))}: use data of the size and channels it was trained on")


def check_dtype(dtype, input_dtype, what):
    found = "uint8" if dtype == np.uint8 else "float32" if np.issubdtype(dtype, np.floating) else str(dtype)
    if found != input_dtype:
        raise InputError(f"{what} holds {found} images, but the model was trained on {input_dtype} images "
                         f"({saved.INPUT_SCALING}): convert them first")


def read_hdf5(path, split, image_shape, input_dtype):
    """(a stream of --split's whole images, its labels): the classifier reads each rank's boxes
    of it batch by batch (TwoLevelClassifier's input form c)."""
    try:
        info = data.inspect(path)
    except data.DataError as e:
        raise InputError(str(e)) from None
    check_shape(info.image_shape, image_shape, path)
    check_dtype(np.dtype(info.dtype), input_dtype, path)
    return stream.file_images(path, split)


def read_array(path, image_shape):
    if path.endswith(".npy"):
        try:
            x = np.load(path, mmap_mode="r")  # slicing a box reads (about) only its pages
        except ValueError as e:
            raise InputError(f"cannot read {path}: {e}") from None
        labels = None
    else:
        with np.load(path) as z:
            key = next((k for k in ("images", "x") if k in z.files), None)
            if key is None:
                raise InputError(f"{path} has arrays {', '.join(z.files)}: name the images 'images' or 'x'")
            x = z[key]
            lk = next((k for k in ("labels", "y") if k in z.files), None)
            labels = z[lk].astype(np.int64) if lk else None
    if x.ndim == len(image_shape) and image_shape[0] == 1:  # (n, H, W): one channel
        x = x[:, None]
    if x.ndim != len(image_shape) + 1:
        raise InputError(f"{path} holds an array of shape {x.shape}: expected (n, C, H, W) or (n, C, D, H, W)")
    check_shape(x.shape[1:], image_shape, path)
    if labels is not None and labels.shape != (len(x),):
        raise InputError(f"{path}: labels of shape {labels.shape} for {len(x)} images")
    return x, labels


def read_images(path, image_shape):
    """A folder of images (sorted by name) or one image file, as (n, C, H, W) uint8."""
    from PIL import Image, UnidentifiedImageError
    if len(image_shape) != 3:
        raise InputError(f"the model takes volumes {'x'.join(map(str, image_shape))}: image files hold 2D images")
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.lower().endswith(IMAGE_SUFFIXES))
        if not files:
            raise InputError(f"{path} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        files = [os.path.join(path, f) for f in files]
    else:
        files = [path]
    C, H, W = image_shape
    if C not in (1, 3):
        raise InputError(f"the model takes {C}-channel images: image files give 1 (gray) or 3 (RGB)")
    out = np.empty((len(files), C, H, W), dtype=np.uint8)
    for k, f in enumerate(files):
        try:
            with Image.open(f) as im:
                im = im.convert("L" if C == 1 else "RGB")
                if im.size != (W, H):
                    raise InputError(f"{f} is {im.size[1]}x{im.size[0]} pixels, the model takes {H}x{W}: resize it")
                a = np.asarray(im)
        except (UnidentifiedImageError, OSError) as e:
            raise InputError(f"cannot read image {f}: {e}") from None
        out[k] = a[None] if C == 1 else a.transpose(2, 0, 1)
    return out, [os.path.basename(f) for f in files]


# --- writing the output --------------------------------------------------------------------------

def write_predictions(path, fmt, probs, predicted, classes, labels=None, names=None, model="cnn-dnn"):
    """Rank 0: one row per image, written atomically."""
    if fmt == "h5":
        import h5py

        def write_h5(f):
            with h5py.File(f, "w") as h:
                h["predicted"] = predicted.astype(np.int64)
                h["probabilities"] = probs.astype(np.float32)
                if labels is not None:
                    h["labels"] = labels
                if names is not None:
                    h["files"] = np.array(names, dtype=object)
                h.attrs["classes"] = list(classes)
                h.attrs["model"] = model
        atomic_write(path, write_h5)
        return
    text = io.StringIO()
    w = csv.writer(text)
    w.writerow(["index", *(["file"] if names is not None else []), "predicted", "class_name",
                *[f"p_{c}" for c in classes], *(["label", "correct"] if labels is not None else [])])
    for k in range(len(predicted)):
        w.writerow([k, *([names[k]] if names is not None else []), int(predicted[k]), classes[predicted[k]],
                    *[f"{p:.6g}" for p in probs[k]],
                    *([int(labels[k]), int(labels[k] == predicted[k])] if labels is not None else [])])
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))


# --- the job ---------------------------------------------------------------------------------------

def refuse(comm, failed):
    """Every rank: exit 2; rank 0 prints the one line."""
    if comm.Get_rank() == 0:
        rank, message = failed
        where = f" (rank {rank})" if comm.Get_size() > 1 and not message.startswith("rank") else ""
        print(f"mpidd.predict: error: {message}{where}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USAGE)


def agree_or_refuse(comm, step):
    """Run step() on every rank; if any rank raises a refusal, every rank exits 2."""
    result, error = None, None
    try:
        result = step()
    except (InputError, saved.ModelFileError, ValueError) as e:
        error = str(e)
    failed = parallel.agree(comm, error)
    if failed:
        refuse(comm, failed)
    return result


def is_dense_model(path) -> bool:
    """Is `path` (a run directory or a model file) a dense model (TwoLevelUNet's format)?"""
    import torch
    file = os.path.join(path, MODEL_FILE) if os.path.isdir(path) else path
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not there, or another format: the classifier's load says why
        return False
    return isinstance(state, dict) and state.get("format") == DENSE_FORMAT


def has_targets(path, split) -> bool:
    import h5py
    with h5py.File(path, "r") as f:
        return split in f and "targets" in f[split]


def predict_fields(comm, args, fmt) -> int:
    """A dense model (--task regress or segment, or TwoLevelUNet.save): the fields or masks of
    every image of --data, whole, written by rank 0 to an HDF5 file (/predictions), with the
    scores printed where the file holds targets."""
    import h5py

    from ..dense_estimator import TwoLevelUNet
    if fmt != "h5":
        if args.out != "predictions.csv":
            refuse(comm, (0, f"a dense model predicts fields or masks, written to HDF5: use --out FILE.h5, not "
                             f"{args.out}"))
        args.out = "predictions.h5"
    net = agree_or_refuse(comm, lambda: TwoLevelUNet.load(args.model, comm=comm))
    net.eval_batch_size = args.batch_size
    fitted = net.available_models()
    model = args.kind or fitted[-1]
    if model not in fitted:
        refuse(comm, (0, f"{args.model} has no {model!r} model (it has: {', '.join(fitted)})"))
    if args.data.endswith((".npy", ".npz")):
        x = agree_or_refuse(comm, lambda: np.asarray(read_array(args.data, net.image_shape_)[0]))
    elif os.path.isfile(args.data) and h5py.is_hdf5(args.data):
        x = f"{args.data}:{args.split}"
    else:
        refuse(comm, (0, f"--data {args.data}: a dense model predicts from an mpidd HDF5 file or a .npy/.npz array"))
    pred = agree_or_refuse(comm, lambda: net.predict(x, model))
    if comm.Get_rank() == 0:  # (the scores are rank 0's to print: only it reads the targets)
        scores = net.score_predictions(pred, net.read_targets(x)) \
            if isinstance(x, str) and has_targets(args.data, args.split) else None
        def write_h5(f):
            with h5py.File(f, "w") as h:
                h["predictions"] = pred.astype(np.float32 if net.task == "regress" else np.uint8)
                h.attrs["model"], h.attrs["task"] = model, net.task
        atomic_write(args.out, write_h5)
        line = f"mpidd.predict: {len(pred)} {'fields' if net.task == 'regress' else 'masks'}, model {model}, " \
               f"{comm.Get_size()} ranks"
        if scores is not None:
            keys = ("mae", "rel_l2", "ssim") if net.task == "regress" else ("miou", "pixel_acc")
            line += "; " + ", ".join(f"{k} {scores[k]:.5f}" for k in keys)
        print(line, flush=True)
        print(f"predictions: {args.out}", flush=True)
    return 0


def main(argv=None):
    comm = parallel.world()
    parallel.install_abort_on_error(comm)
    rank = comm.Get_rank()

    def parse():
        try:
            return "run", get_args_parser().parse_args(argv)
        except SystemExit as e:  # --help, or argparse's usage error (printed)
            return "exit", e.code or 0
    kind, args = parallel.root_decides(comm, parse)
    if kind == "exit":
        sys.exit(args)
    fmt = args.format or ("h5" if args.out.endswith((".h5", ".hdf5")) else "csv")
    import torch
    torch.set_num_threads(args.threads or parallel.default_threads(comm))
    if parallel.root_decides(comm, lambda: is_dense_model(args.model)):
        return predict_fields(comm, args, fmt)
    args.kind = args.kind or "cnn-dnn"
    from ..api import TwoLevelClassifier

    def load():
        device = None if args.device == "auto" else args.device
        if device == "cuda" and not torch.cuda.is_available():
            raise InputError("--device cuda, but torch sees no GPU: use --device cpu or auto")
        clf = TwoLevelClassifier.load(args.model, comm=comm, device=device, precision=args.precision)
        clf.eval_batch_size = args.batch_size
        if args.kind not in clf.available_models():
            raise InputError(f"{args.model} has no {args.kind!r} model (it has: {', '.join(clf.available_models())})")
        return clf
    clf = agree_or_refuse(comm, load)
    whole = args.kind in ("global", "recomposed")
    boxes = {} if whole else clf.local_boxes(clf.image_shape_)
    x, labels, names = agree_or_refuse(comm, lambda: read_input(args.data, args.split, clf.image_shape_,
                                                                clf.input_dtype_, boxes, whole))
    probs, predicted = clf.predict_proba_and_classes(x, args.kind, image_shape=clf.image_shape_)
    if rank == 0:
        write_predictions(args.out, fmt, probs, predicted, clf.class_names_, labels, names, args.kind)
        line = f"mpidd.predict: {len(predicted)} images, model {args.kind}, {comm.Get_size()} ranks"
        if labels is not None:
            line += f"; accuracy {100 * float((predicted == labels).mean()):.2f}% ({int((predicted == labels).sum())}" \
                    f"/{len(labels)})"
        print(line, flush=True)
        print(f"predictions: {args.out}", flush=True)
    return 0
