"""CNN-DNN training by domain decomposition (Klawonn, Lanser & Weber 2024, arXiv 2408.14442).

    mpirun -n 4 python -m mpidd.train                     # demo: the paper's comparison, 2x2, Fashion-MNIST
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
(dist.EXIT_PREEMPTED); `--resume RUN` continues every phase where it stopped. Every
checkpoint is written each epoch, atomically, so a killed run resumes from its last epochs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import socket
import sys
from dataclasses import dataclass, field

# The launch's one direct use of mpi4py (the rest goes through mpidd.dist): MPI_Init first, before
# signals.catch(), because MPICH installs a SIGUSR1 handler of its own.
import mpi4py
from mpi4py import MPI

from . import signals

if __name__ == "__main__":
    signals.catch()  # before the seconds of importing torch (see mpidd.signals)

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from . import __version__  # noqa: E402
from . import data, dist, rundir, saved  # noqa: E402
from .config import DEMO_DATA, ConfigError, parse_args  # noqa: E402
from .decomposition import Decomposition, DecompositionError, format_grid, layout, parse_grid  # noqa: E402
from .engine import Control, Preempted, Shard, TrainOptions  # noqa: E402
from .models import CNNConfig, CoarseDNN, build_cnn, count_parameters, local_width_factor  # noqa: E402
from .methods import coherent, global_cnn, twolevel, width  # noqa: E402
from .methods.context import Context, Phases, progress_printer  # noqa: E402
from .report import format_any  # noqa: E402
from .results import assemble_results, assemble_width_results  # noqa: E402
from .width import WidthError, build_subnet  # noqa: E402

EXIT_USAGE = 2
EXIT_PREEMPTED = dist.EXIT_PREEMPTED
# Ranks that train one model together agree on a stop every this many steps (or evaluation
# batches): a stop comes at most this many steps late, and the agreement costs 1/AGREE_EVERY
# of a small allreduce per step.
AGREE_EVERY = 10
log = logging.getLogger("mpidd")


class UsageError(ValueError):
    """Bad input, refused before training with one line."""


def cnn_config(args) -> CNNConfig:
    return CNNConfig(arch=args.arch, width=args.width, depth=args.depth, convs_per_block=args.convs_per_block,
                     hidden=args.hidden, head_pool=args.head_pool, dropout=args.dropout,
                     batchnorm=args.batchnorm, blocks_per_stage=args.blocks_per_stage)


def work_of(args) -> dict:
    """What this run trains: the local phase (+ coarse), which coherent inits, the global CNN."""
    coherent = {"compare": ["random", "pretrained"], "coherent": [args.init]}.get(args.mode, [])
    local = args.mode in ("twolevel", "compare") or ("pretrained" in coherent and args.from_run is None)
    return {"local": local, "coherent": coherent, "global": args.mode in ("global", "compare"),
            "boxes": args.mode not in ("global", "width"), "width": args.mode == "width"}


def cnn_options(args) -> TrainOptions:
    return TrainOptions(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                        optimizer=args.optimizer, momentum=args.momentum,
                        weight_decay=args.weight_decay, schedule=args.schedule)


def coarse_options(args) -> TrainOptions:
    return TrainOptions(epochs=args.coarse_epochs, batch_size=args.coarse_batch_size,
                        lr=args.coarse_lr, optimizer="adam", schedule="cosine", select_best=True)


def twolevel_config(args) -> twolevel.TwoLevelConfig:
    return twolevel.TwoLevelConfig(cnn=cnn_config(args), local=cnn_options(args), coarse=coarse_options(args),
                                   coarse_hidden=tuple(args.coarse_hidden), coarse_dropout=args.coarse_dropout,
                                   seed=args.seed, eval_batch_size=args.eval_batch_size)


def coherent_options(args, init) -> TrainOptions:
    return TrainOptions(epochs=args.coherent_epochs, batch_size=args.batch_size,
                        lr=args.coherent_lr if init == "random" else args.transfer_lr,
                        optimizer=args.optimizer, momentum=args.momentum, weight_decay=args.weight_decay,
                        schedule=args.schedule, log_interval=args.log_interval)


# Keys of config.json that shape the local CNNs and the coarse DNN, by family (with their
# defaults for runs written before the key existed): a --from run must agree on all of them.
MODEL_KEYS = {"grid": None, "overlap": None, "arch": "vgg", "width": None, "depth": None,
              "batchnorm": None, "coarse_hidden": None}
FAMILY_KEYS = {"vgg": {"convs_per_block": None, "hidden": None, "head_pool": None},
               "resnet": {"blocks_per_stage": 2}}


def check_pretrained_run(args, info, dec, cfg, width_factor):
    """--from RUN_DIR: refuse (UsageError) unless its checkpoints fit this run's models."""
    run = args.from_run
    config_path = os.path.join(run, "config.json")
    if not os.path.isfile(config_path):
        raise UsageError(f"--from {run}: no config.json there (not an mpidd run directory?)")
    try:
        with open(config_path) as f:
            earlier = json.load(f)
    except ValueError as e:
        raise UsageError(f"--from {run}: config.json is not valid JSON ({e})") from None
    for key, default in {**MODEL_KEYS, **FAMILY_KEYS[args.arch]}.items():
        if key == "coarse_hidden" and args.dnn_init == "random":
            continue  # a fresh DNN may have other layers
        mine, theirs = getattr(args, key), earlier.get(key, default)
        if isinstance(mine, tuple) and isinstance(theirs, list):
            theirs = tuple(theirs)
        if mine != theirs:
            raise UsageError(f"--from {run}: it was trained with --{key.replace('_', '-')} {theirs}, "
                             f"this run has {mine}: use the same model options")
    files = [f"local_{i}.pt" for i in range(dec.num_subdomains)]
    files += ["coarse_dnn.pt"] if args.dnn_init == "coarse" else []
    missing = [f for f in files if not os.path.isfile(os.path.join(run, "checkpoints", f))]
    if missing:
        raise UsageError(f"--from {run}: missing checkpoints/{', '.join(missing)} (did that run finish "
                         f"its local phase?)")
    C, K = info.channels, info.num_classes
    for i in range(dec.num_subdomains):
        state = load_pretrained_checkpoint(run, f"local_{i}.pt")
        box, wf = state.get("box"), state.get("width_factor")
        if box is None or tuple(map(tuple, box)) != tuple(map(tuple, dec.box(i))) or \
                not isinstance(wf, float) or abs(wf - width_factor) > 1e-9:
            raise UsageError(f"--from {run}: local_{i}.pt has box {box} and width factor {wf}, "
                             f"this run needs {dec.box(i)} and {width_factor}")
        fit_checkpoint(build_cnn(C, K, dec.subimage_shape, cfg, width_factor), state, run, f"local_{i}.pt")
    if args.dnn_init == "coarse":
        fit_checkpoint(CoarseDNN(dec.num_subdomains * K, K, args.coarse_hidden),
                       load_pretrained_checkpoint(run, "coarse_dnn.pt"), run, "coarse_dnn.pt")


def load_pretrained_checkpoint(run, name) -> dict:
    """--from: a checkpoint of another mpidd run (weights only: no code in a pickle runs); UsageError if unreadable."""
    path = os.path.join(run, "checkpoints", name)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign file: torch raises pickle, zip or EOF errors
        raise UsageError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(state, dict) or "model" not in state:
        raise UsageError(f"checkpoint {path} holds no model state: not an mpidd checkpoint")
    return state


def fit_checkpoint(model, state, run, name):
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, TypeError, AttributeError) as e:
        raise UsageError(f"--from {run}: {name} does not fit this run's model ({str(e).splitlines()[0]})") from None
    return model


def check_ranks(args, size: int, dec: Decomposition):
    """How many ranks each mode can use; UsageError with what to do otherwise."""
    N = dec.num_subdomains
    if args.mode == "width":
        if size > args.subnets:
            raise UsageError(f"{size} ranks but only {args.subnets} sub-networks: run with at most {args.subnets} "
                             f"ranks (mpirun -n {args.subnets}) or raise --subnets")
    elif args.mode in ("coherent", "compare") and size > N:
        raise UsageError(f"{size} ranks but only {N} subdomains: --mode {args.mode} trains the coherent CNN-DNN "
                         f"model parallel, one rank or more subdomains per rank: run with at most {N} ranks "
                         f"(mpirun -n {N}); more ranks than subdomains (data parallel) work with --mode twolevel")
    elif args.mode == "twolevel":
        layout(0, size, N)  # DecompositionError unless P <= N or P a multiple of N


def check_resume(args, size: int, info) -> dict | None:
    """--resume: the run's marker, if it fits this launch; UsageError otherwise. None: fresh run."""
    if args.resume is None:
        return None
    progress = rundir.read_progress(args.out)
    if progress is None:  # stopped before its first marker: nothing was saved yet
        return {"fresh": True}
    if progress["world_size"] != size:
        raise UsageError(f"--resume {args.out}: that run used {progress['world_size']} ranks, this one has {size}: "
                         f"resume with mpirun -n {progress['world_size']} (its per-rank state depends on it)")
    now = data.fingerprint(args.data)
    if progress["data"] != now:
        changed = [k for k in now if progress["data"].get(k) != now[k]]
        raise UsageError(f"--resume {args.out}: the data file {args.data} is not the one that run trained on "
                         f"(its {', '.join(changed)} changed)")
    return progress


def plan_run(args, comm) -> dict:
    """Validate everything that can be checked before training (rank 0 only); raise UsageError."""
    size = comm.Get_size()
    note = dist.check_slurm_tasks(comm)
    try:
        info = data.inspect(args.data)
    except data.DataError as e:
        msg = str(e)
        if not os.path.exists(args.data) and args.data == DEMO_DATA:
            msg += ("; create it from Fashion-MNIST with `python -m data_prep.fashion_mnist` "
                    "(or `make data`), or pass --data FILE")
        raise UsageError(msg) from None
    try:
        # --mode width cuts channels, not the image: one "subdomain", the whole image (any --grid ignored)
        grid = (1,) * len(info.spatial_shape) if args.mode == "width" else parse_grid(args.grid)
        dec = Decomposition(info.spatial_shape, grid, 0 if args.mode == "width" else args.overlap)
        check_ranks(args, size, dec)
    except DecompositionError as e:
        raise UsageError(str(e)) from None
    if os.path.exists(args.out) and not args.overwrite and args.resume is None:
        raise UsageError(f"output directory {args.out} exists: choose another --out, pass --overwrite, or "
                         f"--resume {args.out} to continue it")
    if args.from_run is not None and os.path.abspath(args.from_run) == os.path.abspath(args.out):
        raise UsageError(f"--from {args.from_run} is also --out: write the new run somewhere else")
    progress = check_resume(args, size, info)
    if progress is not None and progress.get("state") == "finished":
        raise UsageError(f"--resume {args.out}: that run has finished (results.json is there); nothing to resume")
    cfg = cnn_config(args)
    C, K = info.channels, info.num_classes
    wf = args.width_factor or (1.0 if args.mode == "width" else  # (local CNNs only)
                               local_width_factor(C, K, info.spatial_shape, dec.subimage_shape, dec.num_subdomains, cfg))
    if args.from_run is not None:
        check_pretrained_run(args, info, dec, cfg, wf)
    subnet_params = None
    if args.mode == "width":
        try:
            subnet_params = count_parameters(build_subnet(C, K, info.spatial_shape, cfg, args.subnets))
        except WidthError as e:
            raise UsageError(str(e)) from None
        if args.shard and info.sizes["train"] < 2 * args.subnets:
            raise UsageError(f"--shard: {info.sizes['train']} training images cannot make {args.subnets} shards "
                             f"of 2 or more: drop --shard or lower --subnets")
    return {
        "subnet_params": subnet_params, "note": note, "progress": progress,
        "info": info, "decomposition": dec, "width_factor": wf, "work": work_of(args),
        "dnn_params": count_parameters(CoarseDNN(dec.num_subdomains * K, K, args.coarse_hidden)),
        "local_params": count_parameters(build_cnn(C, K, dec.subimage_shape, cfg, wf)),
        "global_params": count_parameters(build_cnn(C, K, info.spatial_shape, cfg)),
    }


def start(comm, argv):
    """Rank 0 parses and validates, then every rank gets (args, plan) or the reason to stop."""
    def decide():
        try:
            args = parse_args(argv)
            if args.out is None:
                args.out = os.path.join("runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
            return "run", args, plan_run(args, comm)
        except SystemExit as e:  # --help, or argparse's own usage error (already printed)
            return "exit", e.code or 0, None
        except (ConfigError, UsageError, dist.StartupError) as e:
            print_error(e)
            return "exit", EXIT_USAGE, None

    kind, args, plan = dist.root_decides(comm, decide)
    if kind == "exit":
        sys.exit(args)
    return args, plan


@dataclass(kw_only=True)
class Run(Context):
    """The command line's Context: the job, its options and plan, the run directory's
    checkpoints and marker, and how every rank stops together (StopAgreement)."""
    args: object
    plan: dict
    threads: int
    stopper: dist.StopAgreement
    progress: dict = field(default_factory=dict)  # the marker (rank 0 writes it)
    resuming: bool = False
    bytes_whole: int = 0           # bytes of whole images read (global CNN, width mode)
    wait_interval: float | None = None  # sleep between tests of a pending MPI request (None: spin)
    polls: dict = field(default_factory=dict)  # collective stop polls so far, per communicator

    def path(self, name):
        return os.path.join(self.args.out, "checkpoints", name)

    def poll(self) -> bool:
        return self.stopper.poll()

    def poll_group(self) -> bool:
        return self._agree("group", self.group.comm) if self.group is not None else self.stopper.poll()

    def poll_world(self) -> bool:
        return self._agree("world", self.stopper.comm)

    def _agree(self, key, comm) -> bool:
        """Every AGREE_EVERY-th poll the ranks of `comm` agree (an allreduce that sleeps while
        it waits); in between they only relay signals. Invariant: the ranks of `comm` poll the
        same number of times in the same order, so they agree at the same steps."""
        self.polls[key] = self.polls.get(key, 0) + 1
        if self.polls[key] % AGREE_EVERY:
            self.stopper.poll()
            return False
        return self.stopper.any(comm, self.wait_interval)

    def sync(self):
        """A phase boundary that every rank reaches (collective): raises Preempted if the job stops."""
        with self.phases("wait"):
            if self.stopper.sync():
                raise SyncedStop("stop agreed at a phase boundary")

    def control(self, name, stop, write=True, **fields) -> Control:
        """Checkpoint `name` each epoch and at a stop (if `write`), resumed from when resuming."""
        def save(state):
            if write:
                rundir.save_checkpoint(self.path(name), **checkpoint_fields(state), **fields, args=vars(self.args))
        return Control(stop=stop, save=save, resume=loop_state(self.saved(name)))

    def coherent_control(self, name) -> Control:
        """Every rank saves its part of the coherent model each epoch; once all have, rank 0
        records the position in the marker (so it never promises more than the files hold)."""
        def save(state):
            position = {"epoch": state["epoch"], "step": state["step"]}
            path = self.path(f"{name}_rank{self.rank}.state.pt")
            if os.path.exists(path):
                os.replace(path, self.path(f"{name}_rank{self.rank}.state.prev.pt"))
            rundir.save_checkpoint(path, position=position, loop=state)
            if state.get("stopped"):  # the stop path agrees and records the position
                self.progress[name] = position
                return
            stop = self.stopper.sync()  # every rank has saved this position: rank 0 records it
            self.mark(**{name: position})
            if stop:
                raise SyncedStop("stop agreed at a phase boundary")
        return Control(stop=self.poll_world, save=save, resume=self.coherent_state(name))

    def coherent_state(self, name: str):
        """This rank's saved state of coherent phase `name` at the position the marker agreed on
        (the newest file, or the one before it: a rank may have saved one position ahead)."""
        position = self.progress.get(name)
        if not self.resuming or position is None:
            return None
        for suffix in ("", ".prev"):
            saved = rundir.load_checkpoint(self.path(f"{name}_rank{self.rank}.state{suffix}.pt"))
            if saved is not None and saved["position"] == position:
                return saved["loop"]
        raise RuntimeError(f"rank {self.rank} has no state of {name} at {position}, which the marker records")

    def log_progress(self, name, epochs, models_after=0):
        """To the rank's log, and to stdout on rank 0."""
        sinks = (log.info, lambda text: print(text, flush=True)) if self.master_process else (log.info,)
        return progress_printer(name, epochs, models_after, sinks)

    def mark(self, **updates):
        """Rank 0: record progress in the marker (after the ranks' checkpoints it speaks for)."""
        if self.master_process:
            self.progress.update(updates)
            rundir.write_progress(self.args.out, self.progress)

    def saved(self, name):
        """This run's checkpoint `name` if it is resuming and has one (else None)."""
        return rundir.load_checkpoint(self.path(name)) if self.resuming else None


class SyncedStop(Preempted):
    """A stop agreed at a phase boundary (sync): every rank has already taken part in it."""


def checkpoint_fields(state: dict) -> dict:
    """A training loop's state as checkpoint fields: model, optimizer and epoch at the top (what
    --from and users read), the rest of the loop under `loop` (what --resume needs)."""
    loop = dict(state)
    model, optimizer = loop.pop("model"), loop.pop("optimizer")
    if loop["done"] and loop["best"] is not None:
        model = loop["best"]  # a model selected on val (coarse DNN): the checkpoint is the selection
    return {"model": model, "optimizer": optimizer, "epoch": loop["epoch"] - 1, "step": loop["step"],
            "done": loop["done"], "loop": loop}


def loop_state(saved: dict | None) -> dict | None:
    """The training loop state inside a checkpoint written through checkpoint_fields."""
    if saved is None or "loop" not in saved:
        return None
    model = saved["model"] if not (saved["loop"]["done"] and saved["loop"]["best"] is not None) else None
    return {**saved["loop"], "model": model if model is not None else saved["loop"]["best"],
            "optimizer": saved["optimizer"]}


def print_error(message):
    print(f"mpidd.train: error: {message}", file=sys.stderr, flush=True)


def refuse(message):
    print_error(message)
    sys.exit(EXIT_USAGE)


def setup_logging(out, rank, append=False):
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    handler = logging.FileHandler(os.path.join(out, "logs", f"rank{rank}.log"), mode="a" if append else "w")
    handler.setFormatter(logging.Formatter(f"%(asctime)s rank {rank} %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False


# --- load --------------------------------------------------------------------------------------

def read_split(run: Run, split: str, slices) -> tuple[Shard, int]:
    """One split inside `slices`: all samples, or this rank's share in a data-parallel group."""
    n = run.plan["info"].sizes[split]
    rows = run.group.share(n) if run.group is not None else None
    x, y, nbytes = data.load_split(run.args.data, split, slices, block=run.args.read_block, rows=rows)
    return Shard(x, y, rows[0] if rows else 0, n), nbytes


def load_local_data(run: Run):
    """Phase load: read this rank's subimage boxes (train/val/test, its share of the samples in
    a data-parallel group) and nothing else.

    All of the rank's subdomains are read before any training, so bad data (NaN, inf) is
    refused before training starts; memory is this rank's share of the data set.
    """
    dec = run.plan["decomposition"]
    subsets, bytes_read = {}, 0
    with run.phases("load"):
        for i in run.mine:
            subsets[i] = {}
            for s in data.SPLITS:
                subsets[i][s], nbytes = read_split(run, s, dec.slices(i))
                bytes_read += nbytes
    return subsets, bytes_read


def load_whole_images(run: Run):
    """Every split's whole images (this rank's share of the samples if data parallel)."""
    whole = tuple(slice(0, s) for s in run.plan["info"].spatial_shape)
    split, nbytes = {}, 0
    with run.phases("global_load"):
        for s in data.SPLITS:
            split[s], n = read_split(run, s, whole)
            nbytes += n
    return split, nbytes


def load_or_refuse(run: Run, load):
    """Every rank loads; a DataError anywhere (e.g. NaN in one rank's box) refuses on every rank."""
    result, error = None, None
    try:
        result = load()
    except data.DataError as e:
        error = str(e)
    failed = dist.agree(run.comm, error)
    if failed and run.master_process:
        refuse(f"{failed[1]} (found by rank {failed[0]})" if run.comm.Get_size() > 1 else failed[1])
    elif failed:
        sys.exit(EXIT_USAGE)
    return result


# --- the two-level CNN-DNN -----------------------------------------------------------------------

def load_local_models(run: Run):
    """The trained local CNNs of this rank, from their checkpoints (the gather is done)."""
    info, dec, args = run.plan["info"], run.plan["decomposition"], run.args
    models, rows = {}, []
    for i in run.mine:
        saved = rundir.load_checkpoint(run.path(f"local_{i}.pt"))
        model = build_cnn(info.channels, info.num_classes, dec.subimage_shape, cnn_config(args), run.plan["width_factor"])
        model.load_state_dict(saved["model"])
        models[i] = run.on_device(model)
        if run.leader:
            rows += [dict(r, model=f"local_{i}") for r in saved["loop"]["history"]]
    return models, rows


def gather_phase(run: Run, probs, subsets):
    """Phase gather: every subdomain's probabilities to rank 0, (n, N*K) per split, saved there."""
    with run.phases("gather"):
        gathered = twolevel.gather(run, probs, subsets, run.plan["decomposition"].num_subdomains,
                                   run.plan["info"].num_classes, run.plan["info"].sizes)
    if run.master_process:
        rundir.save_arrays(run.path("probabilities.npz"), **gathered)
    return gathered


def coarse_phase(run: Run, gathered, labels):
    """Rank 0: coarse DNN (selected on val), average and vote on the gathered probabilities."""
    N, K = run.plan["decomposition"].num_subdomains, run.plan["info"].num_classes
    cfg = twolevel_config(run.args)
    dnn, history = twolevel.fit_coarse(run, gathered, labels, N, K, cfg)
    acc = twolevel.accuracies(dnn, gathered, labels, N, K, stop=run.poll)
    return acc, [dict(r, model="coarse_dnn") for r in history], dnn


def load_pretrained(run: Run):
    """--from RUN_DIR: this rank's trained local CNNs (and, on rank 0, the coarse DNN)."""
    args, info, dec = run.args, run.plan["info"], run.plan["decomposition"]
    src, C, K = args.from_run, info.channels, info.num_classes
    local = {i: fit_checkpoint(build_cnn(C, K, dec.subimage_shape, cnn_config(args), run.plan["width_factor"]),
                               load_pretrained_checkpoint(src, f"local_{i}.pt"), src, f"local_{i}.pt").to(run.device)
             for i in run.mine}
    dnn = None
    if run.master_process and args.dnn_init == "coarse":
        dnn = fit_checkpoint(CoarseDNN(dec.num_subdomains * K, K, args.coarse_hidden, args.coarse_dropout),
                             load_pretrained_checkpoint(src, "coarse_dnn.pt"), src, "coarse_dnn.pt").to(run.device)
    return {"local": local, "dnn": dnn}


# --- the coherent CNN-DNN ------------------------------------------------------------------------

def coherent_config(args, init) -> coherent.CoherentConfig:
    return coherent.CoherentConfig(opts=coherent_options(args, init), output=args.exchange,
                                   coarse_hidden=tuple(args.coarse_hidden), coarse_dropout=args.coarse_dropout,
                                   seed=args.seed, eval_batch_size=args.eval_batch_size)


def coherent_phase(run: Run, init, subsets, labels, exchange, pretrained):
    """The CNN-DNN trained as one model parallel model: from random weights, or from the
    pre-trained local CNNs (transfer learning) and the coarse DNN (--dnn-init coarse).

    Collective: every rank takes part, and agrees on stops step by step. Every epoch each rank
    saves its part (local CNNs, optimizer, rank 0: DNN), then, once all have, rank 0 records
    the position in the marker. Returns (accuracies on rank 0 else None, metric rows, timing
    of the training steps and their exchange)."""
    args, plan = run.args, run.plan
    info, dec = plan["info"], plan["decomposition"]
    N, K = dec.num_subdomains, info.num_classes
    name, cfg = f"coherent_{init}", coherent_config(args, init)
    start = None
    if init == "pretrained":
        start = {"local": pretrained["local"], "dnn": pretrained["dnn"] if args.dnn_init == "coarse" else None}
    local, dnn = coherent.initial_models(run, dec, info.channels, K, plan["width_factor"], cnn_config(args), cfg,
                                         start)
    images = {split: {i: s[split].x for i, s in subsets.items()} for split in data.SPLITS}
    history, optimizer, timing = coherent.fit(run, name, local, dnn, images, labels, cfg, exchange)
    test = coherent.score(run, local, dnn, images["test"], labels["test"], cfg, exchange)
    for i, model in local.items():
        rundir.save_checkpoint(run.path(f"{name}_local_{i}.pt"),
                               model=model.state_dict(), epoch=cfg.opts.epochs, subdomain=i, box=dec.box(i),
                               width_factor=plan["width_factor"], exchange=args.exchange, args=vars(args))
    rundir.save_checkpoint(run.path(f"{name}_rank{run.rank}_optimizer.pt"),
                           optimizer=optimizer.state_dict(), subdomains=sorted(local), epoch=cfg.opts.epochs)
    if not run.master_process:
        return None, [], timing
    rundir.save_checkpoint(run.path(f"{name}_dnn.pt"), model=dnn.state_dict(),
                           in_features=N * K, num_classes=K, hidden=list(args.coarse_hidden),
                           dropout=args.coarse_dropout, exchange=args.exchange, epoch=cfg.opts.epochs,
                           args=vars(args))
    acc = {"val": history[-1]["val_acc"], "test": test[1]}
    return acc, [dict(r, model=name) for r in history], timing


# --- the global CNN and the width decomposition -----------------------------------------------

def global_phase(run: Run, split, test=False, alone=True):
    """The global CNN on whole images, same family and options as the local CNNs (rank 0 alone,
    or data parallel over every rank in --mode global). Returns ({split: accuracy}, metric rows),
    or with `test` ({split: (loss, accuracy)}, metric rows, history with its test-accuracy curve)."""
    args, info, phases = run.args, run.plan["info"], run.phases
    opts = cnn_options(args)
    opts.log_interval, opts.test_points = args.log_interval, args.curve_points
    with phases("global_train"):
        model, history = global_cnn.fit(run, split, info.channels, info.num_classes, info.spatial_shape,
                                        cnn_config(args), opts, args.seed, test=test, alone=alone)
    if test:
        phases.add("global_curve", *curve_seconds(history))
    with phases("global_eval"):
        scores = global_cnn.scores(run, model, split, args.eval_batch_size, alone=alone)
    rows = [dict(r, model="global") for r in history] if run.leader else []
    if test:
        return scores, rows, history
    return {s: acc for s, (_, acc) in scores.items()}, rows


def curve_seconds(history):
    """(wall, CPU) seconds of the test-accuracy curve's evaluations in a training history."""
    return (sum(r.get("curve_seconds", 0.0) for r in history), sum(r.get("curve_cpu_seconds", 0.0) for r in history))


def width_config(args) -> width.WidthConfig:
    subnet_opts, recomposed_opts = cnn_options(args), cnn_options(args)
    subnet_opts.epochs = args.subnet_epochs
    recomposed_opts.lr, recomposed_opts.log_interval = args.transfer_lr, args.log_interval
    recomposed_opts.test_points = args.curve_points
    return width.WidthConfig(cnn=cnn_config(args), subnets=args.subnets, subnet_opts=subnet_opts,
                             recomposed_opts=recomposed_opts, shard=args.shard, offdiag_noise=args.offdiag_noise,
                             seed=args.seed, eval_batch_size=args.eval_batch_size)


def width_phases(run: Run, whole):
    """--mode width (Gu, Zhang, Liu & Cai 2022): sub-networks in parallel, their weights
    gathered to rank 0 and recomposed into the global CNN, which is trained further; then
    the same global CNN from random weights for comparison (rank 0; the others wait).
    Collective. Returns (scores on rank 0 else None, metric rows)."""
    args, info, phases, cfg = run.args, run.plan["info"], run.phases, width_config(run.args)
    C, K, shape = info.channels, info.num_classes, info.spatial_shape
    states, sub_scores, histories = width.fit_subnets(run, whole, C, K, shape, cfg)
    rows = [dict(r, model=f"subnet_{m}") for m, h in histories.items() for r in h]
    run.sync()  # so that width_gather times the exchange, not the slowest rank
    with phases("width_gather"):
        states, sub_scores = width.gather(run, states, sub_scores)
    if not run.master_process:
        return None, rows
    scores = {"subnets": sub_scores}
    with phases("recompose"):
        model = width.recompose(run, states, C, K, shape, cfg)
    rundir.save_checkpoint(run.path("recomposed_initial.pt"), model=model.state_dict(),
                           subnets=cfg.subnets, offdiag_noise=args.offdiag_noise, epoch=0, args=vars(args))
    with phases("recomposed_initial_eval"):
        scores["recomposed_initial"] = global_cnn.scores(run, model, whole, args.eval_batch_size)
    with phases("recomposed_train"):
        history = width.fit_recomposed(run, model, whole, cfg, test=True)
    phases.add("recomposed_curve", *curve_seconds(history))
    with phases("recomposed_eval"):
        scores["recomposed"] = global_cnn.scores(run, model, whole, args.eval_batch_size)
    scores["recomposed_curve"] = history
    rows += [dict(r, model="recomposed") for r in history]
    acc, global_rows, history = global_phase(run, whole, test=True)
    scores["global"], scores["global_curve"] = acc, history
    return scores, rows + global_rows


# --- the job -------------------------------------------------------------------------------------

def run_phases(run: Run, subsets, whole):
    """Every phase of this run, in order. Returns (accuracies on rank 0, metric rows, coherent timing)."""
    args, plan, work = run.args, run.plan, run.plan["work"]
    N, K = plan["decomposition"].num_subdomains, plan["info"].num_classes
    rows, accuracies, coherent_timing, pretrained = [], {}, {}, None
    if work["width"]:
        accuracies, rows = width_phases(run, whole)
        return accuracies, rows, coherent_timing
    if work["boxes"] and run.master_process:
        labels = (data.load_labels(args.data) if run.group is not None else
                  {s: subsets[run.mine[0]][s].y for s in data.SPLITS})
    else:
        labels = {s: subsets[run.mine[0]][s].y for s in data.SPLITS} if subsets else None
    if args.from_run is not None:  # rank 0 has checked that they fit (plan_run)
        with run.phases("load"):
            pretrained = load_pretrained(run)
    if work["local"]:
        if run.resuming and run.progress.get("gathered"):  # local and gather are done: their results
            local_models, rows = load_local_models(run)
            gathered = rundir.load_arrays(run.path("probabilities.npz")) if run.master_process else None
        else:
            info, dec = plan["info"], plan["decomposition"]
            probs, local_models, histories = twolevel.fit_local_models(
                run, subsets, dec, info.channels, K, plan["width_factor"], twolevel_config(args), data.SPLITS)
            rows = [dict(r, model=f"local_{i}") for i, h in histories.items() for r in h] if run.leader else []
            run.sync()  # so that "gather" times the exchange, not the slowest rank
            gathered = gather_phase(run, probs, subsets)
            run.mark(gathered=True)
        dnn = None
        if run.master_process:
            with run.phases("coarse"):
                accuracies, coarse_rows, dnn = coarse_phase(run, gathered, labels)
            rows += coarse_rows
        pretrained = {"local": local_models, "dnn": dnn}
    if work["coherent"]:
        exchange = dist.ModelParallelExchange(run.comm, run.mine, N, K, poll_interval=run.wait_interval)
        for init in work["coherent"]:
            run.sync()  # all ranks start together: no rank's phase holds the wait
            with run.phases(f"coherent_{init}"):
                acc, coherent_rows, coherent_timing[init] = coherent_phase(
                    run, init, subsets, labels, exchange, pretrained)
            if run.master_process:
                accuracies[f"coherent_{init}"] = acc
                rows += coherent_rows
    if work["global"]:
        alone = args.mode == "compare"  # rank 0 while the others wait; --mode global: every rank
        if alone:
            run.sync()
        if run.master_process or not alone:
            if whole is None:  # --mode compare: the local phase has already checked every pixel
                whole, _ = load_whole_images(run)
                run.bytes_whole = sum(s.x.nbytes + s.y.nbytes for s in whole.values())
            acc, global_rows = global_phase(run, whole, alone=alone)
            if run.master_process:
                accuracies["global"] = acc
            rows += global_rows
    return accuracies, rows, coherent_timing


def stop_here(run: Run, error: Preempted) -> int:
    """Every rank stops here after saving (see StopAgreement); rank 0 records the stop last."""
    if not isinstance(error, SyncedStop):
        run.stopper.sync(stopping=True)  # in place of the phase boundary this rank did not reach
    rundir.write_json(run.path(f"phases_rank{run.rank}.json"), run.phases.seconds)
    run.stopper.barrier()  # every rank has written its part
    reason = run.stopper.reason or "a stop"
    log.info("stopped (%s); state saved", reason)
    if run.master_process:
        stops = run.progress.get("stops", []) + [{"time": datetime.datetime.now().isoformat(timespec="seconds"),
                                                  "reason": reason}]
        run.mark(state="stopped", stops=stops)
        size = run.comm.Get_size()
        print(f"mpidd: stopped ({reason}); every rank saved its state in {run.args.out}. Continue with:\n"
              f"  mpirun -n {size} python -m mpidd.train --resume {run.args.out}", flush=True)
    run.stopper.barrier()  # the marker is written before any rank exits
    return EXIT_PREEMPTED


def main(argv=None):
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    dist.install_abort_on_error(comm)
    master_process = rank == 0
    args, plan = start(comm, argv)
    dec, work = plan["decomposition"], plan["work"]
    N = dec.num_subdomains

    device, error = torch.device("cpu"), None
    try:
        device, local_rank = dist.select_device(args.device, comm)  # before any CUDA allocation
    except dist.StartupError as e:
        error = str(e)
    failed = dist.agree(comm, error)
    if failed and master_process:
        refuse(f"rank {failed[0]}: {failed[1]}")
    elif failed:
        sys.exit(EXIT_USAGE)
    threads = args.threads or dist.default_threads(comm)
    torch.set_num_threads(threads)
    dist.tune_malloc()
    dist.warm_up_torch()
    resume = plan["progress"]
    run = Run(comm=comm, args=args, plan=plan, device=device, threads=threads,
              stopper=dist.StopAgreement(comm), mine=[], resuming=resume is not None and not resume.get("fresh"),
              # ranks that share cores sleep while they wait for each other; ranks with cores
              # of their own spin in MPI_Wait (lowest latency)
              wait_interval=1e-4 if dist.oversubscribed(comm, threads) else None)
    if run.resuming:
        run.progress = resume
        run.phases = Phases(rundir.read_json(run.path(f"phases_rank{rank}.json"), {}))
    if work["width"]:
        run.mine = layout(rank, size, args.subnets)[0]  # this rank's sub-networks, round robin
    elif work["boxes"] or size > 1:
        mine, replicas, member = layout(rank, size, N if work["boxes"] else 1)
        run.mine = mine if work["boxes"] else []
        if replicas > 1:  # P = G*N: the G ranks of each subdomain train its model data parallel
            run.group = dist.DataParallelGroup(comm, color=mine[0], key=member)

    # Read the data before the run directory exists, so that bad data leaves nothing behind.
    subsets, whole, bytes_boxes, bytes_whole = {}, None, 0, 0
    if work["boxes"]:
        subsets, bytes_boxes = load_or_refuse(run, lambda: load_local_data(run))
    elif work["width"] or master_process or run.group is not None:
        # --mode width (every rank), or global (rank 0, or every rank data parallel)
        whole, bytes_whole = load_or_refuse(run, lambda: load_whole_images(run))

    if master_process:
        if run.resuming:
            run.progress["segments"].append({"started": datetime.datetime.now().isoformat(timespec="seconds"),
                                             "threads": threads, "device": args.device})
            run.mark(state="running")
        else:
            rundir.prepare(args.out)
            rundir.write_json(os.path.join(args.out, "config.json"),
                              {k: v for k, v in vars(args).items() if k not in ("config", "overwrite", "out", "resume")})
            run.progress = {"world_size": size, "mode": args.mode, "data": data.fingerprint(args.data),
                            "state": "running", "stops": [],
                            "segments": [{"started": datetime.datetime.now().isoformat(timespec="seconds"),
                                          "threads": threads, "device": args.device}]}
            run.mark()
    run.progress = dist.root_decides(comm, lambda: run.progress)  # the marker as rank 0 wrote it
    dist.sleepy_barrier(comm)  # the run directory exists before any rank writes into it
    setup_logging(args.out, rank, append=run.resuming)
    where = dist.device_name(device)
    log.info("mpidd %s, torch %s, %s; %d ranks, %d threads, device %s; subdomains %s (boxes %s)%s, %d bytes read",
             __version__, torch.__version__, dist.library_version(), size, threads, where, run.mine,
             [dec.box(i) for i in run.mine] if work["boxes"] else "whole images",
             f", data parallel member {run.group.rank}/{run.group.size}" if run.group else "", bytes_boxes + bytes_whole)
    devices = dist.gather_to_root(comm, f"{socket.gethostname()}:{where}")
    if master_process:
        print_header(run, devices)

    run.bytes_whole = bytes_whole
    try:
        accuracies, rows, coherent_timing = run_phases(run, subsets, whole)
        subsets = whole = None
        run.sync()  # other ranks sleep, not spin, while rank 0 works
    except Preempted as e:
        return stop_here(run, e)

    stats = {"rank": rank, "host": socket.gethostname(), "device": where, "threads": threads,
             "subdomains": run.mine, "data_parallel": [run.group.rank, run.group.size] if run.group else None,
             "bytes_read": bytes_boxes + run.bytes_whole, "bytes_read_boxes": bytes_boxes,
             "bytes_read_whole_images": run.bytes_whole, "peak_rss_bytes": dist.peak_rss_bytes(),
             "phases": run.phases.seconds, "coherent": coherent_timing}
    gathered_reports = dist.gather_to_root(comm, (stats, rows))
    if master_process:
        all_stats = [st for st, _ in gathered_reports]
        all_rows = [r for _, rs in gathered_reports for r in rs]
        versions = {"mpi_library": dist.library_version(), "mpi4py": mpi4py.__version__,
                    "torch": torch.__version__, "h5py": h5py.__version__, "numpy": np.__version__,
                    "python": sys.version.split()[0]}
        if work["width"]:
            results = assemble_width_results(args, plan, all_stats, accuracies, size, threads, versions)
        else:
            results = assemble_results(args, plan, all_stats, accuracies, size, threads, versions)
        results["devices"] = devices
        results["restarts"] = {"segments": run.progress["segments"], "stops": run.progress.get("stops", [])}
        rundir.write_json(os.path.join(args.out, "results.json"), results)
        rundir.write_metrics(os.path.join(args.out, "metrics.csv"), all_rows)
        if not work["width"]:
            write_model_file(run, accuracies)
        run.mark(state="finished")
        print(format_any(results), flush=True)
        print(f"results: {os.path.join(args.out, 'results.json')}", flush=True)
    dist.sleepy_barrier(comm)  # the marker says finished: the resume states are no longer needed
    for init in work["coherent"]:
        for suffix in ("", ".prev"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(run.path(f"coherent_{init}_rank{rank}.state{suffix}.pt"))
    return 0


def write_model_file(run: Run, accuracies):
    """Rank 0, at the end: RUN/model.pt, the self-describing model (mpidd.saved) that
    mpidd.predict and TwoLevelClassifier.load read, from the run's final checkpoints."""
    args, plan, work = run.args, run.plan, run.plan["work"]
    info, dec = plan["info"], plan["decomposition"]
    N = dec.num_subdomains

    def weights(name):
        return rundir.load_checkpoint(run.path(name))["model"]
    models = {}
    if "cnn_dnn" in accuracies:
        models["twolevel"] = {"local": {i: weights(f"local_{i}.pt") for i in range(N)},
                              "dnn": weights("coarse_dnn.pt"), "exchange": "probabilities"}
    for init in work["coherent"]:
        models[f"coherent_{init}"] = {"local": {i: weights(f"coherent_{init}_local_{i}.pt") for i in range(N)},
                                      "dnn": weights(f"coherent_{init}_dnn.pt"), "exchange": args.exchange}
    if work["global"]:
        models["global"] = {"model": weights("global.pt")}
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()
              if k not in ("config", "overwrite", "out", "resume")}
    manifest = {"image_shape": list(info.image_shape), "input_dtype": info.dtype, "grid": list(dec.grid),
                "overlap": dec.overlap, "num_classes": info.num_classes, "classes": list(info.classes),
                "cnn": dataclasses.asdict(cnn_config(args)), "width_factor": plan["width_factor"],
                "coarse_hidden": list(args.coarse_hidden), "coarse_dropout": args.coarse_dropout,
                "hyperparameters": config}
    saved.save_model(os.path.join(args.out, saved.MODEL_FILE), manifest, models)


def print_header(run: Run, devices):
    args, plan, size, threads = run.args, run.plan, run.comm.Get_size(), run.threads
    dec, work = plan["decomposition"], plan["work"]
    if plan.get("note"):
        print(f"mpidd: {plan['note']}", flush=True)
    if run.resuming:
        print(f"mpidd: resuming {args.out} (stopped {len(run.progress.get('stops', []))} time(s) before)", flush=True)
    if work["width"]:
        print(f"mpidd: {size} ranks x {threads} threads, mode width: {args.arch} global CNN of width {args.width} "
              f"({plan['global_params']:,} parameters) split into {args.subnets} sub-networks of width "
              f"{args.width // args.subnets} ({plan['subnet_params']:,} parameters each), "
              f"{'disjoint shards' if args.shard else 'full training set each'}; run directory {args.out}",
              flush=True)
    else:
        replicas = f" ({run.group.size} ranks per model, data parallel)" if run.group is not None else ""
        print(f"mpidd: {size} ranks x {threads} threads{replicas}, mode {args.mode}, grid {format_grid(dec.grid)} "
              f"overlap {dec.overlap}, subimages {format_grid(dec.subimage_shape)}, {args.arch} local width "
              f"factor {plan['width_factor']:g} ({plan['local_params']:,} vs {plan['global_params']:,} "
              f"global parameters); run directory {args.out}", flush=True)
    unique = sorted(set(devices))
    print("mpidd: devices " + ", ".join(f"rank {r} {d}" for r, d in enumerate(devices))
          if len(unique) > 1 or "cuda" in unique[0] else f"mpidd: every rank on {unique[0]}", flush=True)
    if size > 1 and (work["boxes"] or work["width"]):
        print(f"progress below is rank 0's; every rank logs its own to {args.out}/logs/rank<r>.log", flush=True)


if __name__ == "__main__":
    sys.exit(main())
