"""The papers' experiment grid on Fashion-MNIST, then one report across every run.

    python jobs/experiments/run.py                 # the whole grid (hours on a 2-core machine)
    python jobs/experiments/run.py --quick         # reduced budget: 6000/1000/2000 images, 1 epoch
    python jobs/experiments/run.py --np 16 --only fm_4x4   # the 4x4 configurations on 16 ranks
    python jobs/experiments/run.py --quick -- --width 16   # extra mpidd.train flags for every run

Every jobs/experiments/*.toml is one run of `python -m mpidd.train --config FILE` (launched by
jobs/local.sh, so MPIEXEC, PYTHON and MPIEXEC_PREFLAGS choose the MPI as there), into
OUT/NAME (what it printed: OUT/NAME.log); then `python -m mpidd.report OUT/* --out OUT/report` writes
OUT/report/report.md with the papers' table across the runs and every run's figures. A run whose
results.json exists is not run again, so the same command continues an interrupted grid; a run
that fails is reported, the others go on, and the exit status is 1.

--quick writes OUT/data_quick.h5, the first 6000 training, 1000 validation and 2000 test images
of --data (its own channel statistics), and trains every model for 1 epoch (coarse DNN 5):
minutes instead of hours, for checking the set-up, not for the papers' figures.
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)  # mpidd from this source tree, installed or not
QUICK_SIZES = {"train": 6000, "val": 1000, "test": 2000}
QUICK_FLAGS = ["--epochs", "1", "--coarse-epochs", "5", "--coherent-epochs", "1", "--subnet-epochs", "1"]


def get_args_parser():
    p = argparse.ArgumentParser(prog="python jobs/experiments/run.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="reduced budget: a data subset and 1 epoch")
    p.add_argument("--np", type=int, default=4, help="MPI ranks of every run (default: 4)")
    p.add_argument("--data", default="data/fashion_mnist.h5", help="data file (default: data/fashion_mnist.h5)")
    p.add_argument("--out", default="runs/experiments", help="one run directory per configuration, and report/")
    p.add_argument("--only", default="", help="comma-separated name prefixes: run only those configurations")
    p.add_argument("extra", nargs="*", help="after --: flags passed to every mpidd.train run")
    return p


def quick_data(src: str, dst: str) -> str:
    """The first QUICK_SIZES images of every split of src, as a data file of its own."""
    from mpidd.writer import write_subset
    return dst if os.path.exists(dst) else write_subset(src, dst, QUICK_SIZES)


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    os.chdir(ROOT)
    prefixes = tuple(args.only.split(",")) if args.only else ("",)
    configs = sorted(c for c in glob.glob(os.path.join(HERE, "*.toml")) if os.path.basename(c).startswith(prefixes))
    if not configs:
        print(f"run.py: error: no configuration in {HERE} starts with {args.only!r} "
              "(names: fm_GRID_overlapD_ARCH, width_ARCH)", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    data, flags = args.data, list(args.extra)
    if args.quick:
        data = quick_data(args.data, os.path.join(args.out, "data_quick.h5"))
        flags = QUICK_FLAGS + flags
    runs, failed = [], []
    for k, config in enumerate(configs, 1):
        name = os.path.splitext(os.path.basename(config))[0]
        out = os.path.join(args.out, name)
        runs.append(out)
        if os.path.exists(os.path.join(out, "results.json")):
            print(f"[{k}/{len(configs)}] {name}: done before ({out}/results.json)", flush=True)
            continue
        cmd = ["bash", "jobs/local.sh", str(args.np), "--config", config, "--data", data, "--out", out,
               "--overwrite", "--no-report", *flags]
        print(f"[{k}/{len(configs)}] {name}: {' '.join(cmd)}", flush=True)
        start = time.perf_counter()
        with open(f"{out}.log", "w") as log:  # what the run printed (its table); errors go to the terminal
            proc = subprocess.run(cmd, stdout=log)
        print(f"[{k}/{len(configs)}] {name}: {'ok' if proc.returncode == 0 else f'FAILED (exit {proc.returncode})'} "
              f"in {time.perf_counter() - start:.0f} s", flush=True)
        if proc.returncode != 0:
            failed.append(name)
    done = [r for r in runs if os.path.exists(os.path.join(r, "results.json"))]
    if done:
        report = subprocess.run([sys.executable, "-m", "mpidd.report", *done,
                                 "--out", os.path.join(args.out, "report")])
        failed += ["report"] if report.returncode else []
    if failed:
        print(f"run.py: {len(failed)} failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
