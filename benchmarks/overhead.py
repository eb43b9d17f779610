"""python benchmarks/overhead.py --data data/fashion_mnist.h5

Prints figures (it is not a test), in one process with one torch thread:

1. mpidd's training loop (engine.train_classifier) against a plain PyTorch loop, on the local
   CNN of subdomain 0 of a 2x2 decomposition: the same model object reset to the same initial
   weights, the same uint8 tensors, batch 128, Adam 2e-3 with the cosine schedule set per step,
   rounds alternating plain / mpidd; images/s (median of rounds, wall and CPU) and their ratio.
2. The two-level critical path against the FLOP limit: forward FLOPs per image of the global CNN
   (28x28, width factor 1) and of the local CNNs (2x2 -> 14x14 and 4x4 -> 7x7); measured CPU
   seconds per training image of each (plain loop); measured speedup global/local as a fraction
   of its FLOP limit; the local CNN at batch 128 and 512; the top ops of a torch.profiler run.
"""

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from mpidd.data import inspect, load_split
from mpidd.decomposition import Decomposition, format_grid, parse_grid
from mpidd.parallel import tune_malloc, warm_up_torch
from mpidd.engine import TrainOptions, lr_factor, make_optimizer, to_channels_last, to_float, train_classifier
from mpidd.models import CNNConfig, build_cnn, count_parameters, local_width_factor

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
p.add_argument("--data", default="data/fashion_mnist.h5", help="mpidd HDF5 data file")
p.add_argument("--samples", type=int, default=8192, help="training images of part 1 (one epoch per run)")
p.add_argument("--rounds", type=int, default=3, help="part 1: rounds of (plain epoch, mpidd epoch)")
p.add_argument("--batch-size", type=int, default=128)
p.add_argument("--grids", default="2x2,4x4", help="part 2: decompositions to compare with the global CNN")
p.add_argument("--steps", type=int, default=20, help="part 2: timed training steps per model (after 2 warm-up)")
p.add_argument("--profile-steps", type=int, default=20, help="part 2: profiled training steps per model")
p.add_argument("--seed", type=int, default=0)
args = p.parse_args()

torch.set_num_threads(1)
tune_malloc()    # as every mpidd rank does: without it, page faults inflate the small CNNs' CPU time
warm_up_torch()  # torch's lazy imports at the first optimizer.step, out of every timing
info = inspect(args.data)
C, K, image = info.channels, info.num_classes, info.spatial_shape
cfg = CNNConfig(arch="vgg", width=48)
opts = TrainOptions(epochs=1, batch_size=args.batch_size, lr=2e-3, optimizer="adam", schedule="cosine")
B = args.batch_size


def local_model(grid):
    """The local CNN of `grid`, built as mpidd builds it (width factor for ~1/N of the parameters)."""
    dec = Decomposition(image, parse_grid(grid))
    wf = local_width_factor(C, K, image, dec.subimage_shape, dec.num_subdomains, cfg)
    return dec, wf, to_channels_last(build_cnn(C, K, dec.subimage_shape, cfg, wf), len(image) + 2)


def plain_train(model, x, y, steps=None, batch_size=B, seed=0):
    """The plain PyTorch loop: a fixed permutation, the same per-step cosine lr as run_epochs;
    no loss.item() or accuracy count per step (that bookkeeping is part of what mpidd costs)."""
    model.train()
    optimizer = make_optimizer(model, opts)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    total = steps or len(y) // batch_size  # len(y) is a multiple of the batch here (no short last batch)
    for b in range(total):
        idx = order[(b * batch_size) % len(y):][:batch_size]
        for g in optimizer.param_groups:
            g["lr"] = opts.lr * lr_factor(opts.schedule, b, total)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(to_float(x[idx])), y[idx]).backward()
        optimizer.step()


def timed(fn, *a, **k):
    w, c = time.perf_counter(), time.process_time()
    fn(*a, **k)
    return time.perf_counter() - w, time.process_time() - c


# ---- 1. mpidd's loop against a plain loop -----------------------------------------------------
n = args.samples - args.samples % B
torch.manual_seed(args.seed)  # the initial weights
dec, wf, model = local_model("2x2")
x, y, _ = load_split(args.data, "train", dec.slices(0), rows=(0, n))  # uint8, as mpidd keeps it
x, y = torch.from_numpy(x), torch.from_numpy(y)
init = copy.deepcopy(model.state_dict())  # load_state_dict copies into the channels-last weights
print(f"part 1: local CNN of 2x2 on {format_grid(image)} -> {dec.subimage_shape}, width factor {wf}, "
      f"{count_parameters(model)} parameters; {n} images {tuple(x.shape)} {x.dtype}, batch {B}, 1 thread")

model.load_state_dict(init)  # warm-up: oneDNN primitives and allocator pools of both loops
plain_train(model, x, y, steps=4)
train_classifier(model, (x[:4 * B], y[:4 * B]), None, opts, args.seed)
assert model.features[0].weight.is_contiguous(memory_format=torch.channels_last)  # both loops: NHWC

runs = {"plain": [], "mpidd": []}
for r in range(args.rounds):
    model.load_state_dict(init)
    runs["plain"].append(timed(plain_train, model, x, y, seed=args.seed))
    plain_weights = copy.deepcopy(model.state_dict())
    model.load_state_dict(init)
    # val=None: run_epochs skips validation (val_loss/val_acc NaN), so only training is timed
    runs["mpidd"].append(timed(train_classifier, model, (x, y), None, opts, args.seed))
    print(f"  round {r + 1}: plain {n / runs['plain'][-1][0]:7.0f} img/s, "
          f"mpidd {n / runs['mpidd'][-1][0]:7.0f} img/s (wall)")
# the same batch order (randperm of a Generator seeded alike) and steps: both loops did the same work
same = all(torch.equal(v, plain_weights[k]) for k, v in model.state_dict().items())
print(f"  final weights of the last round identical in both loops: {same}")
rate = {k: [statistics.median(n / t[i] for t in v) for i in (0, 1)] for k, v in runs.items()}
for k, (wall, cpu) in rate.items():
    print(f"  {k:6s} {wall:7.0f} img/s wall  {cpu:7.0f} img/s CPU  (median of {args.rounds})")
print(f"  mpidd / plain = {rate['mpidd'][0] / rate['plain'][0]:.3f} wall, "
      f"{rate['mpidd'][1] / rate['plain'][1]:.3f} CPU  (target >= 0.95)")


# ---- 2. two-level critical path against the FLOP limit ----------------------------------------
def forward_flops(model, shape):
    """Forward FLOPs of one image: convolutions and matmuls only (FlopCounterMode counts no
    BatchNorm, ReLU or pooling); a training step is about 3x this (forward + 2 backward)."""
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(to_float(torch.zeros(1, C, *shape, dtype=torch.uint8)))
    conv = sum(f for op, f in counter.get_flop_counts()["Global"].items() if "convolution" in str(op))
    return counter.get_total_flops(), conv


def seconds_per_image(model, x, y, batch_size=B):
    """CPU seconds per training image of the plain loop (2 warm-up steps, then args.steps)."""
    plain_train(model, x, y, steps=2, batch_size=batch_size)
    _, cpu = timed(plain_train, model, x, y, steps=args.steps, batch_size=batch_size)
    return cpu / (args.steps * batch_size)


n2 = 4 * 512  # enough images for batch 512 without repeating a batch in one step
xg, yg, _ = load_split(args.data, "train", tuple(slice(0, s) for s in image), rows=(0, n2))
xg, yg = torch.from_numpy(xg), torch.from_numpy(yg)
glob = to_channels_last(build_cnn(C, K, image, cfg), len(image) + 2)
fg, cg = forward_flops(glob, image)
tg = seconds_per_image(glob, xg, yg)
print(f"\npart 2: forward FLOPs per image (conv + linear only; training ~3x), CPU s per training image "
      f"(plain loop, batch {B}, {args.steps} steps, 1 thread)")
print(f"  global CNN {format_grid(image)}: {fg / 1e6:7.2f} MFLOP fwd, {1e3 * tg:7.3f} ms/img, "
      f"{3 * fg / tg / 1e9:5.1f} GFLOP/s (3x fwd)")
models = {"global": (glob, xg, yg, cg)}
for grid in args.grids.split(","):
    dec, wf, loc = local_model(grid)
    N = dec.num_subdomains
    xl = xg[(slice(None), slice(None), *dec.slices(0))].contiguous()
    fl, cl = forward_flops(loc, dec.subimage_shape)
    tl = seconds_per_image(loc, xl, yg)
    limit = fg / fl
    print(f"  local CNN {grid} {format_grid(dec.subimage_shape)} (wf {wf}, N={N}): {fl / 1e6:7.2f} MFLOP fwd, "
          f"{1e3 * tl:7.3f} ms/img, {3 * fl / tl / 1e9:5.1f} GFLOP/s")
    print(f"    FLOP limit global/local = {limit:6.2f} (one local CNN per rank), "
          f"global/(N*local) = {fg / (N * fl):5.2f} (all N on one core)")
    print(f"    measured speedup global/local = {tg / tl:6.2f} = {tg / tl / limit:.2f} of the limit")
    t512 = seconds_per_image(loc, xl, yg, batch_size=512)  # what a fixed cost per step weighs
    print(f"    batch 128: {1e3 * tl:.3f} ms/img, batch 512: {1e3 * t512:.3f} ms/img "
          f"({tl / t512:.2f}x faster per image at 512)")
    models[f"local {grid}"] = (loc, xl, yg, cl)

# Where the time goes: self CPU time per op (an op's own time, without the ops it calls), the
# top ops and their sum per layer type; convolutions' FLOP/s = 3 x their forward FLOPs / time.
TYPES = {"conv": ("convolution",), "batchnorm": ("batch_norm",), "relu": ("threshold", "clamp_min", "relu"),
         "pool": ("pool",), "linear": ("addmm", "aten::mm", "aten::t"), "adam": ("Optimizer", "_foreach")}
for name, (m, xm, ym, conv_flops) in models.items():
    plain_train(m, xm, ym, steps=2)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        wall, cpu = timed(plain_train, m, xm, ym, steps=args.profile_steps)
    events, per_step = prof.key_averages(), 1e3 * args.profile_steps  # us -> ms per step
    total = sum(e.self_cpu_time_total for e in events)
    # the profiler's "CPU time" is wall time inside the op: with wall > CPU, other processes shared the core
    print(f"\n  {name}: top 8 ops by self CPU time ({args.profile_steps} steps, batch {B}; {total / per_step:.1f} "
          f"ms/step in ops, {1e3 * wall / args.profile_steps:.1f} wall, {1e3 * cpu / args.profile_steps:.1f} CPU)")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]:
        print(f"    {e.key:42s} {e.self_cpu_time_total / per_step:8.2f} ms/step "
              f"{100 * e.self_cpu_time_total / total:5.1f}%  {e.count / args.profile_steps:5.0f} calls/step")
    by_type = dict.fromkeys([*TYPES, "other"], 0.0)
    for e in events:
        by_type[next((t for t, keys in TYPES.items() if any(k in e.key for k in keys)),
                     "other")] += e.self_cpu_time_total
    print("    by type: " + ", ".join(f"{t} {100 * v / total:.0f}%" for t, v in by_type.items())
          + f"; convolutions at {3 * conv_flops * B * args.profile_steps / (by_type['conv'] * 1e-6) / 1e9:.0f} GFLOP/s")
