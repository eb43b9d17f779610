"""Everything that touches MPI: start-up (failure handling, threads, devices, the Slurm task
check), agreed stops on SIGTERM/SIGUSR1, the gather of local probabilities, the model-parallel
exchange of the coherent CNN-DNN and the data-parallel groups of P > N runs.

Run under `mpirun -n P python -m mpidd.train ...`. Invariants the rest of mpidd relies on:
- an uncaught exception on any rank aborts MPI_COMM_WORLD (no rank is left waiting in a
  collective), after printing a message that names the rank;
- every collective here is entered by all ranks of the communicator, in the same order.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
import traceback

import numpy as np
import torch
from mpi4py import MPI

from . import signals as stop_signals


# Seconds a failing rank waits between printing its traceback and MPI_Abort. The launcher
# forwards each rank's stderr through a pipe; MPICH's Hydra kills the job on MPI_Abort and
# can drop what it had not forwarded yet (seen: the whole message lost in about 1 run in 15).
ABORT_GRACE_S = 1.0


def install_abort_on_error(comm=MPI.COMM_WORLD, logger_name="mpidd"):
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


def check_slurm_tasks(comm=MPI.COMM_WORLD, environ=os.environ) -> str | None:
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


def select_device(requested: str, comm=MPI.COMM_WORLD, set_current: bool = True) -> tuple[torch.device, int]:
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


def node_comm(comm=MPI.COMM_WORLD):
    """Communicator of the ranks sharing this node (shared-memory split)."""
    return comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())


def node_cores_and_ranks(comm=MPI.COMM_WORLD) -> tuple[int, int]:
    """(cores available to this node's ranks, ranks on this node). The cores are the union of
    the ranks' CPU affinity sets, so this is right both when ranks share the node's cores
    (plain mpirun) and when a launcher pins each rank to its own cores."""
    local = node_comm(comm)
    try:
        return len(set().union(*local.allgather(sorted(os.sched_getaffinity(0))))), local.Get_size()
    finally:
        local.Free()


def default_threads(comm=MPI.COMM_WORLD) -> int:
    """Cores available to this node's ranks divided by the ranks on the node, at least 1."""
    cores, ranks = node_cores_and_ranks(comm)
    return max(1, cores // ranks)


def oversubscribed(comm, threads: int) -> bool:
    """Do this node's ranks x threads outnumber its cores? (Then waits should sleep, not spin.)"""
    cores, ranks = node_cores_and_ranks(comm)
    return ranks * threads > cores


def sleepy_wait(request, interval: float | None):
    """Wait for a non-blocking MPI request, sleeping `interval` seconds between tests: busy-
    polling MPI waits would steal the cores of ranks that are still computing when ranks
    outnumber cores. interval None: MPI's own (busy, lowest-latency) Wait."""
    if interval is None:
        request.Wait()
        return
    while not request.Test():
        time.sleep(interval)


def sleepy_barrier(comm=MPI.COMM_WORLD, interval: float = 0.01):
    """A barrier that sleeps while it waits (see sleepy_wait)."""
    sleepy_wait(comm.Ibarrier(), interval)


# Exit code of a run stopped on SIGTERM or SIGUSR1 after saving its state: resume it with
# `--resume RUN_DIR` (EX_TEMPFAIL of sysexits.h, "try again later"; batch scripts requeue on it).
EXIT_PREEMPTED = 75
_TAG_REQUEST, _TAG_STOP = 7101, 7102


class StopAgreement:
    """SIGTERM or SIGUSR1 to any rank: every rank stops at its next step boundary and saves.

    The handler only sets a flag. poll(), called at every step boundary and evaluation batch,
    turns it into a decision that reaches every rank, on a communicator of its own:
    - a rank that sees its own signal stops and tells the root (one message); the root, on its
      own signal or such a message, tells every rank (one message each), so a signal sent to a
      single process (or a launcher that signals only some) still stops the whole job;
    - sync() is every phase boundary: a non-blocking MAX-allreduce of "I am stopping". A rank
      that stops in the middle of a phase saves, then enters that same allreduce (sync(True))
      in place of the boundary it did not reach, so ranks already waiting there learn of the
      stop from its result, and nobody is left in a collective the others never enter.
    Invariant: every rank calls sync() at the same phase boundaries in the same order; a
    stopping rank calls it once more, with stopping=True, and then no collective but barrier().
    Where ranks train one model together (coherent, data parallel) they agree step by step
    with any(), a blocking allreduce on their own communicator.
    """

    def __init__(self, comm=MPI.COMM_WORLD, root=0, signals=stop_signals.STOP_SIGNALS, install=True):
        self.comm = comm.Dup()  # control messages never match the training's own collectives
        self.rank, self.size, self.root = self.comm.Get_rank(), self.comm.Get_size(), root
        # set by the handler (the only thing it does); or a signal caught before this existed
        self.signal = stop_signals.received[0] if install and stop_signals.received else None
        self.requested = False  # this rank knows that the job stops
        self.reason = None
        self._told_root = self._told_all = False
        self._sends = []
        if install:
            for sig in signals:
                signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.signal = signum

    def poll(self) -> bool:
        """Has a stop been requested (here, or anywhere, as far as messages have arrived)?"""
        if self.signal is not None and not self.requested:
            self.requested, self.reason = True, signal.Signals(self.signal).name
        if self.rank == self.root:
            if not self.requested and self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=_TAG_REQUEST):
                status = MPI.Status()
                name = self.comm.recv(source=MPI.ANY_SOURCE, tag=_TAG_REQUEST, status=status)
                self.requested, self.reason = True, f"{name} on rank {status.Get_source()}"
            if self.requested and not self._told_all:
                self._told_all = True
                self._sends += [self.comm.isend(self.reason, dest=r, tag=_TAG_STOP)
                                for r in range(self.size) if r != self.root]
        else:
            if self.requested and not self._told_root:
                self._told_root = True
                self._sends.append(self.comm.isend(self.reason, dest=self.root, tag=_TAG_REQUEST))
            if not self.requested and self.comm.Iprobe(source=self.root, tag=_TAG_STOP):
                self.requested, self.reason = True, self.comm.recv(source=self.root, tag=_TAG_STOP)
                self._told_root = True  # the root knows: it told us
        return self.requested

    def sync(self, stopping: bool = False, interval: float = 0.01) -> bool:
        """A phase boundary (collective). Returns True when the job stops here: some rank is
        stopping (or learnt of a stop before it arrived). Waits sleep, polling for signals."""
        mine = np.array([1 if stopping or self.poll() else 0], dtype=np.int32)
        agreed = np.zeros(1, dtype=np.int32)
        request = self.comm.Iallreduce(mine, agreed, op=MPI.MAX)
        while not request.Test():
            self.poll()  # the root relays signals that reach waiting ranks
            time.sleep(interval)
        if agreed[0] and not self.requested:  # the root, too, has learnt it from this allreduce
            self.requested, self.reason, self._told_root = True, "a stop on another rank", True
        return bool(agreed[0])

    def any(self, comm, interval: float | None = None) -> bool:
        """Collective over `comm` (ranks that step together): does any of them stop now?
        Waits as sleepy_wait(interval) does (ranks that share cores must not spin here)."""
        mine = np.array([1 if self.poll() else 0], dtype=np.int32)
        agreed = np.zeros(1, dtype=np.int32)
        sleepy_wait(comm.Iallreduce(mine, agreed, op=MPI.MAX), interval)
        return bool(agreed[0])

    def barrier(self):
        """After a stop: every rank has saved; then collect what is left of the messages."""
        self.comm.Barrier()
        MPI.Request.Waitall(self._sends)
        while self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG):
            self.comm.recv(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG)


def root_decides(comm, decide, root=0):
    """Run decide() on `root` only; every rank returns its result (root validates, all obey)."""
    return comm.bcast(decide() if comm.Get_rank() == root else None, root=root)


def gather_to_root(comm, obj, root=0):
    """Every rank's `obj`, as a list in rank order on `root`; None elsewhere."""
    return comm.gather(obj, root=root)


def agree(comm, error: str | None):
    """All ranks learn whether any rank hit `error`; returns (rank, message) of the first, or None."""
    for rank, message in enumerate(comm.allgather(error)):
        if message is not None:
            return rank, message
    return None


def gather_probabilities(comm, local: dict, num_subdomains: int, n: int, num_classes: int, root: int = 0,
                         starts: dict | None = None):
    """MPI_Gatherv of each rank's {subdomain: (rows, K) float32 probabilities} to `root`.

    A rank's block for subdomain i holds samples starts[i] .. starts[i] + rows (default: all n
    samples from 0; data parallel, several ranks hold parts of one subdomain). Returns, on
    root, the (n, N*K) array whose columns [i*K:(i+1)*K] are subdomain i's probabilities
    (subdomain order, whatever rank computed them); None elsewhere.
    """
    mine = sorted(local)
    blocks = [(i, (starts or {}).get(i, 0), len(local[i])) for i in mine]
    send = np.ascontiguousarray(
        np.concatenate([local[i].reshape(-1) for i in mine]) if mine else np.empty(0), dtype=np.float32)
    owners = comm.gather(blocks, root=root)
    if comm.Get_rank() != root:
        comm.Gatherv(send, None, root=root)
        return None
    counts = [sum(rows for _, _, rows in o) * num_classes for o in owners]
    recv = np.empty(sum(counts), dtype=np.float32)
    comm.Gatherv(send, (recv, counts), root=root)
    out = np.full((n, num_subdomains, num_classes), np.nan, dtype=np.float32)
    offset = 0
    for i, start, rows in (b for o in owners for b in o):
        out[start:start + rows, i] = recv[offset:offset + rows * num_classes].reshape(rows, num_classes)
        offset += rows * num_classes
    if np.isnan(out).any():  # every sample of every subdomain must have come from some rank
        raise RuntimeError("gather_probabilities: some samples of some subdomains came from no rank")
    return out.reshape(n, num_subdomains * num_classes)


class ModelParallelExchange:
    """The coherent CNN-DNN's only communication, as an autograd layer (see mpidd.coherent).

    forward:  each rank's (B, m_r*K) local outputs, its m_r subdomains in ascending order,
              are gathered (MPI_Igatherv) to `root` as (B, N*K) in subdomain order. Other
              ranks get an empty (B, 0) tensor that carries the autograd graph.
    backward: root cuts dL/d(B, N*K) into the ranks' columns and scatters them back
              (MPI_Iscatterv); each rank continues back-propagation through its local CNNs.
              Ranks other than root start it with backward(out, zeros_like(out)).
    Invariant: every rank calls forward and backward the same number of times, in the same
    order, with the same B (the same sample indices). What crosses the wire is B*N*K float32
    values each way per step. `seconds` counts the wall time in the exchange, waits for
    slower ranks included; `cpu_seconds` the CPU time it used; `bytes` this rank's part.
    `poll_interval`: seconds to sleep between tests of a pending exchange (for ranks that
    outnumber cores), or None for MPI's busy Wait (a core per rank: lowest latency).
    """

    def __init__(self, comm, mine, num_subdomains: int, num_classes: int, root: int = 0,
                 poll_interval: float | None = 1e-4):
        self.comm, self.root, self.K, self.N = comm, root, num_classes, num_subdomains
        self.mine = sorted(mine)
        self.owners = comm.allgather(self.mine)  # rank r's subdomains, ascending
        self.rank = comm.Get_rank()
        self.is_root = self.rank == root
        self.poll_interval = poll_interval
        self.seconds, self.cpu_seconds, self.bytes, self.calls = 0.0, 0.0, 0, 0

    def __call__(self, local):
        return _Exchange.apply(local, self)

    def _counts(self, batch):
        return [batch * len(o) * self.K for o in self.owners]

    def gather(self, local: np.ndarray) -> np.ndarray | None:
        batch = local.shape[0]
        if local.shape[1] != len(self.mine) * self.K:
            raise ValueError(f"exchange: rank {self.rank} owns subdomains {self.mine}, so it must send "
                             f"{len(self.mine)} x {self.K} outputs per sample, not {local.shape[1]}")
        start = time.perf_counter(), time.process_time()
        if self.is_root:
            counts = self._counts(batch)
            recv = np.empty(sum(counts), dtype=np.float32)
            sleepy_wait(self.comm.Igatherv(local, (recv, counts), root=self.root), self.poll_interval)
            out = np.empty((batch, self.N, self.K), dtype=np.float32)
            for owned, block in zip(self.owners, np.split(recv, np.cumsum(counts)[:-1])):
                out[:, owned, :] = block.reshape(batch, len(owned), self.K)
            result = out.reshape(batch, self.N * self.K)
        else:
            sleepy_wait(self.comm.Igatherv(local, None, root=self.root), self.poll_interval)
            result = None
        self._count(start, local.nbytes)
        return result

    def scatter(self, grad: np.ndarray | None, batch: int) -> np.ndarray:
        start = time.perf_counter(), time.process_time()
        recv = np.empty(batch * len(self.mine) * self.K, dtype=np.float32)
        if self.is_root:
            g = grad.reshape(batch, self.N, self.K)
            send = np.concatenate([g[:, owned, :].ravel() for owned in self.owners])
            request = self.comm.Iscatterv((send, self._counts(batch)), recv, root=self.root)
        else:
            request = self.comm.Iscatterv(None, recv, root=self.root)
        sleepy_wait(request, self.poll_interval)
        self._count(start, recv.nbytes)
        return recv.reshape(batch, len(self.mine) * self.K)

    def _count(self, start, nbytes):
        self.seconds += time.perf_counter() - start[0]
        self.cpu_seconds += time.process_time() - start[1]
        self.bytes += nbytes
        self.calls += 1


def _float32_array(tensor):
    return np.ascontiguousarray(tensor.detach().cpu().numpy(), dtype=np.float32)


class _Exchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local, exchange):
        ctx.exchange, ctx.batch = exchange, local.shape[0]
        gathered = exchange.gather(_float32_array(local))
        if gathered is None:
            return local.new_empty((local.shape[0], 0))
        return torch.from_numpy(gathered).to(device=local.device, dtype=local.dtype)

    @staticmethod
    def backward(ctx, grad):
        ex = ctx.exchange
        received = ex.scatter(_float32_array(grad) if ex.is_root else None, ctx.batch)
        return torch.from_numpy(received).to(device=grad.device, dtype=grad.dtype), None


class DataParallelGroup:
    """The ranks that train one model together, data parallel (P = G*N: G ranks a subdomain).

    Member g of a group of G holds samples [g*n//G, (g+1)*n//G) of every split of n samples
    (share), reads only those, and computes the part of each global mini-batch that falls in
    it. mpidd.engine normalises the loss by the global batch size and calls sum_gradients
    after backward, and models.GroupBatchNorm sums BatchNorm statistics over the group with
    allreduce(), so a group step is the single-process step on the whole batch, up to the
    order of floating-point sums. Invariant: the members make the same collective calls in
    the same order (same batches, same evaluation batch counts, same stop polls).
    """

    def __init__(self, comm, color: int, key: int):
        self.comm = comm.Split(color, key)
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.bytes = 0  # payload this rank contributed to the group's gradient sums

    def share(self, n: int) -> tuple[int, int]:
        return self.rank * n // self.size, (self.rank + 1) * n // self.size

    def sum(self, values) -> list:
        """Element-wise sum over the group of a few numbers (float64)."""
        out = np.zeros(len(values), dtype=np.float64)
        self.comm.Allreduce(np.asarray(values, dtype=np.float64), out, op=MPI.SUM)
        return out.tolist()

    def sum_gradients(self, model):
        """Sum every parameter's gradient over the group, in one message."""
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:  # a member whose share of the batch was empty
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params]).float().cpu().numpy()
        self.comm.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM)
        self.bytes += flat.nbytes
        summed = torch.from_numpy(flat)
        offset = 0
        for p in params:
            p.grad.copy_(summed[offset:offset + p.numel()].view_as(p.grad))
            offset += p.numel()

    def allreduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Differentiable sum over the group (the adjoint of a sum is a sum of the gradients)."""
        return _GroupSum.apply(tensor, self.comm)


def _allreduce_tensor(comm, tensor):
    array = np.ascontiguousarray(tensor.detach().cpu().numpy())
    comm.Allreduce(MPI.IN_PLACE, array, op=MPI.SUM)
    return torch.from_numpy(array).to(tensor.device)


class _GroupSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, comm):
        ctx.comm = comm
        return _allreduce_tensor(comm, tensor)

    @staticmethod
    def backward(ctx, grad):
        return _allreduce_tensor(ctx.comm, grad.contiguous()), None


def library_version() -> str:
    return MPI.Get_library_version().strip().splitlines()[0].strip()


def peak_rss_bytes() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
