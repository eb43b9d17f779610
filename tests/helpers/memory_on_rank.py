"""Run mpidd.train as if one rank had only BYTES of memory available (test helper).

    mpirun -n 2 python tests/helpers/memory_on_rank.py RANK BYTES [mpidd.train arguments...]
"""

import sys

from mpi4py import MPI

import mpidd.stream as stream
import mpidd.train as train

if MPI.COMM_WORLD.rank == int(sys.argv[1]):
    stream.memory_available = lambda: int(sys.argv[2])
sys.exit(train.main(sys.argv[3:]))
