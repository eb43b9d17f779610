"""CT-sized volumes: the CT CNN on 4x4x2 subvolumes of 128x128x64, streamed, against the global 3D CNN.

    python benchmarks/ct_volumes.py                               # data, compare on 32 ranks, twolevel on 8
    python benchmarks/ct_volumes.py --nps 8,32 --epochs 3         # compare on 8 ranks too

The data: `python -m data_prep.ct_phantom --out --data` (written once if missing; --train/--val/
--test volumes of 128x128x64, uint8, one chunk per 32^3 subvolume). Then, each through
jobs/local.sh (MPIEXEC, PYTHON, MPIEXEC_PREFLAGS as there), one thread per rank:

1. for each P of --nps: `mpirun -n P python -m mpidd.train --mode compare --grid 4x4x2 --arch ctcnn
   --data-access stream ...` (32 local CNNs, 32/P of them per rank, the coherent models, and the
   global CNN on rank 0): every model's test accuracy; the two-level critical path (the slowest
   rank's load + local CNNs, the gather, the coarse DNN) against the global CNN's training CPU
   seconds, the ratio the follow-up reports as 31 for its 3D CNN on 4x4x2; per rank the peak RSS
   and the bytes read against its share of the data.
2. `--mode twolevel` on --twolevel-np ranks in memory and in stream mode: peak RSS per rank of
   each, and their two-level critical paths.

The model: --arch ctcnn --depth 4 --width W --hidden 8W --dropout 0.3 (W = 64 is the Keras
model; the default 16 is what two cores can train on in minutes). The runs go to --out/NAME and
are kept; a run whose results.json exists is not run again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MB = 1 << 20
FOLLOW_UP_FACTOR = 31  # the follow-up's largest training-time reduction: its 3D CNN on 4x4x2


def train(args, name, np_, *flags) -> dict:
    out = os.path.join(args.out, name)
    if not os.path.exists(os.path.join(out, "results.json")):
        cmd = ["bash", "jobs/local.sh", str(np_), "--data", args.data, "--grid", "4x4x2", "--arch", "ctcnn",
               "--depth", "4", "--width", str(args.width), "--hidden", str(8 * args.width), "--dropout", "0.3",
               "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--coherent-epochs",
               str(args.coherent_epochs), "--threads", "1", "--no-report", "--overwrite", "--out", out, *flags,
               *args.extra]
        print(" ".join(cmd), flush=True)
        start = time.perf_counter()
        if subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode != 0:
            raise SystemExit(f"ct_volumes: {name} failed")
        print(f"  {time.perf_counter() - start:.0f} s wall", flush=True)
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


def per_rank(r) -> str:
    ranks = sorted(r["per_rank"], key=lambda s: s["rank"])
    rss = [s["peak_rss_bytes"] / MB for s in ranks]
    read = [s["bytes_read"] / s["share_bytes"] for s in ranks]
    return (f"peak RSS MiB min/median/max {min(rss):.0f}/{sorted(rss)[len(rss) // 2]:.0f}/{max(rss):.0f} "
            f"(rank 0 {rss[0]:.0f}); share MiB rank 0 {ranks[0]['share_bytes'] / MB:.1f}, others "
            f"{ranks[-1]['share_bytes'] / MB:.1f}; bytes read / share min/max {min(read):.2f}/{max(read):.2f}")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python benchmarks/ct_volumes.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/ct_phantom.h5")
    p.add_argument("--train", type=int, default=200, help="training volumes of a new data file (default: 200)")
    p.add_argument("--val", type=int, default=50, help="validation volumes (default: 50)")
    p.add_argument("--test", type=int, default=50, help="test volumes (default: 50)")
    p.add_argument("--nps", default="32", help="rank counts of --mode compare, comma separated (default: 32; the "
                                               "global CNN, the same work on rank 0 at every P, costs minutes)")
    p.add_argument("--twolevel-np", type=int, default=8, help="ranks of the --mode twolevel runs (default: 8)")
    p.add_argument("--width", type=int, default=16, help="CT CNN width (default: 16; 64 is the Keras model)")
    p.add_argument("--epochs", type=int, default=2, help="epochs of the local and global CNNs (default: 2)")
    p.add_argument("--coherent-epochs", type=int, default=1, help="coherent epochs (default: 1)")
    p.add_argument("--batch-size", type=int, default=4, help="mini-batch size (default: 4)")
    p.add_argument("--out", default="runs/ct_volumes", help="run directories (default: runs/ct_volumes)")
    p.add_argument("extra", nargs="*", help="after --: more mpidd.train flags for every run")
    args = p.parse_args(argv)
    os.chdir(ROOT)
    if not os.path.exists(args.data):
        cmd = [sys.executable, "-m", "data_prep.ct_phantom", "--out", args.data, "--train", str(args.train),
               "--val", str(args.val), "--test", str(args.test)]
        print(" ".join(cmd), flush=True)
        if subprocess.run(cmd).returncode != 0:
            return 1
    nps = [int(n) for n in args.nps.split(",")]
    compare = {np_: train(args, f"compare_np{np_}", np_, "--mode", "compare", "--data-access", "stream")
               for np_ in nps}
    access = {a: train(args, f"twolevel_np{args.twolevel_np}_{a}", args.twolevel_np, "--mode", "twolevel",
                       "--data-access", a) for a in ("memory", "stream")}
    first = compare[nps[0]]
    print(f"\nCT CNN (--width {args.width}) on {first['sizes']} volumes of {first['decomposition']['image_shape']}, "
          f"grid 4x4x2 (32 subvolumes of {first['decomposition']['subimage_shape']}), {args.epochs} epochs, batch "
          f"{args.batch_size}, streamed, 1 thread per rank, {os.cpu_count()} cores")
    names = [m["name"] for m in first["models"] if not m["name"].startswith("local ")]
    print(f"{'ranks':>6}" + "".join(f"{n[:18]:>20}" for n in names) + f"{'locals min-max %':>18}")
    for np_, r in compare.items():
        acc = {m["name"]: m["test_acc"] for m in r["models"]}
        local = [m["test_acc"] for m in r["models"] if m["name"].startswith("local ")]
        print(f"{np_:>6}" + "".join(f"{100 * acc[n]:>19.2f}%" for n in names)
              + f"{f'{100 * min(local):.1f}-{100 * max(local):.1f}':>18}")
    print()
    for np_, r in compare.items():
        cp, t = r["timing"]["critical_path"], r["timing"]
        print(f"{np_} ranks: two-level critical path {cp['cpu_s']:.1f} CPU s ({cp['wall_s']:.0f} s wall); global "
              f"CNN training {t['global_train_cpu_s']:.1f} CPU s = {t['global_train_cpu_s'] / cp['cpu_s']:.1f}x "
              f"(the follow-up: {FOLLOW_UP_FACTOR}x); {per_rank(r)}")
    for a, r in access.items():
        acc = {m["name"]: m["test_acc"] for m in r["models"]}
        print(f"--mode twolevel on {args.twolevel_np} ranks, {a}: CNN-DNN {100 * acc['CNN-DNN']:.2f}%, average "
              f"{100 * acc['average']:.2f}%, vote {100 * acc['majority vote']:.2f}%; two-level critical path "
              f"{r['timing']['critical_path']['cpu_s']:.1f} CPU s; {per_rank(r)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
