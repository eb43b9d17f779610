"""Scaling with the number of subdomains N: per-subdomain cost, parameters and accuracy of the
two-level CNN-DNN on Fashion-MNIST for the grids 1x1, 2x2, 4x4 and 7x7.

    python benchmarks/scaling.py --data data/fashion_mnist.h5                  # 3 epochs, 4 ranks
    python benchmarks/scaling.py --grids 2x2,4x4 --epochs 1 --np 2             # a quicker look

Each grid is one `mpirun -n NP python -m mpidd.train --mode twolevel --grid G` run (launched by
jobs/local.sh: MPIEXEC, PYTHON, MPIEXEC_PREFLAGS as there) with NP = min(--np, N) ranks, so with
N > NP a rank trains N/NP local CNNs one after the other. What one rank per subdomain would
cost is the CPU seconds of one local CNN (training + its probabilities), which results.json
records per subdomain; that is the per-rank column. The global CNN's cost is the 1x1 row's
local CNN (1x1: one local CNN of width factor 1 = the global CNN, plus a coarse DNN on its
probabilities). One thread per rank. The runs go to --out/GRID and are kept.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from mpidd.decomposition import parse_grid  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(prog="python benchmarks/scaling.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/fashion_mnist.h5")
    p.add_argument("--grids", default="1x1,2x2,4x4,7x7")
    p.add_argument("--epochs", type=int, default=3, help="epochs of every local CNN (default: 3, the demo's)")
    p.add_argument("--np", type=int, default=4, help="at most this many ranks per run (default: 4)")
    p.add_argument("--out", default="runs/scaling", help="run directories (default: runs/scaling)")
    p.add_argument("extra", nargs="*", help="after --: more mpidd.train flags for every run")
    args = p.parse_args(argv)
    os.chdir(ROOT)
    rows = []
    for grid in args.grids.split(","):
        n = math.prod(parse_grid(grid))
        out = os.path.join(args.out, grid)
        cmd = ["bash", "jobs/local.sh", str(min(args.np, n)), "--data", args.data, "--mode", "twolevel",
               "--grid", grid, "--epochs", str(args.epochs), "--threads", "1", "--no-report", "--overwrite",
               "--out", out, *args.extra]
        print(" ".join(cmd), flush=True)
        start = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL)
        if proc.returncode != 0:
            print(f"scaling: {grid} failed (exit {proc.returncode})", file=sys.stderr)
            return 1
        with open(os.path.join(out, "results.json")) as f:
            r = json.load(f)
        local = [m for m in r["models"] if m["kind"] == "local"]
        acc = {m["kind"]: m["test_acc"] for m in r["models"]}
        cp = r["timing"]["critical_path"]
        rows.append((grid, n, r["world_size"], r["decomposition"]["subimage_shape"], r["parameters"]["local"],
                     n * r["parameters"]["local"] + r["parameters"]["coarse_dnn"],
                     max(m["cpu_s"] for m in local), sum(m["cpu_s"] for m in local), cp["gather_cpu_s"],
                     cp["coarse_cpu_s"], min(m["test_acc"] for m in local), max(m["test_acc"] for m in local),
                     acc["average"], acc["vote"], acc["cnn_dnn"], time.perf_counter() - start))
    print(f"\nmpidd two-level CNN-DNN scaling on {args.data}, {args.epochs} epochs, 1 thread per rank, "
          f"{os.cpu_count()} cores; CPU s = process time; per-subdomain: the slowest local CNN (training + "
          f"probabilities), = a rank's cost with one subdomain per rank")
    head = (f"{'grid':>5}{'N':>4}{'P':>3}{'subimage':>9}{'local params':>13}{'CNN-DNN params':>15}"
            f"{'per-subdomain CPU s':>20}{'all locals CPU s':>17}{'gather':>8}{'coarse':>8}"
            f"{'locals min-max %':>17}{'avg %':>7}{'vote %':>7}{'CNN-DNN %':>10}{'run wall s':>11}")
    print(head)
    print("-" * len(head))
    for (grid, n, size, sub, lp, cp_, per, total, gather, coarse, lo, hi, avg, vote, dnn, wall) in rows:
        print(f"{grid:>5}{n:>4}{size:>3}{sub:>9}{lp:>13,}{cp_:>15,}{per:>20.1f}{total:>17.1f}{gather:>8.2f}"
              f"{coarse:>8.1f}{f'{100 * lo:.1f}-{100 * hi:.1f}':>17}{100 * avg:>7.2f}{100 * vote:>7.2f}"
              f"{100 * dnn:>10.2f}{wall:>11.0f}")
    if rows and rows[0][0] == "1x1":
        print("speed-up of one rank per subdomain over the global CNN (1x1's local CNN), per-subdomain CPU s: "
              + ", ".join(f"{row[0]} {rows[0][6] / row[6]:.1f}x" for row in rows[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
