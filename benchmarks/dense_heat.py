"""Dense prediction on the heat problem: what the coarse exchange adds to local U-Nets, and how the
decomposed models compare with the global U-Net in error and in critical-path CPU time.

    python benchmarks/dense_heat.py                                  # 64x64: 2x2 and 4x4
    python benchmarks/dense_heat.py --dim 3 --size 32 --grids 2x2x2  # volumes
    python benchmarks/dense_heat.py --grids 2x2 --epochs 2 --train 800   # a quicker look

The data: `examples/insitu_heat.py --task regress --screening S --write` (sources f -> steady
temperatures u of the screened heat equation, heat travelling about 1/S grid spacings), written
once per (--dim, --size, sizes, S) under --out. Each grid is one `mpirun -n NP python -m
mpidd.train --task regress --mode compare` run with NP = min(--np, N) ranks (a rank trains N/NP
local U-Nets in turn; the critical path counts the slowest rank's subdomains as one rank per
subdomain would: results.json's per-subdomain CPU seconds; the coherent phases' are a rank's,
so with NP < N an upper bound: --np 16 runs 4x4 one subdomain a rank, oversubscribed on a small
machine, where each rank's CPU seconds still count its own work), launched by jobs/local.sh (MPIEXEC,
PYTHON, MPIEXEC_PREFLAGS as there; the solver likewise). One thread per rank. The runs stay
under --out/GRID. Printed per grid, one row per model (local U-Nets alone, two-level, coherent
from random weights and with transfer learning, the global U-Net trained domain parallel where
the tiles allow it, the global U-Net): test MAE, relative L2 error and
SSIM, the MAE against the global U-Net's, the critical path's CPU seconds (critical_paths) and
the global U-Net's training over it; and how much the exchange lowers the local-only MAE.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from mpidd.decomposition import parse_grid  # noqa: E402
LOCAL, TWO, GLOBAL = "local U-Nets (no exchange)", "two-level (coarse exchange)", "global U-Net"
RANDOM, TL = "coherent (random init)", "coherent (transfer learning)"
DOMAIN = "global U-Net, domain parallel"


def launcher(np_):
    """mpirun -n np_ python, as jobs/local.sh would (MPIEXEC, PYTHON, MPIEXEC_PREFLAGS)."""
    mpiexec = os.environ.get("MPIEXEC", os.path.join(ROOT, ".venv", "bin", "mpirun"))
    python = os.environ.get("PYTHON", os.path.join(ROOT, ".venv", "bin", "python"))
    return [mpiexec, "-n", str(np_), *os.environ.get("MPIEXEC_PREFLAGS", "").split(), python]


def critical_paths(r) -> dict:
    """CPU seconds of each decomposed model's critical path with one rank per subdomain: the
    slowest subdomain's local U-Net (training), the gather and rank 0's coarse training
    (two-level); transfer learning adds its coherent phase (the most CPU seconds of a rank,
    which with P < N runs several subdomains: an upper bound), the coherent model from random
    weights, and the domain-parallel global U-Net, are their phase alone."""
    per_subdomain = [v["cpu_s"] for st in r["per_rank"] for k, v in st["phases"].items() if k.startswith("subdomain_")]
    t = r["timing"]
    two = max(per_subdomain) + t["critical_path"]["gather_cpu_s"] + t["critical_path"]["coarse_cpu_s"]
    out = {TWO: two}
    if "coherent_pretrained" in t:
        out[TL] = two + t["coherent_pretrained"]["cpu_s_max"]
    if "coherent_random" in t:
        out[RANDOM] = t["coherent_random"]["cpu_s_max"]
    if "domain_parallel" in t:
        out[DOMAIN] = t["domain_parallel"]["cpu_s_max"]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python benchmarks/dense_heat.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, choices=(2, 3), default=2)
    p.add_argument("--size", type=int, default=64, help="grid points per axis (default 64)")
    p.add_argument("--grids", default="2x2,4x4")
    p.add_argument("--screening", type=float, default=0.1, help="h * kappa of the heat problem (default 0.1)")
    p.add_argument("--train", type=int, default=4000)
    p.add_argument("--val", type=int, default=500)
    p.add_argument("--test", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=10, help="local and global U-Nets (default 10)")
    p.add_argument("--coarse-epochs", type=int, default=10)
    p.add_argument("--np", type=int, default=4, help="at most this many ranks per run (default 4)")
    p.add_argument("--out", default="runs/dense_heat")
    p.add_argument("extra", nargs="*", help="after --: more mpidd.train flags for every run")
    args = p.parse_args(argv)
    os.chdir(ROOT)
    os.makedirs(args.out, exist_ok=True)
    data = os.path.join(args.out, f"heat{args.dim}d_{args.size}_s{args.screening:g}_{args.train}.h5")
    if not os.path.exists(data):
        solver_ranks = 2 ** args.dim
        cmd = launcher(solver_ranks) + ["examples/insitu_heat.py", "--dim", str(args.dim), "--size", str(args.size),
                                        "--screening", str(args.screening), "--task", "regress", "--train",
                                        str(args.train), "--val", str(args.val), "--test", str(args.test),
                                        "--write", data]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    rows = []
    for grid in args.grids.split(","):
        out = os.path.join(args.out, grid)
        cmd = ["bash", "jobs/local.sh", str(min(args.np, math.prod(parse_grid(grid)))), "--task", "regress",
               "--data", data, "--grid", grid, "--out", out, "--overwrite", "--epochs", str(args.epochs),
               "--coarse-epochs", str(args.coarse_epochs), "--batch-size", "32", "--coarse-batch-size", "32",
               "--threads", "1", "--log-interval", "0", *args.extra]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        with open(os.path.join(out, "results.json")) as f:
            r = json.load(f)
        rows.append((grid, {k: v["test"] for k, v in r["metrics"].items()}, critical_paths(r),
                     r["timing"]["global_train_cpu_s"], r["world_size"]))
    print(f"\n{args.dim}D heat, {args.size} points per axis, screening {args.screening:g}; "
          f"{args.train}/{args.val}/{args.test} samples; {args.epochs} epochs (coarse {args.coarse_epochs})")
    print(f"{'grid':<6}{'ranks':>6}  {'model':<30}{'test MAE':>10}{'rel L2':>9}{'SSIM':>7}{'vs global':>11}"
          f"{'crit. CPU s':>13}{'speed-up':>10}")
    for grid, m, crit, glob, ranks in rows:
        for name in (n for n in (LOCAL, TWO, RANDOM, TL, DOMAIN, GLOBAL) if n in m):
            cpu = glob if name == GLOBAL else crit.get(name)
            print(f"{grid:<6}{ranks:>6}  {name:<30}{m[name]['mae']:>10.5f}{m[name]['rel_l2']:>9.4f}"
                  f"{m[name]['ssim']:>7.3f}{m[name]['mae'] / m[GLOBAL]['mae'] - 1:>+11.1%}"
                  + (f"{cpu:>13.1f}{glob / cpu:>9.1f}x" if cpu else ""))
        print(f"{grid:<6}{'':>6}  the coarse exchange lowers the local-only test MAE by "
              f"{1 - m[TWO]['mae'] / m[LOCAL]['mae']:.1%} (two-level), "
              f"{1 - m[TL]['mae'] / m[LOCAL]['mae']:.1%} (transfer learning)" if TL in m else "")
    print("vs global: test MAE against the global U-Net's; crit. CPU s: the critical path with one rank per "
          "subdomain (see critical_paths), the global U-Net's training for it; speed-up: global / critical path")


if __name__ == "__main__":
    sys.exit(main())
