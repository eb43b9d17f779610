"""Entry point of `python -m mpidd.predict`: classify images with a finished mpidd.train run
directory, or a file written by TwoLevelClassifier.save. The command line is mpidd.cli.predict
(its names are re-exported here for code that imported them from mpidd.predict).

    mpirun -n 4 python -m mpidd.predict runs/demo --data data/fashion_mnist.h5 --out predictions.csv
    mpirun -n 2 python -m mpidd.predict runs/demo --data images/ --out p.csv      # a folder of PNG/JPEG files
    python -m mpidd.predict runs/demo --data x.npy --model average --format h5 --out p.h5
"""

import sys

from .cli.predict import (EXIT_USAGE, IMAGE_SUFFIXES, InputError, agree_or_refuse, check_dtype, check_shape,
                          get_args_parser, main, read_array, read_hdf5, read_images, read_input, refuse,
                          write_predictions)

__all__ = ["EXIT_USAGE", "IMAGE_SUFFIXES", "InputError", "agree_or_refuse", "check_dtype", "check_shape",
           "get_args_parser", "main", "read_array", "read_hdf5", "read_images", "read_input", "refuse",
           "write_predictions"]



def entry_point():
    """`mpidd-predict`, as `python -m mpidd.predict`."""
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
