"""Run mpidd.train as if one rank's CPU had no bfloat16 support (test helper).

    mpirun -n 2 python tests/helpers/no_bf16_on_rank.py RANK [mpidd.train arguments...]
"""

import sys

from mpi4py import MPI

import mpidd.engine as engine
import mpidd.train as train

if MPI.COMM_WORLD.rank == int(sys.argv[1]):
    engine._cpu_has_bf16 = lambda: False
sys.exit(train.main(sys.argv[2:]))
