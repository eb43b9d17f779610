"""`mpidd-convert NAME [OPTIONS]` (or `python -m data_prep NAME ...`): run converter NAME, as
`python -m data_prep.NAME ...` does; `mpidd-convert` alone lists them.

    mpidd-convert fashion_mnist --src /usr/share/datasets/fashion-mnist --out data/fashion_mnist.h5
    mpidd-convert image_folder --help
"""

import importlib
import sys

# name: what it converts (the first line of its module's docstring says more)
CONVERTERS = {
    "fashion_mnist": "the IDX files of Fashion-MNIST or MNIST",
    "digits": "scikit-learn's bundled digits (real, 8x8, no download)",
    "lfw_subset": "scikit-image's lfw_subset (real faces and non-faces)",
    "photos": "an RGB set from the photographs scikit-image and scikit-learn ship",
    "image_folder": "a folder of image files, one sub-folder per class (torchvision's ImageFolder)",
    "cifar": "the extracted python version of CIFAR-10 or CIFAR-100",
    "medmnist": "a MedMNIST-style .npz",
    "nifti": "a folder of NIfTI volumes (.nii, .nii.gz), one sub-folder per class",
    "ct_phantom": "synthetic chest-CT-like volumes at CT size",
}


def usage() -> str:
    width = max(map(len, CONVERTERS))
    return ("usage: mpidd-convert NAME [OPTIONS]   (mpidd-convert NAME --help: its options)\n\n"
            "Converters into the mpidd HDF5 layout:\n"
            + "\n".join(f"  {name:<{width}}  {what}" for name, what in CONVERTERS.items()))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in CONVERTERS:
        print(f"mpidd-convert: error: no converter {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    return importlib.import_module(f"data_prep.{name}").main(rest)


def entry_point():
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
