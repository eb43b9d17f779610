"""Convert a folder of NIfTI volumes (.nii, .nii.gz) into the mpidd HDF5 layout (n, 1, D, H, W).

    python -m data_prep.nifti ROOT --out FILE.h5 --shape 64x64x64
    python -m data_prep.nifti ROOT --out FILE.h5 --shape 96x96x96 --window -1000,400 --dtype uint8
    python -m data_prep.nifti IMAGES --masks LABELS --mask-classes background,liver,lesion --out F.h5 --shape 64x64x64

ROOT/<class>/**/*.nii[.gz] or ROOT/{train,val,test}/<class>/..., with the classes, the split
folders and the seeded --val/--test split exactly as in data_prep.image_folder.

Each volume is reoriented to the closest canonical (RAS+) orientation (nibabel's
as_closest_canonical) and read as float32; a 4-D or 5-D volume whose extra axes have length 1 is
squeezed, any other volume that is not 3-D is refused. Axis order: the canonical array's axes
(x, y, z) are stored unchanged as (D, H, W), i.e. D runs left->right, H posterior->anterior,
W inferior->superior (nibabel's, MONAI's and TorchIO's order). --window LO,HI (e.g. -1000,400
for CT in Hounsfield units) clips to [LO, HI] and maps linearly to [0, 1]; without it the values are stored as they
are. Each volume is then resampled to --shape DxHxW by trilinear interpolation (torch,
align_corners=False; the same shape leaves it unchanged). --dtype uint8 (needs --window) stores
round(255 * windowed value). One volume at a time is read.

Segmentation (--masks LABEL_ROOT): every volume below ROOT (or its split folders) is a sample,
class folders or not, without labels; its label volume is LABEL_ROOT/<the same path>.nii or
.nii.gz, integer class indices, reoriented alike and resampled to --shape by nearest neighbour:
the file's `targets` (n, D, H, W) uint8, classes named by --mask-classes (default 0..the largest
label found). Refused besides: a missing or fractional label volume (named), a label outside
--mask-classes.

Refused with one line, exit code 2 and nothing written: a missing ROOT or one without class
folders, fewer than 2 classes, an empty class folder, an unreadable or truncated file (named), a
volume that is not 3-D, NaN or inf in a volume (named), a bad --shape or --window, --dtype uint8
without --window.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from data_prep.common import ConvertError, main_of, parse_shape
from data_prep.image_folder import Masks, find_samples, first_line, write_samples

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def parse_window(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        lo = hi = float("nan")
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise ConvertError(f"--window {text!r}: expected LO,HI with LO < HI, like --window -1000,400")
    return lo, hi


def read_volume(path: str) -> np.ndarray:
    """The volume in canonical RAS+ orientation, 3-D float32, finite."""
    import nibabel as nib

    try:
        img = nib.load(path)
        shape = img.shape
        while len(shape) > 3 and shape[-1] == 1:  # (x, y, z, 1): one volume stored 4-D
            shape = shape[:-1]
        if len(shape) != 3:
            raise ConvertError(f"{path}: a volume of shape {img.shape}; expected 3 dimensions (x, y, z)")
        canonical = nib.as_closest_canonical(img)
        data = canonical.get_fdata(dtype=np.float32).reshape(canonical.shape[:3])
    except ConvertError:
        raise
    except Exception as e:  # nibabel reports a damaged file with many exception types
        raise ConvertError(f"{path}: not a readable NIfTI file ({type(e).__name__}: {first_line(e)})") from None
    if not np.isfinite(data).all():
        raise ConvertError(f"{path}: the volume holds NaN or inf values")
    return data


def add_arguments(p):
    p.add_argument("root", help="folder ROOT/<class>/<volumes> or ROOT/{train,val,test}/<class>/<volumes>")
    p.add_argument("--out", required=True, help="HDF5 file to write")
    p.add_argument("--shape", required=True, help="DxHxW: every volume is resampled to this shape")
    p.add_argument("--window", help="LO,HI: clip to [LO, HI] and map to [0, 1], e.g. -1000,400 for CT")
    p.add_argument("--dtype", choices=("float32", "uint8"), default="float32",
                   help="float32, or uint8 = round(255 * windowed value) (needs --window)")
    p.add_argument("--val", type=float, default=0.1, help="fraction for the validation split when ROOT has no val/")
    p.add_argument("--test", type=float, default=0.1, help="fraction for the test split when ROOT has no test/")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the shuffles that draw missing splits and order the samples in the file")
    p.add_argument("--masks", metavar="LABEL_ROOT",
                   help="segmentation: the label volume of ROOT/PATH/NAME.nii[.gz] is LABEL_ROOT/PATH/NAME.nii[.gz], "
                        "integer class indices; ROOT then needs no class folders")
    p.add_argument("--mask-classes", metavar="NAMES", help="with --masks: the class names, comma-separated "
                   "(default 0..the largest label in any volume)")


def convert(args) -> dict:
    shape = parse_shape(args.shape, 3, "--shape")
    window = parse_window(args.window) if args.window is not None else None
    if args.dtype == "uint8" and window is None:
        raise ConvertError("--dtype uint8 needs --window LO,HI (it stores round(255 * windowed value))")
    if args.mask_classes and not args.masks:
        raise ConvertError("--mask-classes names the classes of --masks: pass --masks LABEL_ROOT too")
    classes, samples = find_samples(args.root, NIFTI_SUFFIXES, args.val, args.test, args.seed,
                                    labelled=args.masks is None)
    import torch
    import torch.nn.functional as F

    def read_labels(path):
        x = read_volume(path)
        if not np.array_equal(x, np.rint(x)):
            raise ConvertError(f"{path}: a label volume holds integer class indices, this one fractions")
        return F.interpolate(torch.from_numpy(np.ascontiguousarray(x))[None, None], size=shape,
                             mode="nearest")[0, 0].numpy().astype(np.int64)  # classes are not averaged

    def load(path):
        x = read_volume(path)
        if window is not None:
            lo, hi = window
            x = (np.clip(x, lo, hi) - np.float32(lo)) / np.float32(hi - lo)
        x = F.interpolate(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None, None], size=shape,
                          mode="trilinear", align_corners=False)[0].numpy()
        if window is not None:  # interpolation is convex, but rounding may step just outside [0, 1]
            x = np.clip(x, 0.0, 1.0)
        return np.rint(255 * x) if args.dtype == "uint8" else x

    attrs = {"source": os.path.abspath(args.root), "orientation": "RAS+ canonical, (D, H, W) = (x, y, z)",
             "window": list(window) if window else "none", "resample": "trilinear, align_corners=False"}
    masks = None
    if args.masks:
        masks = Masks(args.root, args.masks, samples, NIFTI_SUFFIXES, read_labels, shape, args.mask_classes)
        attrs["masks"] = os.path.abspath(args.masks)
    # uint8 blocks are filled from float arrays of integers 0..255: the assignment casts them exactly
    return write_samples(args.out, samples, classes, (1,) + shape, args.dtype, load, "volumes", attrs,
                         tile=args.tile, masks=masks)


_main = main_of("data_prep.nifti", __doc__, add_arguments, convert)


def main(argv=None):
    """As main_of's, but `--window -1000,400` works as written (argparse alone would take the
    negative bound for a flag and want `--window=-1000,400`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--window" in argv[:-1]:
        i = argv.index("--window")
        argv[i:i + 2] = [f"--window={argv[i + 1]}"]
    return _main(argv)

if __name__ == "__main__":
    sys.exit(main())
