"""mpidd: domain-decomposition training of image classifiers on MPI.

Pure modules (decomposition, data, models, combine, engine, report, config) import no MPI;
only mpidd.parallel touches mpi4py.
"""

__version__ = "0.1.0"
