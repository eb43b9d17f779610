"""mpidd: domain-decomposition training of image classifiers on MPI.

    import mpidd
    clf = mpidd.TwoLevelClassifier(grid="2x2", comm=comm).fit(x, y)   # see mpidd.api
    net = mpidd.TwoLevelUNet(task="regress", grid="2x2", comm=comm).fit(x, fields)   # mpidd.dense_estimator
    mpidd.write_dataset("my.h5", {"train": (x, y), "val": ..., "test": ...})  # a data file for mpidd.train
    info = mpidd.read_info("my.h5")     # shapes, classes, per-channel mean and std

Importing mpidd imports neither torch nor mpi4py (the names below load on first use), and
installs no signal handler or excepthook: those belong to the command line (python -m
mpidd.train). Pure modules (decomposition, data, stream, models, combine, seeds, feed, engine,
coherent_model, recomposition, saved, inputs, traffic, rundir, results, report, options,
sklearn_conventions, methods.context) import no MPI; mpidd.parallel is the only package that imports mpi4py.
"""

__version__ = "0.1.0"
__all__ = ["TwoLevelClassifier", "WidthClassifier", "TwoLevelUNet", "ModelFileError", "write_dataset", "read_info",
           "__version__"]


def __getattr__(name):
    if name in ("TwoLevelClassifier", "WidthClassifier"):
        from . import api
        return getattr(api, name)
    if name == "TwoLevelUNet":
        from .dense_estimator import TwoLevelUNet
        return TwoLevelUNet
    if name in ("write_dataset", "read_info"):
        from . import data, writer
        return {"write_dataset": writer.write_dataset, "read_info": data.inspect}[name]
    if name == "ModelFileError":
        from .saved import ModelFileError
        return ModelFileError
    raise AttributeError(f"module 'mpidd' has no attribute {name!r}")
