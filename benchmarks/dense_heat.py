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
subdomain would: results.json's per-subdomain CPU seconds), launched with the MPIEXEC and PYTHON
of jobs/local.sh. One thread per rank. The runs stay under --out/GRID. Printed per grid: test
MAE of the local U-Nets alone, of the two-level model (the coarse exchange) and of the global
U-Net; how much the exchange lowers the local-only error; the two-level error against the global
U-Net's; SSIM; the critical path (one local U-Net, gather, coarse training) against the global
U-Net's training, in CPU seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL, TWO, GLOBAL = "local U-Nets (no exchange)", "two-level (coarse exchange)", "global U-Net"


def launcher(np_):
    mpiexec = os.environ.get("MPIEXEC", os.path.join(ROOT, ".venv", "bin", "mpiexec"))
    python = os.environ.get("PYTHON", os.path.join(ROOT, ".venv", "bin", "python"))
    return [mpiexec, "-n", str(np_), *os.environ.get("MPIEXEC_PREFLAGS", "").split(), python]


def one_local_cpu(r) -> float:
    """CPU seconds of the slowest single subdomain's local U-Net (training): what one rank per
    subdomain would spend, plus the gather and the coarse network on rank 0."""
    per_subdomain = [v["cpu_s"] for st in r["per_rank"] for k, v in st["phases"].items() if k.startswith("subdomain_")]
    cp = r["timing"]["critical_path"]
    return max(per_subdomain) + cp["gather_cpu_s"] + cp["coarse_cpu_s"]


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
        n = 1
        for g in grid.split("x"):
            n *= int(g)
        out = os.path.join(args.out, grid)
        cmd = launcher(min(args.np, n)) + [
            "-m", "mpidd.train", "--task", "regress", "--data", data, "--grid", grid, "--out", out, "--overwrite",
            "--epochs", str(args.epochs), "--coarse-epochs", str(args.coarse_epochs), "--batch-size", "32",
            "--coarse-batch-size", "32", "--threads", "1", "--log-interval", "0", *args.extra]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        with open(os.path.join(out, "results.json")) as f:
            r = json.load(f)
        m = {k: v["test"] for k, v in r["metrics"].items()}
        rows.append((grid, m, one_local_cpu(r), r["timing"]["global_train_cpu_s"], r["parameters"]))
    print(f"\n{args.dim}D heat, {args.size} points per axis, screening {args.screening:g}; "
          f"{args.train}/{args.val}/{args.test} samples; {args.epochs} epochs (coarse {args.coarse_epochs})")
    print(f"{'grid':<7}{'local MAE':>11}{'two-level':>11}{'global':>10}{'exchange':>10}{'vs global':>11}"
          f"{'SSIM 2L/G':>13}{'crit. CPU s':>13}{'global CPU s':>14}{'speed-up':>10}")
    for grid, m, crit, glob, params in rows:
        gain = 1 - m[TWO]["mae"] / m[LOCAL]["mae"]
        vs = m[TWO]["mae"] / m[GLOBAL]["mae"] - 1
        print(f"{grid:<7}{m[LOCAL]['mae']:>11.5f}{m[TWO]['mae']:>11.5f}{m[GLOBAL]['mae']:>10.5f}{-gain:>+10.1%}"
              f"{vs:>+11.1%}{m[TWO]['ssim']:>7.3f}/{m[GLOBAL]['ssim']:.3f}{crit:>13.1f}{glob:>14.1f}"
              f"{glob / crit:>9.1f}x")
    print("exchange: two-level MAE against local only; vs global: two-level MAE against the global U-Net's; "
          "critical path: the slowest subdomain's local U-Net + gather + coarse network (CPU s, one rank per "
          "subdomain)")


if __name__ == "__main__":
    sys.exit(main())
