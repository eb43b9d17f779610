"""Launch-only helpers, for the command lines (python -m mpidd.train, .predict; benchmarks/): the
abort hook, the Slurm task check, device and thread choice, start-up tuning, versions.
The library (mpidd.api, mpidd.methods) installs none of these behind the caller's back.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
import traceback

import mpi4py
import torch
from mpi4py import MPI


# Seconds a failing rank waits between printing its traceback and MPI_Abort. The launcher
# forwards each rank's stderr through a pipe; MPICH's Hydra kills the job on MPI_Abort and
# can drop what it had not forwarded yet (seen: the whole message lost in about 1 run in 15).
ABORT_GRACE_S = 1.0


def install_abort_on_error(comm, logger_name="mpidd"):
    """Make an uncaught exception on this rank end the whole job, naming the rank. The message
    goes to stderr and, once logging is set up, to the rank's own log file as well (which
    survives whatever the launcher does with stderr at the abort)."""
    rank, host = comm.Get_rank(), socket.gethostname()

    def hook(exc_type, exc, tb):
        text = "".join(traceback.format_exception(exc_type, exc, tb))
        message = f"mpidd: rank {rank} on {host} failed, aborting all ranks:\n{text}"
        sys.stderr.write(message)
        sys.stderr.flush()
        logger = logging.getLogger(logger_name)
        for handler in logger.handlers:
            handler.handle(logger.makeRecord(logger_name, logging.CRITICAL, __file__, 0, message.rstrip(), None, None))
            handler.flush()
        time.sleep(ABORT_GRACE_S)
        comm.Abort(1)

    sys.excepthook = hook


class StartupError(RuntimeError):
    """The job was started in a way mpidd cannot run in (one clear line, exit 2)."""


def check_slurm_tasks(comm, environ=os.environ) -> str | None:
    """Refuse (StartupError) to run when srun started more or fewer tasks than MPI sees.

    The classic case: `srun` with an MPI library (or mpi4py build) that does not speak this
    Slurm's PMI starts N singletons, each "rank 0 of 1", all writing the same run directory.
    The Slurm task count is SLURM_STEP_NUM_TASKS (srun's tasks in this job step), else
    SLURM_NTASKS. Ranks started by an MPI launcher (mpirun/mpiexec inside the allocation, whose
    own count is OMPI_COMM_WORLD_SIZE or PMI_SIZE) inherit the Slurm variables of the launcher's
    per-node daemons, which count nodes, not ranks: there a difference is only reported (the
    returned warning), since the launcher knows how many ranks it started.
    """
    size = comm.Get_size()
    for name in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"):
        try:
            tasks = int(environ[name])
        except (KeyError, ValueError):
            continue
        if tasks == size:
            return None
        launcher = environ.get("OMPI_COMM_WORLD_SIZE") or environ.get("PMI_SIZE")
        if launcher is not None and launcher.strip() == str(size):
            return (f"note: {name}={tasks} but mpirun started {size} ranks: running on {size} "
                    f"(launch with -n {tasks} to use every Slurm task)")
        plural = "s" if size > 1 else ""
        raise StartupError(
            f"{name}={tasks} but MPI_COMM_WORLD has {size} rank{plural}: Slurm started {tasks} tasks that "
            f"do not form one MPI job of {tasks} (the MPI under mpi4py does not speak this Slurm's PMI: "
            f"try `srun --mpi=pmix` or `--mpi=pmi2`, or `mpirun -n {tasks}` inside the allocation)"
            if size == 1 else
            f"{name}={tasks} but MPI_COMM_WORLD has {size} ranks: launch as many ranks as Slurm tasks "
            f"(srun -n {size}, or mpirun -n {tasks}), or unset {name} if the difference is intended")
    return None


def select_device(requested: str, comm, set_current: bool = True) -> tuple[torch.device, int]:
    """The torch device of this rank and its node-local rank. Call before any CUDA allocation.

    cuda: GPU (node-local rank) % (GPUs visible to this process), where the node-local rank comes
    from a shared-memory split of `comm`; this also covers `srun --gpus-per-task=1`, where each
    task sees exactly one GPU (index 0). auto: cuda when a GPU is visible, else the CPU.
    set_current: also make it torch's current CUDA device (the command line; the API leaves the
    application's current device alone).
    """
    local = node_comm(comm)
    try:
        local_rank = local.Get_rank()
    finally:
        local.Free()
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu"), local_rank
    if not torch.cuda.is_available():
        raise StartupError("--device cuda, but torch sees no GPU (torch.cuda.is_available() is False; "
                           f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): "
                           "use --device cpu or auto, or run on a GPU node")
    index = local_rank % torch.cuda.device_count()
    if set_current:
        torch.cuda.set_device(index)
    return torch.device("cuda", index), local_rank


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{device.index} ({torch.cuda.get_device_name(device)})"
    return "cpu"


def tune_malloc():
    """Keep freed memory in the heap instead of returning it to the kernel at every batch.

    glibc's default hands large blocks straight back (munmap/trim), so every mini-batch pays
    page faults for its activations again: for the small local CNNs that was about 25% of
    the CPU time, as system time. Linux/glibc only; elsewhere a no-op.
    """
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024)  # glibc's maximum on 64-bit
        libc.mallopt(M_TRIM_THRESHOLD, 1024 * 1024 * 1024)
    except (OSError, AttributeError):
        pass


def warm_up_torch():
    """Run one tiny optimizer step so that torch's lazy imports (about 1.5 CPU s, paid at the
    first optimizer.step) happen at start-up, not inside the timed training phases."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p])
    p.sum().backward()
    opt.step()


def node_comm(comm):
    """Communicator of the ranks sharing this node (shared-memory split)."""
    return comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())


def node_cores_and_ranks(comm) -> tuple[int, int]:
    """(cores available to this node's ranks, ranks on this node). The cores are the union of
    the ranks' CPU affinity sets, so this is right both when ranks share the node's cores
    (plain mpirun) and when a launcher pins each rank to its own cores."""
    local = node_comm(comm)
    try:
        return len(set().union(*local.allgather(sorted(os.sched_getaffinity(0))))), local.Get_size()
    finally:
        local.Free()


def node_leaders(comm, threads: int) -> tuple[bool, int, int]:
    """(whether this rank is its node's first, how many nodes comm spans, the torch threads this
    rank may use while the others of its node wait: at least `threads`, up to the cores it may
    run on). Collective."""
    local = node_comm(comm)
    try:
        leader = local.Get_rank() == 0
    finally:
        local.Free()
    return leader, comm.allreduce(int(leader)), max(threads, len(os.sched_getaffinity(0)))


def default_threads(comm) -> int:
    """Cores available to this node's ranks divided by the ranks on the node, at least 1."""
    cores, ranks = node_cores_and_ranks(comm)
    return max(1, cores // ranks)


def oversubscribed(comm, threads: int) -> bool:
    """Do this node's ranks x threads outnumber its cores? (Then waits should sleep, not spin.)"""
    cores, ranks = node_cores_and_ranks(comm)
    return ranks * threads > cores


def memory_per_rank(comm) -> int | None:
    """The memory available on this node (stream.memory_available) divided by its ranks;
    collective over comm."""
    from ..stream import memory_available
    local = node_comm(comm)
    try:
        ranks = local.Get_size()
    finally:
        local.Free()
    available = memory_available()
    return None if available is None else available // ranks


def library_version() -> str:
    return MPI.Get_library_version().strip().splitlines()[0].strip()


def mpi4py_version() -> str:
    return mpi4py.__version__
