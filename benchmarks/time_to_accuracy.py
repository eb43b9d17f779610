"""python benchmarks/time_to_accuracy.py --data data/fashion_mnist.h5 --target 0.90

Time to a target test accuracy, measured side by side on this machine in one invocation, one
torch thread per process, the three methods one after another (each in its own subprocesses):

1. mpidd CNN-DNN, 2x2 grid, 4 ranks: `mpirun -n 4 python -m mpidd.train --mode twolevel
   --epochs E --threads 1` for E in --mpidd-epochs until the CNN-DNN's test accuracy reaches the
   target. Each E is a whole run (its own cosine schedule over E epochs); the figures are that
   run's results.json: timing.critical_path (max over ranks of load + local, + gather + coarse;
   it includes mpidd's own validation and probability inference) and the CNN-DNN's total_cpu_s.
   Epoch-granular: coarser than the curves of 2 and 3, which is conservative for mpidd.
2. The global CNN in one process, built and trained as `mpidd.train --mode global` does
   (build_cnn with the CLI defaults, normalised with the data file's mean/std, seed stream
   "global", engine.train_classifier, Adam 2e-3, batch 128, cosine over --global-epochs),
   test accuracy 4 times per epoch; time to target = load + training steps up to the first
   curve point at the target (evaluations excluded, as mpidd.results.time_to_accuracy).
3. The same global CNN trained data parallel with torch DistributedDataParallel (gloo) on 4
   processes: the same model, seed, optimizer and schedule, the same global batches of 128
   (each process takes every 4th sample of the batch: 32), plain BatchNorm (statistics of each
   process's 32 samples, DDP's default; running statistics broadcast from rank 0). Rank 0 tests
   4 times per epoch while the others wait; every rank's clocks stop meanwhile. Critical-path
   CPU = max over ranks, total = sum over ranks, both to the first point at the target.

The table goes to the terminal; the work folder keeps summary.json and time_to_accuracy.png
(test accuracy against critical-path CPU seconds: the curves, mpidd's runs, the target).

    --quick   plumbing check: a small subset file (--limit training images) in the work folder,
              mpidd E = 1, 2, the global CNNs 1 epoch, target 0.5
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD = 4  # processes of mpidd (one per subdomain of 2x2) and of DDP
CURVE_POINTS = 4  # test accuracy measurements per epoch (2 and 3)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="data/fashion_mnist.h5", help="mpidd HDF5 data file")
    p.add_argument("--target", type=float, default=None, help="target test accuracy (default 0.90; --quick 0.5)")
    p.add_argument("--mpidd-epochs", default="2,3,4,6", help="mpidd: epochs of the local CNNs to try, in order")
    p.add_argument("--global-epochs", type=int, default=4, help="epochs (cosine schedule) of the global CNN, 2 and 3")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="run folders and results (default: a new temporary folder)")
    p.add_argument("--quick", action="store_true", help="plumbing check on a --limit image subset, few epochs")
    p.add_argument("--limit", type=int, default=2048, help="--quick: training images of the subset")
    p.add_argument("--worker", choices=["single", "ddp"], help=argparse.SUPPRESS)  # internal: a subprocess
    p.add_argument("--result", help=argparse.SUPPRESS)  # internal: where a worker writes its JSON
    a = p.parse_args()
    if a.quick:
        a.mpidd_epochs, a.global_epochs = "1,2", 1  # 1,2: the loop over E is exercised too
    if a.target is None:
        a.target = 0.5 if a.quick else 0.90
    return a


# ---------------------------------------------------------------- workers (one process each)

def one_thread():
    """One torch thread per process, and what every mpidd rank does at start-up (mpidd.train):
    glibc kept from returning freed memory at every batch (else page faults inflate CPU time)
    and torch's lazy imports paid before any clock. Copied from mpidd.parallel.tune_malloc and
    warm_up_torch, because importing mpidd.parallel imports mpi4py (MPI_Init), which the workers
    must not do."""
    import ctypes
    import ctypes.util
    import torch
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 32 * 1024 * 1024)   # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1024 * 1024 * 1024)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass
    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([w])
    w.sum().backward()
    opt.step()


def load(path):
    """(info, train, test) whole images as mpidd.train --mode global reads them, with the
    (CPU, wall) seconds of reading (mpidd's critical path includes its load phase too)."""
    from mpidd import data
    cpu, wall = time.process_time(), time.perf_counter()
    info = data.inspect(path)
    whole = tuple(slice(0, s) for s in info.spatial_shape)
    train, test = (data.load_split(path, s, whole)[:2] for s in ("train", "test"))
    return info, train, test, (time.process_time() - cpu, time.perf_counter() - wall)


def global_cnn(info, seed):
    """The global CNN exactly as mpidd.methods.global_cnn.fit_global builds it with the CLI defaults."""
    import torch
    from mpidd.seeds import seed_for
    from mpidd.models import CNNConfig, build_cnn
    seed = seed_for(seed, "global")
    torch.manual_seed(seed)
    cfg = CNNConfig(input_mean=tuple(info.mean or ()), input_std=tuple(info.std or ()))
    return build_cnn(info.channels, info.num_classes, info.spatial_shape, cfg), seed


def worker_single(a):
    """Method 2: the global CNN in this one process, through engine.train_classifier."""
    one_thread()
    import torch
    from mpidd.engine import TrainOptions, train_classifier
    from mpidd.feed import batch_bounds
    info, train, test, (load_cpu, load_wall) = load(a.data)
    model, seed = global_cnn(info, a.seed)
    opts = TrainOptions(epochs=a.global_epochs, test_points=CURVE_POINTS, log_interval=1)
    bounds = batch_bounds(len(train[1]), opts.batch_size)
    steps = len(bounds) - 1
    # The curve points carry training CPU seconds but no wall seconds. The per-batch log record
    # (log_interval=1) carries images_per_s = images so far / training wall of the epoch so far
    # (curve evaluations excluded), so the wall at every step can be recovered from it.
    wall_at = {}

    def log(record):
        if "batch" in record:
            wall_at[record["epoch"], record["batch"]] = bounds[record["batch"]] / record["images_per_s"]
        else:
            wall_at[record["epoch"], steps] = record["seconds"]

    history, _ = train_classifier(model, train, None, opts, seed, log=log, test=test)
    curve, before = [], 0.0
    for r in history:
        for p in r["curve"]:
            step = round((p["epoch"] - (r["epoch"] - 1)) * steps)
            curve.append({"epoch": p["epoch"], "test_acc": p["test_acc"], "cpu_s": [load_cpu + p["cpu_s"]],
                          "wall_s": load_wall + before + wall_at[r["epoch"], step]})
        before += r["seconds"]
    write_json(a.result, {"curve": curve, "threads": torch.get_num_threads(), "torch": torch.__version__})


def worker_ddp(a):
    """Method 3: one of WORLD processes of DistributedDataParallel (gloo)."""
    one_thread()
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel
    from mpidd.engine import TrainOptions, evaluate, lr_factor, make_optimizer, to_channels_last, to_float
    from mpidd.feed import batch_bounds
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)  # MASTER_ADDR/PORT from the driver
    info, (x, y), test, (load_cpu, load_wall) = load(a.data)
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    model, seed = global_cnn(info, a.seed)  # the same weights on every rank (and DDP broadcasts rank 0's)
    model = DistributedDataParallel(to_channels_last(model, x.dim()))
    opts = TrainOptions(epochs=a.global_epochs)
    optimizer = make_optimizer(model, opts)
    bounds = batch_bounds(len(y), opts.batch_size)
    steps = len(bounds) - 1
    points = {round(k * steps / CURVE_POINTS) for k in range(1, CURVE_POINTS + 1)} - {0}  # as engine.run_epochs
    generator = torch.Generator().manual_seed(seed)  # the same permutations as the single process
    cpu, wall, curve = load_cpu, load_wall, []
    for epoch in range(1, opts.epochs + 1):
        order = torch.randperm(len(y), generator=generator)
        model.train()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for b in range(steps):
            # the single process's global batch, every WORLD-th sample on this rank; DDP averages
            # the ranks' gradients of their batch means = the gradient of the global batch mean
            idx = order[bounds[b]:bounds[b + 1]][rank::world]
            for g in optimizer.param_groups:
                g["lr"] = opts.lr * lr_factor(opts.schedule, (epoch - 1) * steps + b, steps * opts.epochs)
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(to_float(x[idx])), y[idx]).backward()
            optimizer.step()
            if b + 1 in points:  # clocks stop on every rank; rank 0 tests, the others wait for its result
                cpu, wall = cpu + time.process_time() - cpu0, wall + time.perf_counter() - wall0
                acc = [evaluate(model.module, *test)[1] if rank == 0 else None]
                model.train()
                dist.broadcast_object_list(acc, src=0)
                curve.append({"epoch": epoch - 1 + (b + 1) / steps, "test_acc": acc[0], "cpu_s": cpu, "wall_s": wall})
                cpu0, wall0 = time.process_time(), time.perf_counter()
    curves = [None] * world
    dist.all_gather_object(curves, curve)
    if rank == 0:  # per point: every rank's CPU seconds, the slowest rank's wall
        merged = [dict(p, cpu_s=[c[i]["cpu_s"] for c in curves], wall_s=max(c[i]["wall_s"] for c in curves))
                  for i, p in enumerate(curve)]
        write_json(a.result, {"curve": merged, "threads": torch.get_num_threads(), "torch": torch.__version__,
                              "batchnorm": "plain (per-process statistics)"})
    dist.barrier()  # no rank leaves before every rank has its gather (else one may hang in it)
    dist.destroy_process_group()


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


# ---------------------------------------------------------------- driver

def one_thread_env():
    """Environment of every subprocess: one OpenMP/MKL thread (torch.set_num_threads(1) as well)."""
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")


def quick_subset(a, path):
    """A small data file (the first --limit training images, a quarter as many val and test)."""
    from mpidd import writer
    return writer.write_subset(a.data, path, {"train": a.limit, "val": a.limit // 4, "test": a.limit // 4})


def run_mpidd(a, work):
    """Method 1: whole mpidd runs with growing E until the CNN-DNN reaches the target."""
    mpirun = os.path.join(os.path.dirname(sys.executable), "mpirun")
    mpirun = mpirun if os.path.exists(mpirun) else "mpirun"
    row, points = None, []
    for E in [int(e) for e in a.mpidd_epochs.split(",")]:
        out = os.path.join(work, f"mpidd_e{E}")
        cmd = [mpirun, "-n", str(WORLD), sys.executable, "-m", "mpidd.train", "--data", a.data, "--grid", "2x2",
               "--mode", "twolevel", "--epochs", str(E), "--threads", "1", "--seed", str(a.seed),
               "--no-report", "--overwrite", "--out", out]
        print(f"[mpidd] E={E}: {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        with open(os.path.join(work, f"mpidd_e{E}.log"), "w") as logf:
            rc = subprocess.run(cmd, cwd=ROOT, env=one_thread_env(), stdout=logf, stderr=subprocess.STDOUT).returncode
        process_wall = time.perf_counter() - t0
        if rc != 0:
            sys.exit(f"mpidd run failed (exit {rc}); see {logf.name}")
        with open(os.path.join(out, "results.json")) as f:
            r = json.load(f)
        cnn_dnn = next(m for m in r["models"] if m["name"] == "CNN-DNN")
        acc = r["accuracy"]["CNN-DNN"]["test"]
        print(f"[mpidd] E={E}: CNN-DNN test accuracy {acc:.4f} (process wall {process_wall:.1f} s)", flush=True)
        row = {"method": "mpidd CNN-DNN 2x2", "processes": r["world_size"], "reached": acc >= a.target,
               "epochs": E, "acc": acc, "wall_s": r["timing"]["critical_path"]["wall_s"],
               "process_wall_s": process_wall, "critical_cpu_s": r["timing"]["critical_path"]["cpu_s"],
               "total_cpu_s": cnn_dnn["total_cpu_s"], "final_acc": acc,
               "threads": r["threads_per_rank"], "versions": r["versions"]}
        points.append({"epoch": E, "test_acc": acc, "cpu_s": row["critical_cpu_s"], "wall_s": row["wall_s"]})
        if acc >= a.target:
            break
    return dict(row, curve=points)


def run_worker(a, work, kind):
    """Methods 2 and 3: this script as --worker subprocesses; returns (their JSON, process wall)."""
    result = os.path.join(work, f"{kind}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--data", a.data, "--seed", str(a.seed),
           "--global-epochs", str(a.global_epochs), "--result", result]
    env, procs = one_thread_env(), []
    t0 = time.perf_counter()
    if kind == "single":
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env))
    else:
        with socket.socket() as s:  # a free port for the gloo rendezvous
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        for rank in range(WORLD):
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=dict(
                env, RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))))
    codes = [procs[0].wait()]
    for p in procs[1:]:  # rank 0 has written the result: a rank still hanging in gloo's teardown is stopped
        try:
            codes.append(p.wait(timeout=60))
        except subprocess.TimeoutExpired:
            p.terminate()
            print(f"[{kind}] a worker hung at exit and was terminated; rank 0's result stands", flush=True)
            codes.append(p.wait())
            codes[-1] = 0 if os.path.exists(result) else codes[-1]
    if any(codes):
        sys.exit(f"{kind} worker failed (exit codes {codes})")
    with open(result) as f:
        return json.load(f), time.perf_counter() - t0


def curve_row(name, processes, res, process_wall, target):
    """Table row of a test-accuracy curve: the first point at the target (else the last point)."""
    curve = res["curve"]
    hit = next((p for p in curve if p["test_acc"] >= target), None)
    p = hit or curve[-1]
    return {"method": name, "processes": processes, "reached": hit is not None, "epochs": p["epoch"],
            "acc": p["test_acc"], "wall_s": p["wall_s"], "process_wall_s": process_wall,
            "critical_cpu_s": max(p["cpu_s"]), "total_cpu_s": sum(p["cpu_s"]), "final_acc": curve[-1]["test_acc"],
            "threads": res["threads"], "curve": curve}


def plot(summary: dict, path: str) -> str:
    """Test accuracy against critical-path CPU seconds: the global CNN's curves (a point 4 times
    an epoch; DDP: its slowest process) and mpidd's whole runs of E epochs (one point each),
    with the target. Returns path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in summary["rows"]:
        xs = [max(p["cpu_s"]) if isinstance(p["cpu_s"], list) else p["cpu_s"] for p in r["curve"]]
        ys = [100 * p["test_acc"] for p in r["curve"]]
        mpidd = r["method"].startswith("mpidd")
        ax.plot(xs, ys, marker="o" if mpidd else ".", ls="-" if not mpidd else "--",
                label=f"{r['method']} ({r['processes']} process{'es' if r['processes'] > 1 else ''})")
        if mpidd:
            for x, y, p in zip(xs, ys, r["curve"]):
                ax.annotate(f"E={p['epoch']}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.axhline(100 * summary["target"], color="grey", ls=":", label=f"target {100 * summary['target']:.1f}%")
    ax.set(xlabel="critical-path CPU seconds (the slowest process; evaluations excluded)",
           ylabel="test accuracy (%)", title="time to accuracy")
    ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main():
    a = parse_args()
    if a.worker:
        return (worker_single if a.worker == "single" else worker_ddp)(a)
    a.data = os.path.abspath(a.data)
    work = a.workdir or tempfile.mkdtemp(prefix="time_to_accuracy-")
    os.makedirs(work, exist_ok=True)
    if a.quick:
        a.data = quick_subset(a, os.path.join(work, "subset.h5"))
    print(f"work folder {work}; data {a.data}; target test accuracy {a.target}", flush=True)
    rows = [run_mpidd(a, work)]
    print("[single] global CNN, 1 process", flush=True)
    single, wall = run_worker(a, work, "single")
    rows.append(curve_row("global CNN", 1, single, wall, a.target))
    print(f"[ddp] global CNN, DDP gloo, {WORLD} processes", flush=True)
    ddp, wall = run_worker(a, work, "ddp")
    rows.append(curve_row("global CNN, DDP (gloo)", WORLD, ddp, wall, a.target))
    write_json(os.path.join(work, "summary.json"), {"target": a.target, "data": a.data, "rows": rows})

    print(f"\nTime to test accuracy {a.target:.3f} (first point at or above it; 'not reached': last point)")
    head = ("method", "processes", "epochs to target", "test acc at target", "wall s", "critical-path CPU s",
            "total CPU s", "final test acc")
    lines = [head] + [(r["method"], str(r["processes"]),
                       f"{r['epochs']:g}" if r["reached"] else f"not reached ({r['epochs']:g})",
                       f"{r['acc']:.4f}", f"{r['wall_s']:.1f}", f"{r['critical_cpu_s']:.1f}", f"{r['total_cpu_s']:.1f}",
                       f"{r['final_acc']:.4f}") for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for i, line in enumerate(lines):
        print(" | ".join(c.ljust(w) for c, w in zip(line, widths)))
        if i == 0:
            print("-+-".join("-" * w for w in widths))
    m = rows[0]
    print("\nprocess wall (launch to exit, full training, evaluations, start-up): "
          + ", ".join(f"{r['method']} {r['process_wall_s']:.1f} s" for r in rows))
    print(f"torch {single['torch']}, mpi4py {m['versions'].get('mpi4py')}, {m['versions'].get('mpi_library')}; "
          f"threads per process: mpidd {m['threads']}, single {single['threads']}, DDP {ddp['threads']}; "
          f"os.cpu_count() {os.cpu_count()}; DDP BatchNorm: {ddp['batchnorm']}")
    if WORLD > (os.cpu_count() or 1):
        print(f"note: {WORLD} processes on {os.cpu_count()} cores oversubscribe the machine: the wall seconds of "
              f"mpidd and DDP are inflated; CPU seconds stay comparable")
    print("wall s: mpidd timing.critical_path.wall_s; global CNNs: load + training steps to the point "
          "(evaluations excluded). mpidd is epoch-granular (whole runs of E epochs), the curves 4 points per epoch.")
    best = rows[0]["reached"] and all(rows[0]["critical_cpu_s"] < r["critical_cpu_s"] for r in rows[1:] if r["reached"])
    print(f"mpidd critical path shorter than both baselines: {'yes' if best else 'no'}"
          + ("" if all(r["reached"] for r in rows) else " (some method did not reach the target)"))
    print(f"results: {os.path.join(work, 'summary.json')}")
    print(f"figure: {plot({'target': a.target, 'rows': rows}, os.path.join(work, 'time_to_accuracy.png'))}")


if __name__ == "__main__":
    main()
