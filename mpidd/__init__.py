"""mpidd: domain-decomposition training of image classifiers on MPI.

    import mpidd
    clf = mpidd.TwoLevelClassifier(grid="2x2", comm=comm).fit(x, y)   # see mpidd.api

Importing mpidd imports neither torch nor mpi4py (the names below load on first use), and
installs no signal handler or excepthook: those belong to the command line (python -m
mpidd.train). Pure modules (decomposition, data, models, combine, engine, report, config,
saved, methods.context) import no MPI; mpidd.dist is the only package that imports mpi4py.
"""

__version__ = "0.1.0"
__all__ = ["TwoLevelClassifier", "WidthClassifier", "ModelFileError", "__version__"]


def __getattr__(name):
    if name in ("TwoLevelClassifier", "WidthClassifier"):
        from . import api
        return getattr(api, name)
    if name == "ModelFileError":
        from .saved import ModelFileError
        return ModelFileError
    raise AttributeError(f"module 'mpidd' has no attribute {name!r}")
