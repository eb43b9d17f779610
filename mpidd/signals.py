"""Catch SIGTERM and SIGUSR1 from the first moments of a run. No MPI, no torch.

Importing torch takes seconds (more when ranks share cores); a stop signal that arrived
then would be lost (MPICH's own SIGUSR1 handler swallows it) or would kill the rank (the
default action of SIGTERM). mpidd.train calls catch() right after MPI_Init, before torch is
imported; parallel.StopAgreement later takes over and picks up what was received.
"""

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
received: list[int] = []


def catch(signals=STOP_SIGNALS):
    for sig in signals:
        signal.signal(sig, lambda signum, frame: received.append(signum))
