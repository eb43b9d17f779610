"""Run mpidd.train, but make one rank raise in the middle of its local phase (test helper).

    mpirun -n 2 python tests/raise_on_rank.py RANK  [mpidd.train arguments...]

The other ranks go on to the gather, where they would wait for ever if the failure were not
turned into an MPI_Abort of the whole job.
"""

import sys

from mpi4py import MPI

import mpidd.train as train

failing_rank = int(sys.argv[1])
original = train.train_local_models


def train_local_models(*args, **kwargs):
    if MPI.COMM_WORLD.rank == failing_rank:
        raise RuntimeError("injected failure in the local phase")
    return original(*args, **kwargs)


train.train_local_models = train_local_models
sys.exit(train.main(sys.argv[2:]))
