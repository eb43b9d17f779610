"""Convert a folder of image files in torchvision's ImageFolder convention into the mpidd HDF5 layout.

    python -m data_prep.image_folder ROOT --out FILE.h5
    python -m data_prep.image_folder ROOT --out FILE.h5 --size 64x64 --color gray --val 0.1 --test 0.1 --seed 0
    python -m data_prep.image_folder IMAGES --masks MASKS --mask-classes background,cell --out FILE.h5

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

Segmentation (--masks MASK_ROOT): every image file below ROOT (or ROOT/train, val, test) is a
sample, class folders or not, and no labels are written; its mask is the image at the same path
below MASK_ROOT with the same name and a .png (or another lossless image) suffix, one class index
a pixel (grey "L", palette "P" or 16-bit "I;16" PNG: the stored values, not colours). The masks
are the file's `targets` (n, H, W) uint8, resized with --size by nearest neighbour, their
classes named by --mask-classes a,b,c (default: 0..the largest value found). Refused besides: a
missing mask (named), an RGB mask, a mask whose size differs from its image's, a value outside
--mask-classes.

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


def files_below(folder: str, suffixes: tuple) -> list:
    """The sorted paths of the non-hidden files with one of `suffixes` (any case) below `folder`."""
    files = []
    for top, dirs, fnames in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files += [os.path.join(top, f) for f in fnames if not f.startswith(".") and f.lower().endswith(suffixes)]
    return sorted(files)


def class_files(folder: str, suffixes: tuple) -> dict:
    """{class name: sorted file paths} for the non-hidden subfolders of `folder`, searched
    recursively like torchvision's ImageFolder; refuse an empty class folder."""
    names = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    found = {}
    for name in names:
        files = files_below(os.path.join(folder, name), suffixes)
        if not files:
            raise ConvertError(f"class folder {os.path.join(folder, name)} holds no {'/'.join(suffixes)} file")
        found[name] = files
    return found


def labelled_samples(root: str, folders: dict, suffixes: tuple) -> tuple[list, dict]:
    """(classes, {split: [(path, label)]}) of the class folders in each split's folder."""
    per_split = {s: class_files(folder, suffixes) for s, folder in folders.items()}
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
    return classes, {s: [(path, classes.index(name)) for name, paths in found.items() for path in paths]
                     for s, found in per_split.items()}


def count(fraction: float, n: int) -> int:
    return max(1, int(round(fraction * n)))


def find_samples(root: str, suffixes: tuple, val: float, test: float, seed: int, labelled: bool = True):
    """(classes, {split: [(path, label), ...]}) from ROOT/<class>/ or ROOT/{train,val,test}/<class>/;
    splits without a folder are drawn from the training files (fractions val, test of them).
    labelled False (inputs of dense targets): every file below ROOT (or a split folder) is a
    sample, classes None and labels None."""
    require_path(root, "the data folder")
    if not os.path.isdir(root):
        raise ConvertError(f"{root} is not a folder")
    for flag, fraction in (("--val", val), ("--test", test)):
        if not 0 <= fraction < 1:
            raise ConvertError(f"{flag} {fraction}: expected a fraction in [0, 1)")
    folders = ({s: os.path.join(root, s) for s in SPLITS if os.path.isdir(os.path.join(root, s))}
               if os.path.isdir(os.path.join(root, "train")) else {"train": root})
    if labelled:
        classes, samples = labelled_samples(root, folders, suffixes)
    else:
        classes, samples = None, {s: [(path, None) for path in files_below(folder, suffixes)]
                                  for s, folder in folders.items()}
        for s, found in samples.items():
            if not found:
                raise ConvertError(f"{folders[s]} holds no {'/'.join(suffixes)} file")
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


def write_samples(out: str, samples: dict, classes: list | None, sample_shape: tuple, dtype, load, what: str,
                  attrs: dict, tile: int | None = None, masks: "Masks | None" = None) -> dict:
    """Write `load(path)` (an array of `sample_shape`) for every sample, a block at a time, with
    its label (classes None: none) and, given `masks`, its mask masks.load(path)."""
    sizes = {s: len(samples[s]) for s in SPLITS}
    dtype = np.dtype(dtype)
    block = int(max(1, min(256, BLOCK_BYTES // (np.prod(sample_shape) * dtype.itemsize))))
    progress = Progress(sum(sizes.values()), what)
    targets = (masks.shape, np.uint8) if masks is not None else None
    with DatasetWriter(out, sample_shape, dtype, sizes, classes, attrs=attrs, tile=tile, targets=targets,
                       target_classes=masks.classes if masks is not None else None) as w:
        for split in SPLITS:
            images = np.empty((min(block, sizes[split]),) + tuple(sample_shape), dtype)
            labels = np.empty(len(images), np.int64) if classes is not None else None
            mask_block = np.empty((len(images),) + masks.shape, np.uint8) if masks is not None else None
            k = 0

            def flush(k):
                w.write(split, images[:k], None if labels is None else labels[:k],
                        None if mask_block is None else mask_block[:k])
            for path, label in samples[split]:
                images[k] = load(path)
                if labels is not None:
                    labels[k] = label
                if mask_block is not None:
                    mask_block[k] = masks.load(path)
                k += 1
                progress()
                if k == len(images):
                    flush(k)
                    k = 0
            if k:
                flush(k)
    return sizes


class Masks:
    """The mask of each input file: MASKS/<the input's path below ROOT, any suffix of
    `suffixes`>, read by read(path) -> integer array, class indices; the classes are `names` or
    0..(the largest index in any mask) (every mask is read once more to find it)."""

    def __init__(self, root: str, folder: str, samples: dict, suffixes: tuple, read, shape: tuple,
                 names: str | None = None):
        require_path(folder, "the mask folder")
        self.read, self.shape, self.paths = read, tuple(shape), {}
        for path, _ in (sample for found in samples.values() for sample in found):
            stem = os.path.splitext(os.path.relpath(path, root))[0]
            stem = stem[:-4] if stem.endswith(".nii") else stem  # FILE.nii.gz
            found = [stem + s for s in suffixes] + [stem + s.upper() for s in suffixes]
            hit = next((os.path.join(folder, f) for f in found if os.path.isfile(os.path.join(folder, f))), None)
            if hit is None:
                raise ConvertError(f"no mask for {path}: expected {os.path.join(folder, stem)}{suffixes[0]} "
                                   f"(or {', '.join(suffixes[1:3])}, ...)")
            self.paths[path] = hit
        if names:
            self.classes = [c.strip() for c in names.split(",")]
            if len(self.classes) < 2 or not all(self.classes):
                raise ConvertError(f"--mask-classes {names!r}: expected 2 or more names, like background,organ")
        else:
            top = max(int(self.read(p).max()) for p in self.paths.values())
            self.classes = [str(k) for k in range(max(2, top + 1))]
        if len(self.classes) > 256:
            raise ConvertError(f"{len(self.classes)} mask classes: at most 256 fit the uint8 masks")

    def load(self, path) -> np.ndarray:
        mask = self.read(self.paths[path])
        if mask.min() < 0 or mask.max() >= len(self.classes):
            raise ConvertError(f"{self.paths[path]}: class {int(mask.max() if mask.max() >= 0 else mask.min())} "
                               f"is outside 0..{len(self.classes) - 1} (--mask-classes names "
                               f"{len(self.classes)})")
        return mask


def add_arguments(p):
    p.add_argument("root", help="folder ROOT/<class>/<images> or ROOT/{train,val,test}/<class>/<images>")
    p.add_argument("--out", required=True, help="HDF5 file to write")
    p.add_argument("--size", help="resize every image to HxW (rows x columns), bicubic")
    p.add_argument("--color", choices=("rgb", "gray"), default="rgb", help="3 channels (RGB) or 1 (grey)")
    p.add_argument("--val", type=float, default=0.1, help="fraction for the validation split when ROOT has no val/")
    p.add_argument("--test", type=float, default=0.1, help="fraction for the test split when ROOT has no test/")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the shuffles that draw missing splits and order the samples in the file")
    p.add_argument("--masks", metavar="MASK_ROOT",
                   help="segmentation: the mask of ROOT/PATH/NAME.EXT is MASK_ROOT/PATH/NAME.png (or another "
                        "image suffix), grey or palette values = class indices; ROOT then needs no class folders")
    p.add_argument("--mask-classes", metavar="NAMES", help="with --masks: the class names, comma-separated "
                   "(default 0..the largest value in any mask)")


def convert(args) -> dict:
    from PIL import Image

    size = parse_shape(args.size, 2, "--size") if args.size else None
    if args.mask_classes and not args.masks:
        raise ConvertError("--mask-classes names the classes of --masks: pass --masks MASK_ROOT too")
    classes, samples = find_samples(args.root, IMAGE_SUFFIXES, args.val, args.test, args.seed,
                                    labelled=args.masks is None)
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

    def read_mask(path):
        try:
            with Image.open(path) as im:
                if im.mode not in ("1", "L", "P", "I", "I;16"):
                    raise ConvertError(f"{path}: a {im.mode} image; a mask holds one class index a pixel "
                                       f"(a grey or palette PNG)")
                if size is not None and im.size != (w, h):
                    im = im.resize((w, h), Image.Resampling.NEAREST)  # classes are not averaged
                mask = np.asarray(im).astype(np.int64)
        except ConvertError:
            raise
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise ConvertError(f"{path}: not a readable image ({type(e).__name__}: {first_line(e)})") from None
        if mask.shape != (h, w):
            raise ConvertError(f"{path}: a mask of {mask.shape[0]}x{mask.shape[1]} for images of {h}x{w} (HxW)")
        return mask

    masks = None
    if args.masks:
        suffixes = (".png",) + tuple(x for x in IMAGE_SUFFIXES if x not in (".png", ".jpg", ".jpeg"))
        masks = Masks(args.root, args.masks, samples, suffixes, read_mask, (h, w), args.mask_classes)
        attrs["masks"] = os.path.abspath(args.masks)
    return write_samples(args.out, samples, classes, shape, np.uint8, load, "images", attrs, tile=args.tile,
                         masks=masks)


def first_line(e: BaseException) -> str:
    """An exception's message on one line (the refusal is one line)."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else ""


main = main_of("data_prep.image_folder", __doc__, add_arguments, convert)

if __name__ == "__main__":
    sys.exit(main())
