"""Run mpidd.train, but make one rank raise in the middle of a phase (test helper).

    mpirun -n 2 python tests/helpers/raise_on_rank.py RANK local|exchange [mpidd.train arguments...]

local: the rank fails in its local phase, and the other ranks go on to the gather;
exchange: the rank fails inside the coherent model's exchange (the scatter of the third
step's gradients), while the other ranks are in that step's collectives. In both cases they
would wait for ever if the failure were not turned into an MPI_Abort of the whole job.
"""

import sys

from mpi4py import MPI

import mpidd.parallel as parallel
import mpidd.train as train
from mpidd.methods import twolevel

failing_rank, where = int(sys.argv[1]), sys.argv[2]
original_local, original_scatter = twolevel.fit_local_models, parallel.ModelParallelExchange.scatter


def fit_local_models(*args, **kwargs):
    if MPI.COMM_WORLD.rank == failing_rank:
        raise RuntimeError("injected failure in the local phase")
    return original_local(*args, **kwargs)


def scatter(self, grad, rows, batch):
    if self.rank == failing_rank and self.calls >= 5:  # gather, scatter, gather, scatter, gather, here
        raise RuntimeError("injected failure inside the exchange")
    return original_scatter(self, grad, rows, batch)


if where == "local":
    twolevel.fit_local_models = fit_local_models
else:
    parallel.ModelParallelExchange.scatter = scatter
sys.exit(train.main(sys.argv[3:]))
