"""CNN-DNN training by domain decomposition (Klawonn, Lanser & Weber 2024, arXiv 2408.14442).

    mpirun -n 4 python -m mpidd.train                     # demo: the paper's comparison, 2x2, Fashion-MNIST
    mpirun -n 4 mpidd-train ...                           # the same, as the installed command
    mpirun -n 4 python -m mpidd.train --data FILE --grid 2x2 --overlap 0 --mode twolevel --out runs/NAME
    mpirun -n 8 python -m mpidd.train --grid 2x2 --mode twolevel ...  # P = 2N: 2 ranks per subdomain, data parallel
    mpirun -n 4 python -m mpidd.train --mode coherent --init random --out runs/c
    mpirun -n 4 python -m mpidd.train --mode coherent --from runs/NAME --out runs/tl   # transfer learning
    mpirun -n 2 python -m mpidd.train --grid 2x2 ...      # P < N: rank r trains subdomains r, r+P, ...
    mpirun -n 4 python -m mpidd.train --resume runs/NAME  # continue a stopped or killed run
    python -m mpidd.train --mode global --out runs/g      # the global CNN baseline alone (P ranks: data parallel)
    mpirun -n 4 python -m mpidd.train --mode width --subnets 4 --out runs/w   # width decomposition (Gu et al.)

Phases: load (each rank reads only its subimage boxes), local (train the local CNNs, then
their class probabilities for train/val/test; no communication), gather (MPI_Gatherv to
rank 0 as (n, N*K) in subdomain order), coarse (rank 0: coarse DNN, average, vote),
coherent_random / coherent_pretrained (the whole CNN-DNN as one model parallel model: local
outputs gathered to rank 0, their gradients scattered back, every step), global (rank 0:
the global CNN on whole images, for comparison). --mode width (Gu, Zhang, Liu & Cai 2022):
global_load (every rank reads the whole images), subnets (rank r trains its thin sub-networks
of the global CNN; no communication), width_gather (their weights to rank 0), recompose,
recomposed_train and global_train (rank 0). Rank 0 prints; every rank logs to
RUN/logs/rank<r>.log.

Stops: SIGTERM or SIGUSR1 to any rank (Slurm's warning before the walltime, a preemption)
makes every rank stop at its next step boundary, save, and exit with code 75
(parallel.EXIT_PREEMPTED); `--resume RUN` continues every phase where it stopped. Every
checkpoint is written each epoch, atomically, so a killed run resumes from its last epochs.

This module only launches: MPI, the early signal catch, then mpidd.cli.train.main, the run
itself (its parts: mpidd.cli's arguments, plan, run and phases).
"""

import sys

# The launch's one direct use of mpi4py (the rest goes through mpidd.parallel): MPI_Init first, before
# signals.catch(), because MPICH installs a SIGUSR1 handler of its own.
from mpi4py import MPI

from . import signals


def main(argv=None) -> int:
    """mpidd.train on MPI_COMM_WORLD; the exit code: 0 finished, 2 refused, 75 stopped and saved."""
    from .cli.train import main as train  # imports torch; the run itself is mpidd.cli.train
    return train(argv, comm=MPI.COMM_WORLD)


def entry_point():
    """`mpidd-train` and `python -m mpidd.train`: catch stop signals before the seconds of
    importing torch (see mpidd.signals), then run."""
    signals.catch()
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
