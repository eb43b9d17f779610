"""Convert a folder of image files in torchvision's ImageFolder convention into the mpidd HDF5 layout.

    python -m data_prep.image_folder ROOT --out FILE.h5
    python -m data_prep.image_folder ROOT --out FILE.h5 --size 64x64 --color gray --val 0.1 --test 0.1 --seed 0

ROOT/<class>/**/*.png (also jpg, jpeg, bmp, tif, tiff, webp, ppm, pgm; any case): the classes
are the sorted names of ROOT's folders, a class folder is searched recursively, and hidden
files and folders and other files are ignored. If ROOT holds a folder train/, then ROOT/train,
ROOT/val and ROOT/test are the splits, each in that convention (classes: the sorted union; each
must occur in train/); val/ or test/ may be missing. Missing splits are drawn from the training
files by one seeded shuffle (--seed): --val and --test are fractions of their count, at least
one file each. Without split folders, one such shuffle splits all files. Every split is written
in a seeded random order (--seed), never class by class.

Images are converted to RGB (3 channels) or grey (L, 1 channel) with Pillow (an alpha channel
is dropped) and stored uint8 (n, C, H, W). With --size HxW every image is resized to H rows by
W columns with Pillow's BICUBIC filter (no crop: the aspect ratio is not kept); without it all
images must have one size. One image at a time is read, so the images need not fit in memory.

Refused with one line, exit code 2 and nothing written: a missing ROOT or one without class
folders, fewer than 2 classes, an empty class folder, an unreadable or truncated image (named),
images of mixed sizes without --size (two of them named), a bad --size, a class in val/ or test/
that train/ lacks, a --val/--test fraction outside [0, 1) or too few files to draw them from.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from data_prep.common import ConvertError, Progress, main_of, parse_shape, require_path, seeded_split
from mpidd.data import SPLITS
from mpidd.writer import DatasetWriter

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
BLOCK_BYTES = 64 << 20  # buffer up to this many bytes (and 256 samples) per write


def class_files(folder: str, suffixes: tuple) -> dict:
    """{class name: sorted file paths} for the non-hidden subfolders of `folder`, searched
    recursively like torchvision's ImageFolder; refuse an empty class folder."""
    names = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    found = {}
    for name in names:
        files = []
        for top, dirs, fnames in os.walk(os.path.join(folder, name), followlinks=True):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            files += [os.path.join(top, f) for f in fnames
                      if not f.startswith(".") and f.lower().endswith(suffixes)]
        if not files:
            raise ConvertError(f"class folder {os.path.join(folder, name)} holds no {'/'.join(suffixes)} file")
        found[name] = sorted(files)
    return found


def count(fraction: float, n: int) -> int:
    return max(1, int(round(fraction * n)))


def find_samples(root: str, suffixes: tuple, val: float, test: float, seed: int):
    """(classes, {split: [(path, label), ...]}) from ROOT/<class>/ or ROOT/{train,val,test}/<class>/;
    splits without a folder are drawn from the training files (fractions val, test of them)."""
    require_path(root, "the data folder")
    if not os.path.isdir(root):
        raise ConvertError(f"{root} is not a folder")
    for flag, fraction in (("--val", val), ("--test", test)):
        if not 0 <= fraction < 1:
            raise ConvertError(f"{flag} {fraction}: expected a fraction in [0, 1)")
    if os.path.isdir(os.path.join(root, "train")):
        per_split = {s: class_files(os.path.join(root, s), suffixes) for s in SPLITS
                     if os.path.isdir(os.path.join(root, s))}
    else:
        per_split = {"train": class_files(root, suffixes)}
    classes = sorted(set().union(*per_split.values()))
    if not classes:
        raise ConvertError(f"{root} has no class folders (expected ROOT/<class>/<files>)")
    for split, found in per_split.items():
        for name in found:
            if name not in per_split["train"]:
                raise ConvertError(f"class {name!r} is in {split}/ but not in train/: "
                                   f"every class needs training files")
    if len(classes) < 2:
        raise ConvertError(f"{root}: need at least 2 class folders, found {len(classes)} ({classes[0]})")
    samples = {s: [(path, classes.index(name)) for name, paths in found.items() for path in paths]
               for s, found in per_split.items()}
    train, n = samples["train"], len(samples["train"])
    missing = [s for s in ("val", "test") if s not in samples]
    drawn = {s: count(val if s == "val" else test, n) for s in missing}
    if sum(drawn.values()) >= n:
        raise ConvertError(f"{n} training file(s) are too few to draw " + " and ".join(
            f"{s} ({'--' + s} {val if s == 'val' else test}: {k} file(s))" for s, k in drawn.items())
            + " and keep at least one for training")
    if len(missing) == 2:
        parts = seeded_split(n, drawn["val"], drawn["test"], seed)
    elif missing:  # one split drawn from train the same way (one seeded shuffle, its first k files)
        k = drawn[missing[0]]
        order = np.random.default_rng(seed).permutation(n)
        parts = {missing[0]: np.sort(order[:k]), "train": np.sort(order[k:])}
    else:
        parts = {}
    for split, index in parts.items():
        samples[split] = [train[i] for i in index]
    # Written in a seeded random order, not class by class: a file in class order would defeat
    # `mpidd.train --shuffle blocks`, which mixes only a few chunk rows of samples at a time.
    rng = np.random.default_rng([seed, 1])
    return classes, {s: [found[i] for i in rng.permutation(len(found))] for s, found in samples.items()}


def write_samples(out: str, samples: dict, classes: list, sample_shape: tuple, dtype, load, what: str,
                  attrs: dict, tile: int | None = None) -> dict:
    """Write `load(path)` (an array of `sample_shape`) for every sample, a block at a time."""
    sizes = {s: len(samples[s]) for s in SPLITS}
    dtype = np.dtype(dtype)
    block = int(max(1, min(256, BLOCK_BYTES // (np.prod(sample_shape) * dtype.itemsize))))
    progress = Progress(sum(sizes.values()), what)
    with DatasetWriter(out, sample_shape, dtype, sizes, classes, attrs=attrs, tile=tile) as w:
        for split in SPLITS:
            images = np.empty((min(block, sizes[split]),) + tuple(sample_shape), dtype)
            labels = np.empty(len(images), np.int64)
            k = 0
            for path, label in samples[split]:
                images[k], labels[k] = load(path), label
                k += 1
                progress()
                if k == len(images):
                    w.write(split, images, labels)
                    k = 0
            if k:
                w.write(split, images[:k], labels[:k])
    return sizes


def add_arguments(p):
    p.add_argument("root", help="folder ROOT/<class>/<images> or ROOT/{train,val,test}/<class>/<images>")
    p.add_argument("--out", required=True, help="HDF5 file to write")
    p.add_argument("--size", help="resize every image to HxW (rows x columns), bicubic")
    p.add_argument("--color", choices=("rgb", "gray"), default="rgb", help="3 channels (RGB) or 1 (grey)")
    p.add_argument("--val", type=float, default=0.1, help="fraction for the validation split when ROOT has no val/")
    p.add_argument("--test", type=float, default=0.1, help="fraction for the test split when ROOT has no test/")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the shuffles that draw missing splits and order the samples in the file")


def convert(args) -> dict:
    from PIL import Image

    size = parse_shape(args.size, 2, "--size") if args.size else None
    classes, samples = find_samples(args.root, IMAGE_SUFFIXES, args.val, args.test, args.seed)
    mode = "RGB" if args.color == "rgb" else "L"
    first = {}  # the first image read, to name beside one of another size

    def load(path):
        try:
            with Image.open(path) as im:
                if size is None:
                    first.setdefault("size", (path, im.size))
                    if im.size != first["size"][1]:
                        (w0, h0), (w, h) = first["size"][1], im.size
                        raise ConvertError(f"images differ in size: {first['size'][0]} is {h0}x{w0} but {path} "
                                           f"is {h}x{w} (HxW); pass --size HxW to resize them all")
                im = im.convert(mode)
                if size is not None and im.size != (size[1], size[0]):
                    im = im.resize((size[1], size[0]), Image.Resampling.BICUBIC)
                x = np.asarray(im, dtype=np.uint8)
        except ConvertError:
            raise
        except (OSError, ValueError, Image.DecompressionBombError) as e:  # UnidentifiedImageError is an OSError
            raise ConvertError(f"{path}: not a readable image ({type(e).__name__}: {first_line(e)})") from None
        return x[None] if x.ndim == 2 else x.transpose(2, 0, 1)

    if size is None:  # the first training image sets the size all others must have
        load(samples["train"][0][0])
        w, h = first["size"][1]
    else:
        h, w = size
    shape = (3 if mode == "RGB" else 1, h, w)
    attrs = {"source": os.path.abspath(args.root), "color": args.color,
             "resize": f"{h}x{w} bicubic" if size else "none"}
    return write_samples(args.out, samples, classes, shape, np.uint8, load, "images", attrs, tile=args.tile)


def first_line(e: BaseException) -> str:
    """An exception's message on one line (the refusal is one line)."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else ""


main = main_of("data_prep.image_folder", __doc__, add_arguments, convert)

if __name__ == "__main__":
    sys.exit(main())
