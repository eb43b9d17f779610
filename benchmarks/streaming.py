"""Streaming against memory: the peak memory per rank as the data grow, and the training speed.

    python benchmarks/streaming.py --data data/fashion_mnist.h5            # both parts, 4 ranks
    python benchmarks/streaming.py --part speed --np 2                     # a quicker look
    python benchmarks/streaming.py --part order                            # shuffle buffers

1. memory: the same `--mode twolevel` run (--epochs local epochs, --shuffle blocks) on --data and
   on a file --factor times larger (its training split repeated --factor times, the same image
   size; written once to --out/larger.h5), in memory and in stream mode: every rank's peak RSS
   (results.json's per_rank peak_rss_bytes) beside its share of the data.
2. speed: the local CNNs' training images/s in stream mode against memory mode on --data, for
   --shuffle blocks and exact (the page cache is warm: the file is read once first), and every
   rank's I/O wait (seconds its loops waited for a batch the reader had not finished), read
   seconds (in the reader thread) and bytes read against its share.
3. order (not in `both`): the training order's effect on accuracy, on --data and on a copy whose
   training split is sorted by class (written once to --out/sorted.h5, the same chunks): the
   exact permutation against --shuffle blocks with --shuffle-buffer 1, 8 and 64 chunk rows,
   stream mode; the test accuracy of every model and the local CNNs' images/s.

Each run is `jobs/local.sh NP --data ... --mode twolevel --grid 2x2 ...` (MPIEXEC, PYTHON,
MPIEXEC_PREFLAGS as there), one thread per rank; the runs go to --out/NAME and are kept.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import h5py  # noqa: E402
import numpy as np  # noqa: E402

from mpidd.data import SPLITS, inspect  # noqa: E402
from mpidd.writer import DatasetWriter  # noqa: E402

MB = 1 << 20


def larger_file(src: str, dst: str, factor: int) -> str:
    """src with its training split repeated `factor` times (val and test as they are)."""
    if os.path.exists(dst):
        return dst
    info = inspect(src)
    sizes = {s: info.sizes[s] * (factor if s == "train" else 1) for s in SPLITS}
    with h5py.File(src, "r") as f, DatasetWriter(dst, info.image_shape, info.dtype, sizes, info.classes) as w:
        for split in SPLITS:
            for _ in range(factor if split == "train" else 1):
                for lo in range(0, info.sizes[split], 8192):
                    w.write(split, f[split]["images"][lo:lo + 8192], f[split]["labels"][lo:lo + 8192])
    return dst


def sorted_file(src: str, dst: str) -> str:
    """src with its training split sorted by class (stable; val and test as they are), the
    same chunks: the worst case for an order that shuffles only nearby samples."""
    if os.path.exists(dst):
        return dst
    info = inspect(src)
    with h5py.File(src, "r") as f:
        chunk = f["train"]["images"].chunks[0]
        with DatasetWriter(dst, info.image_shape, info.dtype, info.sizes, info.classes, chunk_samples=chunk) as w:
            labels = f["train"]["labels"][:]
            order = np.argsort(labels, kind="stable")
            for lo in range(0, len(order), 8192):
                rows = order[lo:lo + 8192]
                ascending = np.sort(rows)  # h5py reads increasing indices; put them back in class order
                images = f["train"]["images"][ascending]
                w.write("train", images[np.searchsorted(ascending, rows)], labels[rows])
            for split in ("val", "test"):
                for lo in range(0, info.sizes[split], 8192):
                    w.write(split, f[split]["images"][lo:lo + 8192], f[split]["labels"][lo:lo + 8192])
    return dst


def train(args, name, data, access, shuffle, *flags) -> dict:
    """One run; returns its results.json with the local CNNs' mean training images/s added."""
    out = os.path.join(args.out, name)
    cmd = ["bash", "jobs/local.sh", str(args.np), "--data", data, "--mode", "twolevel", "--grid", "2x2",
           "--epochs", str(args.epochs), "--coarse-steps", "200", "--threads", "1", "--no-report", "--overwrite",
           "--data-access", access, "--shuffle", shuffle, "--out", out, *flags, *args.extra]
    print(" ".join(cmd), flush=True)
    start = time.perf_counter()
    if subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode != 0:
        raise SystemExit(f"streaming: {name} failed")
    with open(os.path.join(out, "results.json")) as f:
        r = json.load(f)
    with open(os.path.join(out, "metrics.csv")) as f:
        rates = [float(row["images_per_s"]) for row in csv.DictReader(f) if row["model"].startswith("local_")]
    r["local_images_per_s"] = sum(rates) / len(rates)
    r["wall_s"] = time.perf_counter() - start
    return r


def memory_part(args):
    big = larger_file(args.data, os.path.join(args.out, "larger.h5"), args.factor)
    runs = {(size, access): train(args, f"memory_{size}_{access}", data, access, "blocks")
            for size, data in (("1x", args.data), (f"{args.factor}x", big)) for access in ("memory", "stream")}
    print(f"\npeak RSS per rank (MiB), --mode twolevel 2x2, {args.epochs} local epoch(s), --shuffle blocks, "
          f"{args.np} ranks; data: {args.data} and the same with {args.factor}x the training images")
    head = f"{'access':>8}{'data':>6}{'share MiB':>11}" + "".join(f"{f'rank {r}':>9}" for r in range(args.np)) \
        + f"{'max':>9}{'wall s':>8}"
    print(head + "\n" + "-" * len(head))
    for access in ("memory", "stream"):
        for size in ("1x", f"{args.factor}x"):
            r = runs[(size, access)]
            rss = [s["peak_rss_bytes"] / MB for s in sorted(r["per_rank"], key=lambda s: s["rank"])]
            print(f"{access:>8}{size:>6}{r['per_rank'][0]['share_bytes'] / MB:>11.1f}"
                  + "".join(f"{v:>9.1f}" for v in rss) + f"{max(rss):>9.1f}{r['wall_s']:>8.0f}")
        small, large = (max(s["peak_rss_bytes"] for s in runs[(size, access)]["per_rank"])
                        for size in ("1x", f"{args.factor}x"))
        print(f"{'':>8}{args.factor}x the data: max peak RSS x{large / small:.3f}")


def speed_part(args):
    with open(args.data, "rb") as f:  # a warm page cache for every run
        while f.read(64 * MB):
            pass
    runs = {(access, shuffle): train(args, f"speed_{access}_{shuffle}", args.data, access, shuffle)
            for shuffle in ("blocks", "exact") for access in ("memory", "stream")}
    print(f"\nlocal CNN training images/s (mean over the subdomains and epochs), --mode twolevel 2x2, "
          f"{args.epochs} epoch(s), {args.np} ranks, page cache warm; stream: I/O wait, read s and bytes read per rank")
    head = (f"{'shuffle':>8}{'access':>8}{'img/s':>9}{'vs memory':>10}{'wait s per rank':>24}{'read s per rank':>24}"
            f"{'bytes read / share':>26}{'wall s':>8}")
    print(head + "\n" + "-" * len(head))
    for shuffle in ("blocks", "exact"):
        for access in ("memory", "stream"):
            r = runs[(access, shuffle)]
            ratio = r["local_images_per_s"] / runs[("memory", shuffle)]["local_images_per_s"]
            ranks = sorted(r["per_rank"], key=lambda s: s["rank"])
            io = [s["stream"] or {} for s in ranks]
            waits = " ".join(f"{x.get('wait_s', 0):.2f}" for x in io) if access == "stream" else "-"
            reads = " ".join(f"{x.get('read_s', 0):.2f}" for x in io) if access == "stream" else "-"
            ratios = " ".join(f"{s['bytes_read'] / s['share_bytes']:.2f}" for s in ranks)
            print(f"{shuffle:>8}{access:>8}{r['local_images_per_s']:>9.0f}{ratio:>10.3f}{waits:>24}{reads:>24}"
                  f"{ratios:>26}{r['wall_s']:>8.0f}")


def order_part(args):
    files = {"as is": args.data, "by class": sorted_file(args.data, os.path.join(args.out, "sorted.h5"))}
    orders = [("exact", [])] + [(f"blocks {b}", ["--shuffle-buffer", str(b)]) for b in (1, 8, 64)]
    runs = {(data, order): train(args, f"order_{'sorted' if data == 'by class' else 'asis'}_{order.replace(' ', '')}",
                                 path, "stream", order.split()[0], *flags)
            for data, path in files.items() for order, flags in orders}
    print(f"\ntest accuracy %, --mode twolevel 2x2, {args.epochs} local epoch(s), {args.np} ranks, stream; "
          f"training split of {args.data} as is and sorted by class; blocks N: --shuffle-buffer N chunk rows")
    head = f"{'train split':>12}{'order':>10}{'CNN-DNN':>9}{'average':>9}{'vote':>7}{'locals min-max':>16}{'img/s':>7}"
    print(head + "\n" + "-" * len(head))
    for (data, order), r in runs.items():
        acc = r["accuracy"]
        local = [v["test"] * 100 for k, v in acc.items() if k.startswith("local")]
        print(f"{data:>12}{order:>10}{acc['CNN-DNN']['test'] * 100:>9.2f}{acc['average']['test'] * 100:>9.2f}"
              f"{acc['majority vote']['test'] * 100:>7.2f}{f'{min(local):.1f}-{max(local):.1f}':>16}"
              f"{r['local_images_per_s']:>7.0f}")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python benchmarks/streaming.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/fashion_mnist.h5")
    p.add_argument("--part", choices=("memory", "speed", "both", "order"), default="both")
    p.add_argument("--factor", type=int, default=4, help="the larger file's training split, x (default: 4)")
    p.add_argument("--epochs", type=int, default=1, help="epochs of every local CNN (default: 1)")
    p.add_argument("--np", type=int, default=4, help="ranks (default: 4, one per subdomain of 2x2)")
    p.add_argument("--out", default="runs/streaming", help="run directories (default: runs/streaming)")
    p.add_argument("extra", nargs="*", help="after --: more mpidd.train flags for every run")
    args = p.parse_args(argv)
    os.chdir(ROOT)
    os.makedirs(args.out, exist_ok=True)
    if args.part in ("memory", "both"):
        memory_part(args)
    if args.part in ("speed", "both"):
        speed_part(args)
    if args.part == "order":
        order_part(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
