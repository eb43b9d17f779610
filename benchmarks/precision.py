"""python benchmarks/precision.py --data data/fashion_mnist.h5 [--runs RUN_32 RUN_BF16]

Prints figures (it is not a test):

1. Training throughput of --precision 32 and bf16-mixed side by side, in one process with one
   torch thread: the local CNN of the 2x2 demo (14x14 subimages, its width factor), the local
   CNN of 4x4 (7x7) and the global CNN (28x28), each trained by engine.train_classifier for one
   epoch of --samples images at batch 128 (Adam, cosine), rounds alternating 32 / bf16-mixed
   from the same initial weights; images/s (median over rounds, wall and CPU) and their ratio.
2. With --runs: two finished mpidd.train runs of the same job, float32 and bf16-mixed (e.g. the
   demo: mpirun -n 4 python -m mpidd.train --precision P --out runs/demo_P): every model's test
   accuracy in both and the difference, the two-level critical path, the global CNN's training
   CPU seconds and the coherent models' step times, and their ratios 32 / bf16.
"""

import argparse
import copy
import json
import os
import statistics

import torch

from mpidd.data import inspect, load_split
from mpidd.decomposition import Decomposition, parse_grid
from mpidd.parallel import tune_malloc, warm_up_torch
from mpidd.engine import PRECISIONS, TrainOptions, precision_error, to_channels_last, train_classifier
from mpidd.models import CNNConfig, build_cnn, local_width_factor



def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="data/fashion_mnist.h5", help="mpidd HDF5 data file")
    p.add_argument("--samples", type=int, default=6400, help="training images per timed epoch")
    p.add_argument("--rounds", type=int, default=3, help="rounds of (32 epoch, bf16-mixed epoch) per model")
    p.add_argument("--grids", default="2x2,4x4", help="local CNNs of these decompositions (and the global CNN)")
    p.add_argument("--runs", nargs=2, metavar=("RUN_32", "RUN_BF16"), default=None,
                   help="part 2: compare these two finished runs (float32, bf16-mixed)")
    p.add_argument("--skip-throughput", action="store_true", help="part 2 only")
    return p.parse_args()


def throughput(args):
    torch.set_num_threads(1)
    tune_malloc()    # as every mpidd rank does
    warm_up_torch()
    if precision_error("bf16-mixed", "cpu"):
        print(f"part 1 skipped: {precision_error('bf16-mixed', 'cpu')}")
        return
    info = inspect(args.data)
    C, K, image = info.channels, info.num_classes, info.spatial_shape
    x, y, _ = load_split(args.data, "train", tuple(slice(0, s) for s in image), rows=(0, args.samples))
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    cfg = CNNConfig(arch="vgg", width=48, input_mean=tuple(info.mean or ()), input_std=tuple(info.std or ()))
    opts = TrainOptions(epochs=1, batch_size=128, lr=2e-3, optimizer="adam", schedule="cosine")
    models = []
    for grid in [g for g in args.grids.split(",") if g]:
        dec = Decomposition(image, parse_grid(grid))
        wf = local_width_factor(C, K, image, dec.subimage_shape, dec.num_subdomains, cfg)
        box = (slice(None), slice(None)) + dec.slices(0)
        models.append((f"local CNN {grid} ({'x'.join(map(str, dec.subimage_shape))}, width factor {wf:.4g})",
                       build_cnn(C, K, dec.subimage_shape, cfg, wf), x[box]))
    models.append((f"global CNN ({'x'.join(map(str, image))})", build_cnn(C, K, image, cfg), x))
    print(f"part 1: training images/s, 1 thread, batch 128, one epoch of {len(y)} images per round, "
          f"median of {args.rounds} rounds (CPU: {cpu_name()})")
    print(f"{'model':<46}{'32 img/s':>10}{'bf16 img/s':>12}{'ratio':>7}{'32 CPU':>10}{'bf16 CPU':>10}{'ratio':>7}")
    for name, model, xs in models:
        to_channels_last(model, xs.dim())
        start = copy.deepcopy(model.state_dict())
        rates = {p: [] for p in PRECISIONS}
        for r in range(args.rounds + 1):  # round 0 warms up both paths and is not counted
            for p in PRECISIONS:
                model.load_state_dict(start)
                history, _ = train_classifier(model, (xs, y), None, opts, seed=r, precision=p)
                if r:
                    rates[p].append((history[0]["images_per_s"], len(y) / history[0]["cpu_seconds"]))
        wall = {p: statistics.median(v[0] for v in rates[p]) for p in PRECISIONS}
        cpu = {p: statistics.median(v[1] for v in rates[p]) for p in PRECISIONS}
        print(f"{name:<46}{wall['32']:>10.0f}{wall['bf16-mixed']:>12.0f}{wall['bf16-mixed'] / wall['32']:>6.2f}x"
              f"{cpu['32']:>10.0f}{cpu['bf16-mixed']:>10.0f}{cpu['bf16-mixed'] / cpu['32']:>6.2f}x", flush=True)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return "unknown"
    name = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "unknown")
    flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
    native = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return f"{name}, {', '.join(native) if native else 'no native bf16 instructions'}"


def compare_runs(paths):
    runs = []
    for path in paths:
        with open(os.path.join(path, "results.json")) as f:
            runs.append(json.load(f))
    a, b = runs
    print(f"\npart 2: {paths[0]} (precision {a.get('precision', '32')}) against {paths[1]} "
          f"(precision {b.get('precision', '32')}), {a['world_size']} ranks x {a['threads_per_rank']} threads")
    print(f"{'model':<32}{'test acc 32':>12}{'test acc bf16':>14}{'difference':>12}")
    worst = 0.0
    for name, acc in a["accuracy"].items():
        other = b["accuracy"].get(name, {}).get("test")
        if other is None:
            continue
        diff = 100 * (other - acc["test"])
        worst = max(worst, abs(diff))
        print(f"{name:<32}{100 * acc['test']:>11.2f}%{100 * other:>13.2f}%{diff:>+11.2f}")
    print(f"largest difference: {worst:.2f} points")
    ta, tb = a["timing"], b["timing"]
    rows = [("two-level critical path CPU s", ta["critical_path"]["cpu_s"], tb["critical_path"]["cpu_s"]),
            ("two-level critical path wall s", ta["critical_path"]["wall_s"], tb["critical_path"]["wall_s"])]
    if ta.get("global_train_cpu_s") and tb.get("global_train_cpu_s"):
        rows.append(("global CNN training CPU s", ta["global_train_cpu_s"], tb["global_train_cpu_s"]))
    for init in ("coherent_random", "coherent_pretrained"):
        if ta.get(init) and tb.get(init):
            rows.append((f"{init} step ms (rank 0)", ta[init]["step_ms_per_rank"][0], tb[init]["step_ms_per_rank"][0]))
    print(f"{'':<38}{'32':>10}{'bf16':>10}{'32/bf16':>9}")
    for name, x32, x16 in rows:
        print(f"{name:<38}{x32:>10.1f}{x16:>10.1f}{x32 / x16:>8.2f}x")


def main():
    args = parse_args()
    if not args.skip_throughput:
        throughput(args)
    if args.runs:
        compare_runs(args.runs)


if __name__ == "__main__":
    main()
