"""Run mpidd.train, but send SIGUSR1 (or SIGKILL) to one rank at a chosen point (test helper).

    mpirun -n 4 python tests/helpers/signal_on_rank.py RANK PHASE POLLS [SIGNAL] [mpidd.train arguments...]

PHASE is local, coarse, coherent_random, coherent_pretrained, global or subnets (a dense task:
local, coarse, coherent_dense or global): once rank
RANK has polled for a stop POLLS times inside that phase (about once a training step or
evaluation batch), it signals itself, as Slurm or a user would (SIGNAL: USR1, TERM or KILL;
default USR1). The stop itself then runs the real path: the signal handler, the agreement
between the ranks, the checkpoints and the exit code.
"""

import os
import signal
import sys

from mpi4py import MPI

import mpidd.parallel as parallel
import mpidd.train as train
from mpidd.methods import coherent, dense, global_cnn, twolevel, width

rank, phase, polls = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
argv = sys.argv[4:]
signum = signal.SIGUSR1
if argv and argv[0] in ("USR1", "TERM", "KILL"):
    signum, argv = getattr(signal, "SIG" + argv[0]), argv[1:]
state = {"phase": None, "polls": 0}


def in_phase(name, function):
    def wrapped(*args, **kwargs):
        state["phase"] = name if name != "coherent" else args[1]  # coherent.fit_coherent(ctx, "coherent_<init>", ...)
        try:
            return function(*args, **kwargs)
        finally:
            state["phase"] = None
    return wrapped


# the methods each phase runs (their polls count; the phase's final scoring does not)
twolevel.fit_local_models = in_phase("local", twolevel.fit_local_models)
twolevel.fit_coarse = in_phase("coarse", twolevel.fit_coarse)
coherent.fit_coherent = in_phase("coherent", coherent.fit_coherent)
global_cnn.fit_global = in_phase("global", global_cnn.fit_global)
width.fit_subnets = in_phase("subnets", width.fit_subnets)
dense.fit_local_unets = in_phase("local", dense.fit_local_unets)
dense.fit_coarse_correction = in_phase("coarse", dense.fit_coarse_correction)
dense.fit_coherent_dense = in_phase("coherent_dense", dense.fit_coherent_dense)
dense.fit_domain_parallel_unet = in_phase("domain_parallel", dense.fit_domain_parallel_unet)
dense.fit_global_unet = in_phase("global", dense.fit_global_unet)
original_poll = parallel.StopAgreement.poll


def poll(self):
    if MPI.COMM_WORLD.rank == rank and state["phase"] == phase:
        state["polls"] += 1
        if state["polls"] == polls:
            os.kill(os.getpid(), signum)
    return original_poll(self)


parallel.StopAgreement.poll = poll
sys.exit(train.main(argv))
