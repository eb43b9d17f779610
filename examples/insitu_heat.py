"""In situ learning: a domain-decomposed heat solver feeds the two-level CNN-DNN.

    mpirun -n 4 python examples/insitu_heat.py                # 2D, 32x32 field, 2x2 process grid
    mpirun -n 8 python examples/insitu_heat.py --dim 3        # 3D, 16^3 field, 2x2x2 process grid
    mpirun -n 4 python examples/insitu_heat.py --tiny         # a smoke test (seconds)
    mpirun -n 8 python examples/insitu_heat.py --dim 3 --write data/heat3d.h5   # the volumes, as a data file
    mpirun -n 4 python examples/insitu_heat.py --size 64 --screening 0.1 --task regress --write data/heat64.h5
    mpirun -n 4 python examples/insitu_heat.py --online       # train while the solver runs (partial_fit)
    mpirun -n 4 python examples/insitu_heat.py --online --checkpoint run.pt     # ... and continue after a kill

--online trains while the solver runs: the held-out validation and test fields are solved first;
then the solver advances step by step, each step solving --step-samples new draws, and every
--every steps each rank hands the classifier its own blocks of the new fields
(TwoLevelClassifier.partial_fit), which trains on them and on its replay buffer (--buffer
samples) and forgets them. After each call it prints the samples seen, the test accuracy of the
CNN-DNN and the time of the solver's step against the classifier's call. Nothing is written
but the --checkpoint file (clf.save after each call; a run started again with the same
arguments continues from it, the solver skipping the draws already trained on). At the end
(--offline-check) the same training fields, kept for this purpose only, are fitted once offline
with clf.fit, for the accuracy an online run gives up.

--write FILE stores the solved fields (float32, (n, 1, D, H, W) in 3D) and their labels as an mpidd
data file instead of training, for `mpidd.train --data FILE` (the 3D end-to-end runs of the
README): rank 0 assembles the fields block by block of samples from every rank's box and
writes them through mpidd.writer.DatasetWriter, atomically. With --task regress the file is a
surrogate-model problem instead: images are the source fields f, targets the temperatures u
(n, 1, ...); with --task segment the targets are u's level sets, masks of 3 classes (cold below
0.1, warm below 0.3, hot from 0.3 of the largest temperature of the draws). --screening sets
h * kappa: 0.5 (the default) lets a source's heat fade within 2 grid spacings, 0.1 carries it
over 10, across the borders of small subdomains.

Every sample is the steady temperature of a plate (block) that loses heat to its surroundings:
-Laplace(u) + kappa^2 u = f on the unit square (cube), u = 0 on the boundary, where f is 1..K
Gaussian heat sources of random strength placed uniformly over the whole domain. The label is
the number of sources (class k: k + 1 sources).

The field lives on a Cartesian process grid (comm.Create_cart) that matches the classifier's
decomposition: rank r solves for, and keeps, exactly the subdomain box that the classifier's
`local_boxes` names for rank r. All samples are solved at once by a batched conjugate-gradient
iteration: halos go to the grid neighbours with Sendrecv (comm.Shift), the dot products are one
Allreduce of an (n,) vector per step. The parameter draws come from a seed shared by all
ranks (each rank evaluates f on its own box only). Each rank hands its own blocks of the
solutions to the classifier, on the solver's communicator: no field is ever gathered; only
halos (solver) and class probabilities (classifier: the local ones to rank 0, the combined ones
back) cross ranks.

A subdomain sees its own sources, and the others only through the faint tails that cross its
border (the heat loss makes them decay within a few grid points), so a local CNN can count
the sources in its box but must guess the rest; summing the counts takes all subdomains,
which is what the coarse DNN learns from the local class probabilities.
"""

import argparse
import contextlib
import sys
import time

import numpy as np
from mpi4py import MPI

import mpidd

DEFAULTS = {2: dict(size=32, train=16000, val=1000, test=2000, epochs=20, width=32),
            3: dict(size=16, train=6000, val=500, test=1000, epochs=20, width=16)}
TINY = dict(train=1600, val=200, test=400, epochs=5, width=16)

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--dim", type=int, choices=(2, 3), default=2)
parser.add_argument("--size", type=int, help="grid points per axis, even (2D: 32, 3D: 16)")
parser.add_argument("--classes", type=int, default=4, help="K: 1..K sources (default 4)")
parser.add_argument("--train", type=int, help="training samples (2D: 16000, 3D: 6000)")
parser.add_argument("--val", type=int, help="validation samples (2D: 1000, 3D: 500)")
parser.add_argument("--test", type=int, help="test samples (2D: 2000, 3D: 1000)")
parser.add_argument("--epochs", type=int, help="local CNN epochs (20)")
parser.add_argument("--width", type=int, help="CNN width before the local width factor (2D: 32, 3D: 16)")
parser.add_argument("--tiny", action="store_true", help="a smoke test: 16 (3D: 8) points per axis, few samples")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--write", metavar="FILE", help="write the fields as an mpidd data file instead of training")
parser.add_argument("--task", choices=("classify", "regress", "segment"), default="classify",
                    help="--write: images u with labels (classify), or sources f with targets u (regress) or u's "
                         "level sets (segment) (default classify)")
parser.add_argument("--screening", type=float, default=0.5,
                    help="h * kappa: heat fades by e over 1/screening grid spacings (default 0.5)")
parser.add_argument("--online", action="store_true", help="train while the solver runs (partial_fit)")
parser.add_argument("--step-samples", type=int, default=250, help="online: new draws the solver solves per step (250)")
parser.add_argument("--every", type=int, default=2, help="online: hand the new fields over every K solver steps (2)")
parser.add_argument("--buffer", type=int, default=8192, help="online: replay buffer, in samples (8192)")
parser.add_argument("--passes", type=int, default=2, help="online: passes over new fields and buffer per call (2)")
parser.add_argument("--checkpoint", metavar="FILE", help="online: save the classifier there after each call, and "
                    "continue from it when it exists")
parser.add_argument("--offline-check", action=argparse.BooleanOptionalAction, default=True,
                    help="online: at the end, fit once offline on the same training fields and compare (default on)")
args = parser.parse_args()
defaults = dict(DEFAULTS[args.dim], **(dict(TINY, size=16 if args.dim == 2 else 8) if args.tiny else {}))
for key, value in defaults.items():
    setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
if args.task != "classify" and not args.write:
    parser.error("--task regress and segment write a data file: add --write FILE (then mpidd.train trains on it)")
if args.size % 2:
    parser.error(f"--size must be even (two blocks per axis), got {args.size}")
size_1d = args.size

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
dims = (2,) * args.dim
if size != np.prod(dims):
    sys.exit(f"insitu_heat.py --dim {args.dim} runs on {np.prod(dims)} ranks (mpirun -n {np.prod(dims)}), "
             f"not {size}" if rank == 0 else 1)
cart = comm.Create_cart(dims, periods=[False] * args.dim, reorder=False)
coords = cart.Get_coords(cart.Get_rank())
block = size_1d // 2
box = tuple(slice(c * block, (c + 1) * block) for c in coords)
image_shape = (1,) + (size_1d,) * args.dim

# --- the solver: batched CG for -Laplace(u) + kappa^2 u = f, u = 0 outside, on this rank's block --
halo_bytes = 0
SCREENING = args.screening  # h * kappa: a source's heat decays by e over 1 / SCREENING grid spacings


def axis_slice(axis, s):
    return (slice(None),) * (axis + 1) + (s,)


def operator(u):
    """h^2 * (-Laplace u + kappa^2 u) of the (n, *block) local blocks; halos from the neighbours."""
    global halo_bytes
    out = (2 * args.dim + SCREENING ** 2) * u
    for d in range(args.dim):
        lower, upper = cart.Shift(d, 1)
        first = np.ascontiguousarray(u[axis_slice(d, 0)])
        last = np.ascontiguousarray(u[axis_slice(d, -1)])
        from_lower, from_upper = np.zeros_like(first), np.zeros_like(last)  # stay 0 at the boundary
        cart.Sendrecv(last, dest=upper, recvbuf=from_lower, source=lower)
        cart.Sendrecv(first, dest=lower, recvbuf=from_upper, source=upper)
        halo_bytes += last.nbytes * ((upper != MPI.PROC_NULL) + (lower != MPI.PROC_NULL))
        out[axis_slice(d, slice(1, None))] -= u[axis_slice(d, slice(None, -1))]
        out[axis_slice(d, slice(None, -1))] -= u[axis_slice(d, slice(1, None))]
        out[axis_slice(d, 0)] -= from_lower
        out[axis_slice(d, -1)] -= from_upper
    return out


def dot(a, b):
    """Per-sample global dot products: (n,) on every rank."""
    local = (a * b).reshape(len(a), -1).sum(axis=1)
    cart.Allreduce(MPI.IN_PLACE, local, op=MPI.SUM)
    return local


def solve(b, rtol=1e-6, maxiter=1000):
    x, r = np.zeros_like(b), b.copy()
    p, rr = r.copy(), dot(r, r)
    stop = rtol ** 2 * rr
    for it in range(1, maxiter + 1):
        ap = operator(p)
        alpha = rr / dot(p, ap)
        x += alpha.reshape(-1, *[1] * args.dim) * p
        r -= alpha.reshape(-1, *[1] * args.dim) * ap
        rr_new = dot(r, r)
        if (rr_new <= stop).all():  # the same decision on every rank: rr is global
            return x, it
        p = r + (rr_new / rr).reshape(-1, *[1] * args.dim) * p
        rr = rr_new
    return x, maxiter


def heat_sources(n, rng):
    """Labels and h^2 * f on this rank's box for n random draws (the same draws on every rank)."""
    h, sigma = 1.0 / (size_1d + 1), 1.0 / (size_1d + 1)
    counts = rng.integers(1, args.classes + 1, n)
    centres = rng.uniform(0.1, 0.9, (n, args.classes, args.dim))
    strength = rng.uniform(0.5, 1.5, (n, args.classes)) * (np.arange(args.classes) < counts[:, None])
    axes = np.meshgrid(*[(np.arange(size_1d)[s] + 1) * h for s in box], indexing="ij")
    f = np.zeros((n,) + axes[0].shape)
    for s in range(args.classes):
        r2 = sum((a[None] - centres[:, s, d].reshape(-1, *[1] * args.dim)) ** 2 for d, a in enumerate(axes))
        f += strength[:, s].reshape(-1, *[1] * args.dim) * np.exp(-r2 / (2 * sigma ** 2))
    return counts - 1, h ** 2 * f / (2 * np.pi * sigma ** 2) ** (args.dim / 2)


def make_classifier(**extra):
    return mpidd.TwoLevelClassifier(
        grid="x".join(map(str, dims)), overlap=0, epochs=args.epochs, batch_size=64, width=args.width,
        hidden=64, coarse_epochs=60, coarse_batch_size=128, seed=args.seed, comm=cart, threads=1, **extra)


def online():
    """Train while the solver runs (see the docstring): partial_fit every --every solver steps."""
    import os
    rng = np.random.default_rng(args.seed)
    held_labels, held_rhs = heat_sources(args.val + args.test, rng)  # the held-out fields, solved first
    held = solve(held_rhs)[0].astype(np.float32)[:, None]
    y_test, x_test = held_labels[args.val:], held[args.val:]
    resume = bool(args.checkpoint) and os.path.exists(args.checkpoint)
    if resume:
        clf = mpidd.TwoLevelClassifier.load(args.checkpoint, comm=cart)
    else:
        clf = make_classifier(buffer_size=args.buffer, partial_epochs=args.passes)
    (i,) = clf.local_boxes(image_shape) if not resume else clf.local_boxes(clf.image_shape_)
    done = clf.n_samples_seen_ if resume else 0
    steps = args.train // args.step_samples
    kept_x, kept_y, rows = [], [], []
    solver_s, train_s, step_s = 0.0, 0.0, []
    if rank == 0:
        print(f"online: {steps} solver steps of {args.step_samples} draws, partial_fit every {args.every} steps "
              f"(buffer {args.buffer}, {args.passes} passes a call)" + (f"; continuing after {done} samples" if resume
                                                                        else ""))
        print(f"{'seen':>7}{'test CNN-DNN':>14}{'average':>9}{'solver s/step':>15}{'partial_fit s':>15}")
    for step in range(steps):
        y_new, rhs_new = heat_sources(args.step_samples, rng)  # the draws go on in the same order on a restart
        if (step + 1) * args.step_samples <= done:
            continue  # trained on before the restart: not solved again
        t0 = time.perf_counter()
        fields = solve(rhs_new)[0].astype(np.float32)[:, None]
        step_s.append(time.perf_counter() - t0)
        solver_s += step_s[-1]
        rows.append((fields, y_new))
        if args.offline_check:
            kept_x.append(fields)
            kept_y.append(y_new)
        if len(rows) < args.every and step < steps - 1:
            continue
        x_new, y_batch = np.concatenate([r[0] for r in rows]), np.concatenate([r[1] for r in rows])
        rows = []
        t0 = time.perf_counter()
        clf.partial_fit({i: x_new}, y_batch, classes=np.arange(args.classes), image_shape=image_shape)
        call_s = time.perf_counter() - t0
        train_s += call_s
        if args.checkpoint:
            clf.save(args.checkpoint)
        scores = clf.score_all({i: x_test}, y_test, image_shape=image_shape)
        if rank == 0:
            print(f"{clf.n_samples_seen_:>7}{scores['cnn-dnn']:>14.3f}{scores['average']:>9.3f}"
                  f"{np.mean(step_s[-args.every:]):>15.2f}{call_s:>15.2f}", flush=True)
    calls = len(clf.history_.get("online", []))
    if rank == 0:
        print(f"\nsolver {solver_s:.1f} s for {len(step_s)} steps ({solver_s / max(len(step_s), 1):.2f} s a step); "
              f"partial_fit {train_s:.1f} s for {calls} calls ({train_s / max(len(step_s), 1):.2f} s per solver step, "
              f"{train_s / max(solver_s, 1e-9):.1f}x the solver's time)")
    if args.offline_check and kept_x and not resume:
        x_all, y_all = np.concatenate(kept_x), np.concatenate(kept_y)
        offline = make_classifier()
        t0 = time.perf_counter()
        offline.fit({i: x_all}, y_all, {i: held[:args.val]}, held_labels[:args.val], image_shape=image_shape)
        fit_s = time.perf_counter() - t0
        on, off = (c.score_all({i: x_test}, y_test, image_shape=image_shape) for c in (clf, offline))
        if rank == 0:
            print(f"offline fit on the same {len(y_all)} fields ({args.epochs} epochs): {fit_s:.1f} s")
            print(f"{'test accuracy':<16}{'online':>8}{'offline':>9}")
            for m in ("cnn-dnn", "average", "vote"):
                print(f"{m:<16}{on[m]:>8.3f}{off[m]:>9.3f}")
    sys.exit(0)


rng = np.random.default_rng(args.seed)  # the same parameter draws on every rank
n_total = args.train + args.val + args.test
if args.online:
    online()  # defined above; never returns
labels, rhs = heat_sources(n_total, rng)
cart.Barrier()
t0 = time.perf_counter()
fields, iterations = solve(rhs)
solver_s = time.perf_counter() - t0
fields = fields.astype(np.float32)[:, None]  # (n, 1, *block): this rank's block of every solution
splits = np.cumsum([args.train, args.val])
x_train, x_val, x_test = np.split(fields, splits)
y_train, y_val, y_test = np.split(labels, splits)



LEVELS = (0.1, 0.3)  # --task segment: cold | warm | hot, as fractions of the largest temperature


def write_fields(path, block_samples=256):
    """Rank 0 writes every split's whole fields: per block of samples, each rank's box is
    gathered to rank 0 (never more than one block of whole fields in memory). --task regress or
    segment: the sources as images, the temperatures (or their level sets) as targets."""
    from mpidd.writer import DatasetWriter
    sizes = {"train": args.train, "val": args.val, "test": args.test}
    classes = [f"{k + 1} source{'s' if k else ''}" for k in range(args.classes)]
    dense = args.task != "classify"
    sources = np.split((rhs / (1.0 / (size_1d + 1)) ** 2).astype(np.float32)[:, None], splits) if dense else None
    top = cart.allreduce(float(fields.max()), op=MPI.MAX)
    spatial = image_shape[1:]
    targets = {"regress": (image_shape, "float32"), "segment": (spatial, "uint8")}.get(args.task)
    source = (f"examples/insitu_heat.py --dim {args.dim} --size {size_1d} --classes {args.classes} "
              f"--screening {args.screening} --task {args.task} --seed {args.seed}")
    writer = DatasetWriter(path, image_shape, "float32", sizes, classes, targets=targets,
                           target_classes=["cold", "warm", "hot"] if args.task == "segment" else None,
                           attrs={"source": source}) if rank == 0 else None

    def whole(parts, shape):
        out = np.empty((len(parts[0][1]),) + shape, np.float32)
        for b, part in parts:
            out[(slice(None), slice(None)) + b] = part
        return out

    with writer if writer is not None else contextlib.nullcontext():
        for k, (split, x, y) in enumerate((("train", x_train, y_train), ("val", x_val, y_val),
                                           ("test", x_test, y_test))):
            for lo in range(0, len(x), block_samples):
                parts = cart.gather((box, x[lo:lo + block_samples]), root=0)
                inputs = cart.gather((box, sources[k][lo:lo + block_samples]), root=0) if dense else None
                if rank != 0:
                    continue
                u = whole(parts, image_shape)
                if args.task == "classify":
                    writer.write(split, u, y[lo:lo + block_samples])
                    continue
                t = u if args.task == "regress" else np.digitize(u[:, 0], [v * top for v in LEVELS]).astype(np.uint8)
                writer.write(split, whole(inputs, image_shape), y[lo:lo + block_samples], t)


if args.write:
    write_fields(args.write)
    if rank == 0:
        what = {"classify": f"{args.classes} classes", "regress": "sources -> temperatures",
                "segment": "sources -> cold/warm/hot masks"}[args.task]
        print(f"wrote {args.write}: {args.train}/{args.val}/{args.test} fields of "
              f"{'x'.join([str(size_1d)] * args.dim)} points, {what}; solver {solver_s:.1f} s")
    sys.exit(0)

# --- the two-level classifier, on the solver's communicator ------------------------------------
clf = make_classifier()
mine = clf.local_boxes(image_shape)
assert mine == {cart.Get_rank(): box}, f"rank {rank}: solver block {box} but the classifier wants {mine}"
(i,) = mine
t0 = time.perf_counter()
clf.fit({i: x_train}, y_train, {i: x_val}, y_val, image_shape=image_shape)
train_s = time.perf_counter() - t0
test = clf.score_all({i: x_test}, y_test, image_shape=image_shape)  # every model, one gather

sent = clf.bytes_sent_  # this rank's payload in the classifier's collectives, by kind
stats = comm.gather((rank, coords, test["local"][i], solver_s, halo_bytes, sent), root=0)
if rank == 0:
    print(f"\n{args.dim}D heat, {'x'.join([str(size_1d)] * args.dim)} grid points on a "
          f"{'x'.join(map(str, dims))} process grid; {args.train}/{args.val}/{args.test} samples, "
          f"K = {args.classes} classes (1..{args.classes} sources), chance {1 / args.classes:.3f}")
    print(f"solver: CG, {iterations} iterations for all {n_total} samples at once, {solver_s:.1f} s; "
          f"classifier fit {train_s:.1f} s\n")
    print(f"{'model':<22}{'val acc':>9}{'test acc':>10}")
    for j in range(clf.n_subdomains_):
        print(f"{f'local CNN {j} {tuple(stats[j][1])}':<22}{clf.local_scores_[j]['val']:>9.3f}{stats[j][2]:>10.3f}")
    for m in ("average", "vote", "cnn-dnn"):
        name = "CNN-DNN" if m == "cnn-dnn" else m
        print(f"{name:<22}{clf.scores_[m]['val']:>9.3f}{test[m]:>10.3f}")
    print("\nbytes sent by each rank: the solver's halos, and the classifier's (clf.bytes_sent_: probabilities = "
          "its local CNN's\noutputs gathered to rank 0, results = rank 0's broadcast of predictions and scores)")
    print(f"{'rank':<6}{'solver s':>9}{'halos':>13}{'probabilities':>15}{'results':>10}{'metadata':>10}"
          f"{'clf total':>12}")
    for r, _, _, sec, hb, b in stats:
        print(f"{r:<6}{sec:>9.1f}{hb:>13,}{b['probabilities']:>15,}{b['results']:>10,}{b['metadata']:>10,}"
              f"{b['total']:>12,}")
    others = sum(b[k] for *_, b in stats for k in ("parameters", "exchange", "gradients"))
    print(f"classifier parameters, exchange and gradients sent: {others} bytes; fields gathered: 0 bytes")
