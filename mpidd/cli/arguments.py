"""Command line and config file of mpidd.train. No MPI.

Every option is a flag; `--config FILE` (TOML, or the JSON config.json of an earlier run)
supplies the same keys (hyphens or underscores). Command line beats file beats defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tomllib

from .. import __version__
from ..coherent_model import OUTPUTS
from ..data import TASKS
from ..engine import PRECISIONS
from ..metrics import REGRESSION_LOSSES, SEGMENTATION_LOSSES
from ..models import ARCHITECTURES
from ..options import COARSE_WEIGHT_DECAY, DENSE_LOSSES, TRANSFER_LR
from ..stream import ACCESS_MODES, MEMORY_FRACTION

DEMO_DATA = "data/fashion_mnist.h5"
MODES = ("twolevel", "coherent", "global", "compare", "width", "halo")


class ConfigError(ValueError):
    pass


def hidden_sizes(text) -> tuple[int, ...]:
    if isinstance(text, (list, tuple)):
        return tuple(int(h) for h in text)
    text = str(text).strip()
    return tuple(int(h) for h in text.split(",") if h.strip()) if text not in ("", "none") else ()


def prog(module: str) -> str:
    """The command's name in usage lines: its installed script (mpidd-train for mpidd.train)
    when run as one, else `python -m MODULE`."""
    script = "mpidd-" + module.rsplit(".", 1)[-1]
    return script if os.path.basename(sys.argv[0]) == script else f"python -m {module}"


def add_version(p: argparse.ArgumentParser):
    p.add_argument("--version", action="version", version=f"mpidd {__version__}")


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one short line (the full usage is in --help)."""

    def error(self, message):
        if message.startswith("unrecognized arguments: "):
            flags = message.split(": ", 1)[1]
            message = f"unknown {'flag' if len(flags.split()) == 1 else 'flags'} {flags}"
        self.exit(2, f"{self.prog}: error: {message}; see --help\n")


def get_args_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog=prog("mpidd.train"),
        description="CNN-DNN training by domain decomposition on MPI: one local CNN per subimage "
                    "(one rank each, no communication), an MPI Gatherv of the local class "
                    "probabilities, and a coarse DNN on rank 0; the same CNN-DNN trained as one "
                    "coherent model-parallel model (from random or pre-trained local CNNs); the "
                    "global CNN for comparison. Launch with "
                    "`mpirun -n P python -m mpidd.train ...`, P <= number of subdomains N, or "
                    "(--mode twolevel) a multiple of N: P/N ranks train each local CNN data parallel. "
                    "SIGTERM/SIGUSR1 save and exit with 75; continue with --resume RUN_DIR.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_version(p)
    p.add_argument("--config", default=None, help="TOML (or config.json) file with the same keys as these flags")
    g = p.add_argument_group("data and decomposition")
    g.add_argument("--data", default=DEMO_DATA, help="HDF5 file in the mpidd layout (data_prep writes it)")
    g.add_argument("--grid", default="auto",
                   help="subdomain grid AxB (AxBxC for volumes); auto: from the number of ranks P, one "
                        "subdomain per rank where P factors into a grid of subimages at most twice as long as "
                        "wide (16 -> 4x4, 8 -> 2x4, 8 -> 2x2x2 on volumes), else the smallest square grid with "
                        "at least P subdomains (5 -> 3x3; 1 -> 2x2), printed first and stored in config.json")
    g.add_argument("--overlap", type=int, default=0,
                   help="overlap of neighbouring subimages in pixels (--task segment | regress: a halo the local "
                        "U-Nets see around the tile they predict)")
    g.add_argument("--read-block", type=int, default=4096, help="samples per HDF5 hyperslab read")
    g.add_argument("--data-access", choices=ACCESS_MODES, default="auto",
                   help="memory: each rank reads its share of the data (its subimage boxes of every split) "
                        "into memory before training; stream: every phase reads its batches from the file as "
                        "it goes, a background thread ahead of the model, and never holds a whole split (the "
                        "same numbers: only the reading differs); auto: memory where a rank's share is at most "
                        f"{MEMORY_FRACTION:g} x the memory available to it (MemAvailable, or a cgroup's limit as "
                        "under Slurm, divided by the ranks on its node), else stream. Printed first and stored "
                        "in config.json as data_access_choice")
    g.add_argument("--shuffle", choices=("exact", "blocks"), default="exact",
                   help="the order of the training samples each epoch, the same at every rank count and data "
                        "access: exact: a uniform permutation; blocks: the file's chunk rows (its chunk extent "
                        "along the samples) in a random order, the samples of every --shuffle-buffer of them "
                        "shuffled together, so that streaming reads each chunk once an epoch (with exact, a "
                        "stream reads a batch's samples apart, which is fast only where a chunk holds few samples)")
    g.add_argument("--shuffle-buffer", type=int, default=8,
                   help="--shuffle blocks: chunk rows shuffled together (held at once when streaming)")
    g.add_argument("--normalize", choices=("file", "none"), default="file",
                   help="file: every model's input is normalised per channel, (x - mean) / std, with the "
                        "training split's statistics that data_prep wrote into the data file (none there: "
                        "not normalised); none: uint8 pixels / 255 and float32 values as stored. The "
                        "numbers used are stored in config.json and results.json as `normalization`")
    g = p.add_argument_group("what to train")
    g.add_argument("--mode", choices=MODES, default="compare",
                   help="twolevel: local CNNs, then average, vote and the coarse DNN; coherent: the "
                        "CNN-DNN trained as one model parallel model (see --init); global: the "
                        "global CNN on whole images (data parallel over the ranks); compare: the paper's comparison, "
                        "twolevel + coherent from random init + coherent with transfer learning + "
                        "global, in one table; width: the global CNN split along its channels into "
                        "--subnets thin sub-networks, trained in parallel, recomposed and trained "
                        "further, against the global CNN from random init (Gu et al.); halo (--task "
                        "segment or regress): the global U-Net trained domain parallel, each rank its "
                        "subdomains' tiles with a halo exchange before every convolution (compare "
                        "trains it too where 2**--unet-depth divides every tile axis)")
    g.add_argument("--global-alone", action="store_true",
                   help="--mode compare: train the global CNN on rank 0 with its own --threads, the "
                        "one-process baseline as the papers ran it, while the other ranks wait. Default: the "
                        "first rank of each node trains it with the cores of its node's waiting ranks too, data "
                        "parallel across nodes (its CPU seconds in results.json summed over those ranks)")
    g.add_argument("--global-threads", type=int, default=None, metavar="T",
                   help="--mode compare: torch threads of each rank that trains the global CNN (default: the "
                        "cores its node's ranks may run on). Small CNNs gain little from many threads: cap it "
                        "on large nodes")
    g.add_argument("--out", default=None, help="run directory (default: runs/<date-time>)")
    g.add_argument("--overwrite", action="store_true", help="reuse an existing run directory")
    g.add_argument("--dry-run", action="store_true",
                   help="print what this launch would do (the resolved configuration, the grid and why, which "
                        "rank trains which subdomains, the bytes each rank would read, its data access and an "
                        "estimate of its memory) and exit 0: nothing is trained, no run directory is made")
    g = p.add_argument_group("CNN family (local, global and coherent models)")
    g.add_argument("--arch", choices=ARCHITECTURES, default="vgg",
                   help="vgg: conv blocks with max-pools and a dense head; resnet: small ResNet "
                        "(stem, residual stages, global average pool); densenet: DenseNet (bottleneck dense "
                        "layers, growth rate --width/2, --dense-layers per block, transitions; --depth 4 --width 64 "
                        "is DenseNet-121); ctcnn: the CNN of the Keras example '3D image classification from CT "
                        "scans' (--depth conv layers of --width, --width, 2x, 4x ... channels, each with max-pool "
                        "and BatchNorm, global average pool, dense --hidden, dropout; --depth 4 --width 64 "
                        "--hidden 512 --dropout 0.3 is that model), in 3D on volumes and 2D on images")
    g.add_argument("--width", type=int, default=48, help="channels of the first block/stage of the global CNN")
    g.add_argument("--depth", type=int, default=2,
                   help="vgg: conv blocks (each ends in a max-pool); resnet: stages (each after the "
                        "first halves the map)")
    g.add_argument("--convs-per-block", type=int, default=2, help="vgg: 3x3 conv layers per block")
    g.add_argument("--blocks-per-stage", type=int, default=2,
                   help="resnet: residual blocks per stage (--depth 3 --blocks-per-stage 3 --width 16 "
                        "is ResNet-20)")
    g.add_argument("--dense-layers", default="6,12,24,16",
                   help="densenet: bottleneck layers of each dense block, comma separated (the first --depth "
                        "are used)")
    g.add_argument("--hidden", type=int, default=128, help="vgg, ctcnn: dense layer width of the global CNN head")
    g.add_argument("--head-pool", type=int, default=3, help="vgg: adaptive pool size before the dense head")
    g.add_argument("--dropout", type=float, default=0.0, help="dropout before the classifier")
    g.add_argument("--batchnorm", action=argparse.BooleanOptionalAction, default=True,
                   help="BatchNorm after every convolution")
    g.add_argument("--width-factor", type=float, default=None,
                   help="width factor of the local CNNs (default: chosen so a local CNN has about "
                        "1/N of the global CNN's parameters)")
    g = p.add_argument_group("optimisation (local and global CNNs)")
    g.add_argument("--epochs", type=int, default=3, help="epochs of every CNN (local and global)")
    g.add_argument("--batch-size", type=int, default=128, help="mini-batch size")
    g.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    g.add_argument("--optimizer", choices=("adam", "sgd"), default="adam", help="optimizer")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (Nesterov)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="L2 weight decay")
    g.add_argument("--schedule", choices=("cosine", "step", "constant"), default="cosine",
                   help="learning rate schedule, per step")
    g.add_argument("--eval-batch-size", type=int, default=256, help="batch size of inference and evaluation")
    g = p.add_argument_group("coarse DNN (rank 0)")
    g.add_argument("--coarse-hidden", default="64,64", help="hidden layer widths, comma separated")
    g.add_argument("--coarse-dropout", type=float, default=0.0, help="dropout after each hidden layer")
    g.add_argument("--coarse-input", choices=("logprob", "prob"), default="logprob",
                   help="logprob: the log of every local probability, standardised with the training "
                        "split's mean and std per input (stored in the model); prob: the probabilities as "
                        "they are, as in the papers (on small training sets it may not leave the uniform "
                        "prediction)")
    g.add_argument("--coarse-epochs", type=int, default=5, help="epochs, at least; the best on val is kept")
    g.add_argument("--coarse-steps", type=int, default=2000,
                   help="optimizer steps, at least: small training sets get more epochs (2,000 images at "
                        "batch 128: 125 epochs); 0: --coarse-epochs alone")
    g.add_argument("--coarse-lr", type=float, default=3e-3, help="peak learning rate (Adam, cosine)")
    g.add_argument("--coarse-weight-decay", type=float, default=None,
                   help="Adam's L2 weight decay (default 1e-4; 0 with --task segment | regress, whose small "
                        "field losses it would outweigh)")
    g.add_argument("--coarse-batch-size", type=int, default=128, help="mini-batch size")
    g = p.add_argument_group("coherent CNN-DNN (model parallel)")
    g.add_argument("--init", choices=("random", "pretrained"), default="pretrained",
                   help="--mode coherent: start from random weights, or from the local phase's trained "
                        "CNNs (transfer learning; the local phase runs first unless --from is given)")
    g.add_argument("--from", dest="from_run", default=None, metavar="RUN_DIR",
                   help="--init pretrained: take the local CNNs (and coarse DNN) from this earlier "
                        "run's checkpoints instead of training them")
    g.add_argument("--dnn-init", choices=("coarse", "random"), default="coarse",
                   help="--init pretrained: the DNN starts from the coarse phase's DNN or fresh")
    g.add_argument("--exchange", choices=OUTPUTS, default="probabilities",
                   help="what the local CNNs send to the DNN: class probabilities (softmax, as in "
                        "the paper) or logits")
    g.add_argument("--coherent-epochs", type=int, default=2, help="epochs of coherent training")
    g.add_argument("--coherent-lr", type=float, default=2e-3, help="peak learning rate from random init")
    g.add_argument("--transfer-lr", type=float, default=None,
                   help="peak learning rate from pre-trained weights (--init pretrained, and the "
                        "recomposed network of --mode width) (default 5e-4; 2e-3 with --task segment | regress)")
    g = p.add_argument_group("width decomposition (--mode width; Gu, Zhang, Liu & Cai 2022)")
    g.add_argument("--subnets", type=int, default=4,
                   help="M: sub-networks of width --width/M and the same depth, one per rank (P < M: "
                        "rank r trains r, r+P, ...); --width (and, vgg, --hidden) must divide by M")
    g.add_argument("--subnet-epochs", type=int, default=6,
                   help="epochs of every sub-network (a sub-network of width C/M costs a fraction of a "
                        "global epoch: 6 of them cost about one on Fashion-MNIST with M = 4)")
    g.add_argument("--shard", action="store_true",
                   help="sub-network m trains on training samples m, m+M, m+2M, ... only (disjoint "
                        "shards) instead of the full training set")
    g.add_argument("--offdiag-noise", type=float, default=0.0,
                   help="off-diagonal blocks of the recomposed weights: 0 (exact recomposition) or "
                        "noise of this many times the standard deviation of the layer's sub-network weights")
    g.add_argument("--target-acc", type=float, default=0.91,
                   help="report the critical-path CPU seconds to reach this test accuracy (recomposed "
                        "vs random init; --epochs of global training each)")
    g.add_argument("--curve-points", type=int, default=4,
                   help="test accuracy measurements per epoch of the recomposed and the random-init "
                        "network, for the time to --target-acc (their CPU time is not counted)")
    g = p.add_argument_group("dense prediction (--task segment | regress: local U-Nets, a coarse exchange)")
    g.add_argument("--task", choices=TASKS, default="classify",
                   help="classify: labels per image (the CNN-DNN). segment: a class per pixel (the data file's "
                        "targets are integer masks); regress: values per pixel (targets are float fields). "
                        "Dense tasks train a U-Net per subdomain on its subimages (--mode twolevel: those alone, "
                        "then with rank 0's coarse network, which takes every subdomain's bottleneck features and "
                        "returns a correction to each; --mode global: the U-Net on whole images; compare: all)")
    g.add_argument("--loss", choices=REGRESSION_LOSSES + SEGMENTATION_LOSSES, default=None,
                   help="dense loss (default: mse for regress, ce for segment; ce+dice adds the soft Dice loss)")
    g.add_argument("--unet-width", type=int, default=16,
                   help="channels of the global U-Net's first level (level l: width * 2**l; local U-Nets: "
                        "scaled by the width factor for about 1/N of its parameters)")
    g.add_argument("--unet-depth", type=int, default=2, help="U-Net levels (each halves the map while it can)")
    g.add_argument("--coarse-channels", type=int, default=32, help="channels of the coarse network's convolutions")
    g.add_argument("--coarse-layers", type=int, default=3, help="3x3 convolutions of the coarse network")
    g = p.add_argument_group("run")
    g.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR (stopped by SIGTERM/SIGUSR1, killed, or preempted) from "
                        "its last checkpoints, with its config.json; only --threads, --device, "
                        "--log-interval and the path of the same --data may differ, and the number of ranks "
                        "must be the same")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: one GPU per rank (node-local rank modulo the visible GPUs) when torch sees a "
                        "GPU, else the CPU")
    g.add_argument("--precision", choices=PRECISIONS, default="32",
                   help="32: float32 throughout. bf16-mixed: the forward passes of the local, global, coherent "
                        "and width CNNs in bfloat16 (torch.autocast), with float32 weights, gradients, "
                        "optimizer state and loss; the coarse DNN and what ranks exchange stay float32. Needs "
                        "a GPU with bfloat16 or a CPU with AVX512 (fast with AVX512-BF16 or AMX); refused "
                        "before training otherwise")
    g.add_argument("--seed", type=int, default=0, help="subdomain i's model is seeded from (seed, i)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch threads per rank (default: cores on the node / ranks on the node)")
    g.add_argument("--report", action=argparse.BooleanOptionalAction, default=True,
                   help="at the end, write RUN/report/report.md with its figures (python -m mpidd.report "
                        "RUN --out DIR does it again, also across runs)")
    g.add_argument("--log-interval", type=int, default=100,
                   help="progress line every this many batches of every model that trains (local CNNs, coarse DNN, "
                        "coherent, global, width; 0: one line an epoch); each line ends with the whole run's "
                        "estimated time left, and each phase starts with a numbered line")
    return p


def load_config_file(path: str) -> dict:
    if not os.path.exists(path):
        raise ConfigError(f"config file {path} does not exist")
    with open(path, "rb") as f:
        try:
            data = json.load(f) if path.endswith(".json") else tomllib.load(f)
        except (ValueError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"config file {path}: {e}") from None
    aliases = {"from": "from_run"}  # the flag --from stores to args.from_run
    return {aliases.get(k, k.replace("-", "_")): v for k, v in data.items()}


def check_file_value(path, action, value):
    """A config-file value must pass the same checks as the flag would (type, choices)."""
    flag = action.option_strings[-1]
    if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
        ok = isinstance(value, bool)
    elif action.type is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif action.type is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, str) or (action.dest in ("coarse_hidden", "dense_layers") and isinstance(value, list))
    if not ok:
        raise ConfigError(f"config file {path}: {flag} = {value!r} has the wrong type")
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"config file {path}: {flag} = {value!r} is not one of {', '.join(action.choices)}")
    return value


# Options of one launch, not of the run: config.json and the model file leave them out.
NOT_RECORDED = ("config", "overwrite", "out", "resume", "dry_run")

# Keys of a config.json that record what a run chose, not options: a --config file may hold them.
INFORMATIONAL = ("grid_choice", "normalization", "data_access_choice", "shuffle_block")

# What may differ when a run is resumed: how it runs, not what it computes. (--data may move:
# the data file itself is checked against the run's fingerprint of it.)
RESUME_MAY_CHANGE = ("threads", "device", "log_interval", "report", "resume", "config", "overwrite", "out", "data",
                     "data_access", "data_access_choice", "dry_run")


def same_value(a, b) -> bool:
    def norm(v):
        return list(v) if isinstance(v, tuple) else v
    return norm(a) == norm(b)


def parse_args(argv=None) -> argparse.Namespace:
    """Defaults < (with --resume: the run's config.json) < config file < command line."""
    parser = get_args_parser()
    pre, _ = parser.parse_known_args(argv)
    stored = None
    if pre.resume:
        path = os.path.join(pre.resume, "config.json")
        if not os.path.isfile(path):
            raise ConfigError(f"--resume {pre.resume}: no config.json there (not an mpidd run directory, or a "
                              f"run refused before it started)")
        stored = load_config_file(path)
        actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config", "version")}
        parser.set_defaults(**{k: v for k, v in stored.items() if k in actions})
    if pre.config:
        values = load_config_file(pre.config)
        actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config", "version")}
        unknown = sorted(set(values) - set(actions) - set(INFORMATIONAL))
        if unknown:
            raise ConfigError(f"config file {pre.config}: unknown keys {', '.join(unknown)}")
        # null (a config.json's unset option, e.g. threads) means the flag's default
        parser.set_defaults(**{k: check_file_value(pre.config, actions[k], v) for k, v in values.items()
                               if k in actions and (v is not None or actions[k].default is not None)})
    args = parser.parse_args(argv)
    if stored is not None:
        if args.out is not None and os.path.abspath(args.out) != os.path.abspath(pre.resume):
            raise ConfigError(f"--resume {pre.resume} continues in that directory: drop --out {args.out}")
        args.out = pre.resume
        for key, value in stored.items():
            if key not in RESUME_MAY_CHANGE and hasattr(args, key) and not same_value(getattr(args, key), value):
                flag = "--" + ("from" if key == "from_run" else key.replace("_", "-"))
                raise ConfigError(f"--resume {pre.resume}: that run has {flag} {value}, this command line "
                                  f"{getattr(args, key)}: a resumed run keeps its options (drop {flag}, or start "
                                  f"a new run)")
    try:
        args.dense_layers = hidden_sizes(args.dense_layers)
    except ValueError:
        raise ConfigError(f"--dense-layers must be comma-separated integers, got {args.dense_layers!r}") from None
    if not args.dense_layers or any(n < 1 for n in args.dense_layers):
        raise ConfigError(f"--dense-layers needs layer counts >= 1, got {args.dense_layers}")
    if args.arch == "densenet" and args.depth > len(args.dense_layers):
        raise ConfigError(f"--arch densenet --depth {args.depth}: --dense-layers names only "
                          f"{len(args.dense_layers)} blocks ({','.join(map(str, args.dense_layers))})")
    try:
        args.coarse_hidden = hidden_sizes(args.coarse_hidden)
    except ValueError:
        raise ConfigError(f"--coarse-hidden must be comma-separated integers, got {args.coarse_hidden!r}") from None
    if any(h < 1 for h in args.coarse_hidden):
        raise ConfigError(f"--coarse-hidden widths must be >= 1, got {args.coarse_hidden}")
    if args.transfer_lr is None:
        args.transfer_lr = TRANSFER_LR[args.task]
    for name in ("lr", "coarse_lr", "coherent_lr", "transfer_lr"):
        if not getattr(args, name) > 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.coarse_weight_decay is None:
        args.coarse_weight_decay = COARSE_WEIGHT_DECAY[args.task]
    for name in ("dropout", "coarse_dropout", "weight_decay", "coarse_weight_decay", "momentum"):
        if not 0 <= getattr(args, name) < 1 + (name.endswith("weight_decay")) * 1e9:
            raise ConfigError(f"--{name.replace('_', '-')} out of range: {getattr(args, name)}")
    for name in ("epochs", "batch_size", "coarse_epochs", "coarse_batch_size", "read_block", "shuffle_buffer",
                 "eval_batch_size", "width", "depth", "convs_per_block", "hidden", "head_pool",
                 "blocks_per_stage", "coherent_epochs", "subnets", "subnet_epochs", "curve_points", "unet_width",
                 "unet_depth", "coarse_channels", "coarse_layers"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.offdiag_noise < 0:
        raise ConfigError(f"--offdiag-noise must be >= 0, got {args.offdiag_noise}")
    if args.coarse_steps < 0:
        raise ConfigError(f"--coarse-steps must be >= 0, got {args.coarse_steps}")
    if not 0 < args.target_acc <= 1:
        raise ConfigError(f"--target-acc is a fraction in (0, 1], got {args.target_acc}")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")
    if args.global_threads is not None and args.global_threads < 1:
        raise ConfigError(f"--global-threads must be >= 1, got {args.global_threads}")
    if args.width_factor is not None and not 0 < args.width_factor <= 4:
        raise ConfigError(f"--width-factor must be in (0, 4], got {args.width_factor}")
    if args.from_run is not None and not (args.mode == "coherent" and args.init == "pretrained"):
        raise ConfigError("--from RUN_DIR gives pre-trained local CNNs: use it with --mode coherent --init pretrained")
    if args.task == "classify" and args.mode == "halo":
        raise ConfigError("--mode halo trains a U-Net domain parallel: use it with --task segment or regress")
    if args.task == "classify" and args.loss is not None:
        raise ConfigError("--loss is the loss of --task segment or regress (a classifier trains on cross-entropy)")
    if args.task != "classify":
        args.loss = args.loss or DENSE_LOSSES[args.task]
        if args.loss not in {"regress": REGRESSION_LOSSES, "segment": SEGMENTATION_LOSSES}[args.task]:
            raise ConfigError(f"--loss {args.loss} does not fit --task {args.task} (choose "
                              f"{', '.join(REGRESSION_LOSSES if args.task == 'regress' else SEGMENTATION_LOSSES)})")
    pretrained = args.mode == "compare" or (args.mode == "coherent" and args.init == "pretrained")
    if pretrained and args.dnn_init == "coarse" and args.exchange != "probabilities":
        raise ConfigError("--dnn-init coarse starts from the coarse DNN, which was trained on probabilities: "
                          "use --exchange probabilities, or --dnn-init random with --exchange logits")
    return args
