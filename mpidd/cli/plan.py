"""What a command line asks for, checked before anything runs (rank 0): what the data file
settles (normalisation, shuffle blocks, the automatic grid) and every refusal (UsageError, one
line, exit 2). The methods' typed configs are mpidd.options' (of the parsed arguments)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from .. import data, parallel, rundir
from ..decomposition import Decomposition, DecompositionError, choose_grid, format_grid, layout, parse_grid
from ..feed import classes_per_block
from ..models import CoarseDNN, build_cnn, count_parameters, local_width_factor
from ..options import cnn_config
from ..recomposition import WidthError, build_subnet
from .arguments import DEMO_DATA


class UsageError(ValueError):
    """Bad input, refused before training with one line."""


def resolve_normalization(args, info: data.DataInfo):
    """args.normalization: the per-channel {"mean", "std"} every model's input is normalised
    with (from the data file, --normalize file), or None."""
    use = args.normalize == "file" and info.mean is not None
    args.normalization = {"mean": list(info.mean), "std": list(info.std), "source": "data file"} if use else None


@dataclass(frozen=True)
class Work:
    """What a run trains (work_of): the local phase (+ coarse), which coherent inits, the global
    CNN; whether ranks read subimage boxes (else whole images), whether it is --mode width."""
    local: bool
    coherent: tuple[str, ...]  # the inits, in the order they run: "random", "pretrained"
    global_cnn: bool
    boxes: bool
    width: bool


@dataclass(frozen=True)
class Plan:
    """What rank 0 settled before anything runs (plan_run), broadcast to every rank (pickled:
    this module is imported on every rank before the broadcast)."""
    info: data.DataInfo
    decomposition: Decomposition
    width_factor: float             # of the local CNNs (1 in --mode width)
    work: Work
    note: str | None                # printed first (Slurm task check, --shuffle blocks warning)
    progress: dict | None           # --resume: the run's marker ({"fresh": True}: none yet); None: a new run
    local_params: int
    global_params: int
    dnn_params: int
    subnet_params: int | None       # --mode width: one sub-network's


def assignment(rank: int, size: int, plan: Plan, args) -> tuple[list, tuple | None]:
    """(this rank's subdomains, or its sub-networks in --mode width; its data-parallel group as
    (color, member, ranks), or None where it trains alone)."""
    work = plan.work
    if work.width:
        return layout(rank, size, args.subnets)[0], None  # round robin
    if not work.boxes and size == 1:
        return [], None
    subdomains, replicas, member = layout(rank, size, plan.decomposition.num_subdomains if work.boxes else 1)
    group = (subdomains[0], member, replicas) if replicas > 1 else None  # P = G*N: G ranks a subdomain
    return (subdomains if work.boxes else []), group


def global_cnn_alone(args, size: int) -> bool:
    """Rank 0 trains the global CNN by itself (--mode compare with --global-alone, or one rank);
    else ranks train it data parallel (--mode global: every rank; compare: see global_share)."""
    return args.mode == "compare" and (getattr(args, "global_alone", False) or size == 1)


def global_share(plan: Plan, args, master_process: bool, size: int, leaders=(True, 1)) -> int | None:
    """How many ranks share the global CNN's samples with this rank (1: it trains it alone), or
    None where it does not train it. --mode global: every rank; compare: rank 0 alone
    (--global-alone), or the first rank of every node (leaders: (this rank is one, how many
    there are), parallel.node_leaders), data parallel across nodes, each with its node's cores
    while the other ranks of the node wait."""
    if not plan.work.global_cnn:
        return None
    if args.mode == "global":
        return size
    if global_cnn_alone(args, size):
        return 1 if master_process else None
    leader, nodes = leaders
    return nodes if leader else None


def data_share(plan: Plan, args, mine, group_size: int | None, global_ranks: int | None) -> int:
    """What this rank's data takes in memory: its subimage boxes of every split (its share of the
    samples if data parallel), and where it trains on whole images (global_ranks: how many share
    them, see global_share; --mode width: all of them), its share of those."""
    info, dec, work = plan.info, plan.decomposition, plan.work
    per_voxel = info.channels * np.dtype(info.dtype).itemsize
    samples = sum(info.sizes[s] if group_size is None else -(-info.sizes[s] // group_size) for s in data.SPLITS)
    total = samples * len(mine) * int(np.prod(dec.subimage_shape)) * per_voxel if work.boxes else 0
    if work.width:
        total += samples * int(np.prod(info.spatial_shape)) * per_voxel
    elif global_ranks is not None:
        total += sum(-(-info.sizes[s] // global_ranks) for s in data.SPLITS) * int(np.prod(info.spatial_shape)) \
            * per_voxel
    return total


def work_of(args) -> Work:
    """What this run trains: the local phase (+ coarse), which coherent inits, the global CNN."""
    coherent = {"compare": ("random", "pretrained"), "coherent": (args.init,)}.get(args.mode, ())
    local = args.mode in ("twolevel", "compare") or ("pretrained" in coherent and args.from_run is None)
    return Work(local=local, coherent=coherent, global_cnn=args.mode in ("global", "compare"),
                boxes=args.mode not in ("global", "width"), width=args.mode == "width")


def resolve_shuffle(args, info: data.DataInfo):
    """args.shuffle_block: the samples of one block of the training order (feed.epoch_order):
    1 for --shuffle exact, the file's chunk extent along the samples for blocks."""
    args.shuffle_block = 1 if args.shuffle == "exact" else (info.chunk_samples or 1024)


def order_warning(args, info: data.DataInfo) -> str | None:
    """--shuffle blocks on a training split whose chunk rows hold few classes (a file written
    class by class): the order would feed one class at a time. A warning, not a refusal."""
    if args.shuffle != "blocks" or args.shuffle_block <= 1:
        return None
    labels = data.load_labels(args.data, ("train",))["train"]
    mixed = classes_per_block(labels, args.shuffle_block)
    if mixed >= 0.5 * min(info.num_classes, args.shuffle_block):
        return None
    return (f"warning: --shuffle blocks: a chunk row of the training split ({args.shuffle_block} samples) holds "
            f"{mixed:.1f} of the {info.num_classes} classes on average (a file written class by class?), so "
            f"the training order will hold long runs of one class; use --shuffle exact, a --shuffle-buffer that "
            f"spans the whole split ({-(-len(labels) // args.shuffle_block)} chunk rows), or a file written in "
            f"a mixed order")


# Keys of config.json that shape the local CNNs and the coarse DNN, by family (with their
# defaults for runs written before the key existed): a --from run must agree on all of them.
MODEL_KEYS = {"grid": None, "overlap": None, "arch": "vgg", "width": None, "depth": None,
              "batchnorm": None, "coarse_hidden": None}


FAMILY_KEYS = {"vgg": {"convs_per_block": None, "hidden": None, "head_pool": None},
               "resnet": {"blocks_per_stage": 2}, "densenet": {"dense_layers": None},
               "ctcnn": {"hidden": None}}


def check_pretrained_run(args, info, dec, cfg, width_factor):
    """--from RUN_DIR: refuse (UsageError) unless its checkpoints fit this run's models."""
    src = args.from_run
    config_path = os.path.join(src, "config.json")
    if not os.path.isfile(config_path):
        raise UsageError(f"--from {src}: no config.json there (not an mpidd run directory?)")
    try:
        with open(config_path) as f:
            earlier = json.load(f)
    except ValueError as e:
        raise UsageError(f"--from {src}: config.json is not valid JSON ({e})") from None
    for key, default in {**MODEL_KEYS, **FAMILY_KEYS[args.arch]}.items():
        if key == "coarse_hidden" and args.dnn_init == "random":
            continue  # a fresh DNN may have other layers
        mine, theirs = getattr(args, key), earlier.get(key, default)
        if isinstance(mine, tuple) and isinstance(theirs, list):
            theirs = tuple(theirs)
        if mine != theirs:
            raise UsageError(f"--from {src}: it was trained with --{key.replace('_', '-')} {theirs}, "
                             f"this run has {mine}: use the same model options")
    check_same_normalization(args, earlier)
    files = [rundir.local_checkpoint(i) for i in range(dec.num_subdomains)]
    files += [rundir.COARSE_CHECKPOINT] if args.dnn_init == "coarse" else []
    missing = [f for f in files if not os.path.isfile(rundir.checkpoint_path(src, f))]
    if missing:
        raise UsageError(f"--from {src}: missing {rundir.CHECKPOINTS}/{', '.join(missing)} (did that run finish "
                         f"its local phase?)")
    C, K = info.channels, info.num_classes
    for i in range(dec.num_subdomains):
        name = rundir.local_checkpoint(i)
        state = load_pretrained_checkpoint(src, name)
        box, wf = state.get("box"), state.get("width_factor")
        if box is None or tuple(map(tuple, box)) != tuple(map(tuple, dec.box(i))) or \
                not isinstance(wf, float) or abs(wf - width_factor) > 1e-9:
            raise UsageError(f"--from {src}: {name} has box {box} and width factor {wf}, "
                             f"this run needs {dec.box(i)} and {width_factor}")
        load_pretrained_weights(build_cnn(C, K, dec.subimage_shape, cfg, width_factor), state, src, name)
    if args.dnn_init == "coarse":
        name = rundir.COARSE_CHECKPOINT
        load_pretrained_weights(CoarseDNN(dec.num_subdomains * K, K, args.coarse_hidden),
                                load_pretrained_checkpoint(src, name), src, name)


def check_same_normalization(args, earlier: dict):
    """--from: the pretrained CNNs saw inputs normalised as the earlier run's config.json says (no
    key: an mpidd before normalisation, none); this run's must be the same."""
    def numbers(norm):
        return None if not norm else (list(norm["mean"]), list(norm["std"]))

    theirs, mine = numbers(earlier.get("normalization")), numbers(args.normalization)
    if theirs != mine:
        def say(n):
            return "none" if n is None else f"mean {[round(v, 4) for v in n[0]]} std {[round(v, 4) for v in n[1]]}"
        hint = ("pass --normalize none" if theirs is None else
                "use the data file that run was trained on" if mine is not None else "drop --normalize none")
        raise UsageError(f"--from {args.from_run}: its CNNs were trained on inputs normalised with {say(theirs)}, "
                         f"this run's are {say(mine)}: {hint}")


def load_pretrained_checkpoint(src, name) -> dict:
    """--from SRC: a checkpoint of another mpidd run (weights only: no code in a pickle runs);
    UsageError if unreadable."""
    path = rundir.checkpoint_path(src, name)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign file: torch raises pickle, zip or EOF errors
        raise UsageError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(state, dict) or "model" not in state:
        raise UsageError(f"checkpoint {path} holds no model state: not an mpidd checkpoint")
    return state


def load_pretrained_weights(model, state, src, name):
    """`model` with the weights of checkpoint `name` of run directory `src` (--from SRC)."""
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, TypeError, AttributeError) as e:
        raise UsageError(f"--from {src}: {name} does not fit this run's model ({str(e).splitlines()[0]})") from None
    return model


def check_ranks(args, size: int, dec: Decomposition):
    """How many ranks each mode can use; UsageError with what to do otherwise."""
    N = dec.num_subdomains
    if args.mode == "width":
        if size > args.subnets:
            raise UsageError(f"{size} ranks but only {args.subnets} sub-networks: run with at most {args.subnets} "
                             f"ranks (mpirun -n {args.subnets}) or raise --subnets")
    elif args.mode != "global":
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
    now = data.fingerprint(args.data, args.task)
    if progress["data"] != now:
        changed = [k for k in now if progress["data"].get(k) != now[k]]
        raise UsageError(f"--resume {args.out}: the data file {args.data} is not the one that run trained on "
                         f"(its {', '.join(changed)} changed)")
    return progress


def check_out(out: str):
    """--out must be (or be creatable as) a directory this process can write in; UsageError otherwise."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} is a file, not a directory: choose another --out")
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"--out {out}: {parent} is a file, so no directory can be made below it: choose another --out")
    if not os.access(parent if not os.path.isdir(out) else out, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: no permission to write in {parent if not os.path.isdir(out) else out}")


def resolve_auto_grid(args, size: int, shape):
    """--grid auto: the grid follows the rank count (decomposition.choose_grid), or, with --from,
    the earlier run's grid. Sets args.grid (so config.json, --config and --resume reproduce it)
    and args.grid_choice (the reason, printed first)."""
    earlier = os.path.join(args.from_run, "config.json") if args.from_run else None
    if earlier and os.path.isfile(earlier):
        try:
            with open(earlier) as f:
                grid = json.load(f).get("grid", "auto")
        except ValueError:  # check_pretrained_run refuses it with one line
            grid = "auto"
        if grid != "auto":
            args.grid, args.grid_choice = grid, f"grid auto: {grid}, the grid of --from {args.from_run}"
            return
    grid, args.grid_choice = choose_grid(size, shape)
    args.grid = format_grid(grid)


def plan_run(args, comm) -> Plan:
    """Validate everything that can be checked before training (rank 0 only); raise UsageError."""
    size = comm.Get_size()
    note = parallel.check_slurm_tasks(comm)
    try:
        info = data.inspect(args.data)
    except data.DataError as e:
        msg = str(e)
        if not os.path.exists(args.data) and args.data == DEMO_DATA:
            msg += ("; create it from Fashion-MNIST with `python -m data_prep.fashion_mnist` "
                    "(or `make data`), or pass --data FILE")
        raise UsageError(msg) from None
    resolve_normalization(args, info)
    resolve_shuffle(args, info)
    note = "; ".join(n for n in (note, order_warning(args, info)) if n) or None
    try:
        if args.grid == "auto" and args.mode != "width":
            resolve_auto_grid(args, size, info.spatial_shape)
        # --mode width cuts channels, not the image: one "subdomain", the whole image (any --grid ignored)
        grid = (1,) * len(info.spatial_shape) if args.mode == "width" else parse_grid(args.grid)
        dec = Decomposition(info.spatial_shape, grid, 0 if args.mode == "width" else args.overlap)
        check_ranks(args, size, dec)
    except DecompositionError as e:
        raise UsageError(str(e)) from None
    check_out(args.out)
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
                               local_width_factor(C, K, info.spatial_shape, dec.subimage_shape,
                                                  dec.num_subdomains, cfg))
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
    return Plan(
        subnet_params=subnet_params, note=note, progress=progress,
        info=info, decomposition=dec, width_factor=wf, work=work_of(args),
        dnn_params=count_parameters(CoarseDNN(dec.num_subdomains * K, K, args.coarse_hidden)),
        local_params=count_parameters(build_cnn(C, K, dec.subimage_shape, cfg, wf)),
        global_params=count_parameters(build_cnn(C, K, info.spatial_shape, cfg)),
    )
