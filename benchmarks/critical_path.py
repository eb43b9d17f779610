"""The two-level critical path, phase by phase, against its FLOP limit.

    python benchmarks/critical_path.py --data data/fashion_mnist.h5 --global-run runs/demo
    python benchmarks/critical_path.py --grids 2x2 --precisions 32 --epochs 1   # a quicker look

For every grid and precision, one `mpirun -n P python -m mpidd.train --mode twolevel --grid G
--precision X` run (jobs/local.sh: MPIEXEC, PYTHON, MPIEXEC_PREFLAGS as there; P = min(--np, N),
1 thread per rank), then from its results.json and metrics.csv the critical path with one rank
per subdomain, as CPU seconds (process time):

    load       reading the rank's subimages (the slowest rank's)
    train      the slowest subdomain's training steps (metrics.csv, every epoch)
    probs      its class probabilities on every split (the rank's 'probabilities' phase, shared
               out over the rank's subdomains where P < N)
    val        the rest of its local phase: validation every epoch, model set-up
    gather     the MPI gather of the probabilities (the slowest rank's)
    coarse     rank 0: the coarse DNN, average and vote
    path       load + train + probs + val + gather + coarse

With P = N this is the run's own timing.critical_path; with P < N a rank trains its subdomains one
after another and the run's path is longer (the "P ranks" column). "FLOP limit" is the global
CNN's forward FLOPs over a local CNN's (results.json flops): the speed-up one local CNN per rank
would have if a FLOP cost the same in both. With --global-run (a run that trained the global CNN
with the same epochs, e.g. `make demo`'s runs/demo), "x global" is its timing.global_train_cpu_s
over the path. Runs go to --out/GRID-PRECISION and are kept.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from mpidd.decomposition import parse_grid  # noqa: E402
from mpidd.results import seconds  # noqa: E402
from precision import cpu_name  # noqa: E402  (benchmarks/precision.py: the CPU and its bf16 instructions)

PHASES = ("load", "train", "probs", "val", "gather", "coarse")


def breakdown(out: str) -> dict:
    """The critical path with one rank per subdomain, phase by phase, from a finished run."""
    with open(os.path.join(out, "results.json")) as f:
        r = json.load(f)
    train = {}
    with open(os.path.join(out, "metrics.csv")) as f:
        for row in csv.DictReader(f):
            if row["model"].startswith("local_"):
                i = int(row["model"].split("_")[1])
                train[i] = train.get(i, 0.0) + float(row["cpu_seconds"])

    def cpu(st, name):
        return seconds(st, "cpu_s", name)
    subdomain = {}  # i: (its local phase CPU s, its share of its rank's probabilities)
    for st in r["per_rank"]:
        for i in st["subdomains"]:
            subdomain[i] = (cpu(st, f"subdomain_{i}"), cpu(st, "probabilities") / len(st["subdomains"]))
    slowest = max(subdomain, key=lambda i: subdomain[i][0])
    local, probs = subdomain[slowest]
    parts = {"load": max(cpu(st, "load") for st in r["per_rank"]), "train": train[slowest], "probs": probs,
             "val": local - train[slowest] - probs, "gather": max(cpu(st, "gather") for st in r["per_rank"]),
             "coarse": cpu(r["per_rank"][0], "coarse")}
    acc = {m["kind"]: m["test_acc"] for m in r["models"]}
    return {"parts": parts, "path": sum(parts.values()), "run_path": r["timing"]["critical_path"]["cpu_s"],
            "ranks": r["world_size"], "flop_limit": r["flops"]["global_forward"] / r["flops"]["local_forward"],
            "cnn_dnn": acc["cnn_dnn"], "average": acc["average"], "subimage": r["decomposition"]["subimage_shape"]}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python benchmarks/critical_path.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/fashion_mnist.h5")
    p.add_argument("--grids", default="2x2,4x4,7x7")
    p.add_argument("--precisions", default="32,bf16-mixed", help="comma separated (mpidd.train --precision)")
    p.add_argument("--epochs", type=int, default=3, help="epochs of every local CNN (default: 3, the demo's)")
    p.add_argument("--np", type=int, default=16, help="at most this many ranks per run (default: 16)")
    p.add_argument("--global-run", default=None, help="a run directory whose results.json has the global CNN's "
                                                      "training CPU s (e.g. runs/demo)")
    p.add_argument("--out", default="runs/critical_path", help="run directories (default: runs/critical_path)")
    p.add_argument("extra", nargs="*", help="after --: more mpidd.train flags for every run")
    args = p.parse_args(argv)
    os.chdir(ROOT)
    reference = None
    if args.global_run:
        with open(os.path.join(args.global_run, "results.json")) as f:
            reference = json.load(f)["timing"].get("global_train_cpu_s")
        if reference is None:
            p.error(f"{args.global_run}/results.json has no global_train_cpu_s: pass a run that trained the global CNN")
    rows, start = [], time.perf_counter()
    for grid in args.grids.split(","):
        for precision in args.precisions.split(","):
            out = os.path.join(args.out, f"{grid}-{precision}")
            n = math.prod(parse_grid(grid))
            cmd = ["bash", "jobs/local.sh", str(min(args.np, n)), "--data", args.data, "--mode", "twolevel",
                   "--grid", grid, "--epochs", str(args.epochs), "--precision", precision, "--threads", "1",
                   "--no-report", "--overwrite", "--out", out, *args.extra]
            print(" ".join(cmd), flush=True)
            if subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode != 0:
                print(f"critical_path: {grid} {precision} failed", file=sys.stderr)
                return 1
            rows.append((grid, precision, breakdown(out)))
    print(f"\ntwo-level critical path with one rank per subdomain, CPU s (process time), {args.epochs} epochs, "
          f"1 thread per rank, {cpu_name()}, {os.cpu_count()} cores, {time.perf_counter() - start:.0f} s wall")
    head = (f"{'grid':>5} {'precision':>10} {'subimage':>8}" + "".join(f"{k:>8}" for k in PHASES)
            + f"{'path':>8}{'P ranks':>9}{'coarse %':>9}{'FLOP limit':>11}{'x global':>9}{'CNN-DNN %':>10}{'avg %':>7}")
    print(head)
    print("-" * len(head))
    for grid, precision, b in rows:
        ranks = f"{b['run_path']:.1f}/{b['ranks']}"
        speedup = f"{reference / b['path']:.1f}" if reference else "-"
        print(f"{grid:>5} {precision:>10} {b['subimage']:>8}" + "".join(f"{b['parts'][k]:>8.2f}" for k in PHASES)
              + f"{b['path']:>8.2f}{ranks:>9}{100 * b['parts']['coarse'] / b['path']:>9.1f}{b['flop_limit']:>11.1f}"
              f"{speedup:>9}{100 * b['cnn_dnn']:>10.2f}{100 * b['average']:>7.2f}")
    if reference:
        print(f"x global: {reference:.1f} CPU s of global CNN training ({args.global_run}) / path")
    print("P ranks: the run's own critical path (CPU s) / its ranks; coarse %: coarse / path")
    return 0


if __name__ == "__main__":
    sys.exit(main())
