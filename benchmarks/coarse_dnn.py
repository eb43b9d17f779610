"""python benchmarks/coarse_dnn.py --data data/fashion_mnist.h5

The coarse DNN across training-set sizes and decompositions: CNN-DNN, average and vote test
accuracy for Fashion-MNIST training subsets (--sizes: the first n training images, the first 500
validation and test images; the whole file for its full size) on --grids, and for
scikit-learn's digits (2x2 on 8x8 images), each one `mpidd.train --mode twolevel` run on 4 ranks
(jobs/local.sh: MPIEXEC, PYTHON, MPIEXEC_PREFLAGS as there) with mpidd's defaults. Beside it,
the papers' coarse DNN as mpidd trained it before (probabilities as they are, 5 epochs of batch
512, no weight decay, no step budget), retrained on the very probabilities the run gathered
(RUN/checkpoints/probabilities.npz), same seed.

    python benchmarks/coarse_dnn.py --sizes 2000 --grids 2x2 --epochs 1,3    # a quicker look
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mpidd import combine, rundir  # noqa: E402
from mpidd.data import inspect, load_labels  # noqa: E402
from mpidd.writer import write_subset  # noqa: E402
from mpidd.engine import TrainOptions, predict_proba  # noqa: E402

PAPERS = TrainOptions(epochs=5, batch_size=512, lr=3e-3, optimizer="adam", schedule="cosine", select_best=True)


def subset(src, n, out):
    """The first n training and the first 500 validation and test images of src."""
    return out if os.path.exists(out) else write_subset(src, out, {"train": n, "val": 500, "test": 500})


def run(data, grid, epochs, out, np_):
    cmd = ["bash", "jobs/local.sh", str(np_), "--data", data, "--mode", "twolevel", "--grid", grid, "--epochs",
           str(epochs), "--threads", "1", "--no-report", "--overwrite", "--out", out]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, stdout=subprocess.DEVNULL, check=True)
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


def papers_coarse_dnn(out, data, N, K):
    """Test accuracy of the coarse DNN as the papers (and mpidd before) trained it, on the run's
    gathered probabilities."""
    torch.set_num_threads(1)
    gathered = np.load(rundir.checkpoint_path(out, rundir.PROBABILITIES))
    labels = load_labels(data)
    dnn, _ = combine.train_coarse_dnn((gathered["train"], labels["train"]), (gathered["val"], labels["val"]), K,
                                      (64, 64), 0.0, PAPERS, seed=0, inputs="prob", min_steps=0)
    return combine.accuracy(predict_proba(dnn, gathered["test"]).argmax(1), labels["test"])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/fashion_mnist.h5")
    p.add_argument("--sizes", default="500,2000,10000,55000", help="training-set sizes of --data")
    p.add_argument("--grids", default="2x2,4x4")
    p.add_argument("--epochs", default="3", help="local epochs (comma separated)")
    p.add_argument("--extra", default="2000:2x2:1", help="more SIZE:GRID:EPOCHS runs ('' for none)")
    p.add_argument("--digits", action=argparse.BooleanOptionalAction, default=True, help="also digits, 2x2")
    p.add_argument("--np", type=int, default=4)
    p.add_argument("--workdir", default="runs/bench_coarse")
    args = p.parse_args()
    os.chdir(ROOT)
    os.makedirs(args.workdir, exist_ok=True)
    full = inspect(args.data).sizes["train"]
    cases = [(int(n), g, int(e)) for n in args.sizes.split(",") for g in args.grids.split(",")
             for e in args.epochs.split(",")]
    cases += [(int(n), g, int(e)) for n, g, e in (c.split(":") for c in args.extra.split(",") if c)]
    jobs = [(f"fashion-mnist {n}", args.data if n >= full else subset(args.data, n, f"{args.workdir}/fm{n}.h5"), g, e)
            for n, g, e in cases]
    if args.digits:
        digits = f"{args.workdir}/digits.h5"
        if not os.path.exists(digits):
            subprocess.run([sys.executable, "-m", "data_prep.digits", "--out", digits], check=True)
        jobs.append(("digits", digits, "2x2", 10))
    rows, start = [], time.perf_counter()
    for name, data, grid, epochs in jobs:
        out = f"{args.workdir}/{name.split()[0]}_{os.path.basename(data)[:-3]}_{grid}_e{epochs}"
        r = run(data, grid, epochs, out, args.np)
        acc = {m["kind"]: m["test_acc"] for m in r["models"]}
        locals_ = [m["test_acc"] for m in r["models"] if m["kind"] == "local"]
        N, K = r["decomposition"]["num_subdomains"], len(r["classes"])
        rows.append((name, r["sizes"]["train"], r["sizes"]["test"], grid, epochs, min(locals_), max(locals_),
                     acc["average"], acc["vote"], papers_coarse_dnn(out, data, N, K), acc["cnn_dnn"]))
    print(f"\ntest accuracy %, {args.np} ranks, mpidd defaults (--coarse-input logprob, --coarse-steps 2000, "
          f"--coarse-batch-size 128, --coarse-weight-decay 1e-4); papers': probabilities, 5 epochs of batch 512 "
          f"({time.perf_counter() - start:.0f} s)")
    head = (f"{'data':<16}{'train':>7}{'test':>7}{'grid':>6}{'epochs':>7}{'locals':>13}{'average':>9}{'vote':>7}"
            f"{'papers DNN':>11}{'CNN-DNN':>9}{'- avg':>7}")
    print(head + "\n" + "-" * len(head))
    for name, n, nt, grid, e, lo, hi, avg, vote, papers, dnn in rows:
        print(f"{name:<16}{n:>7}{nt:>7}{grid:>6}{e:>7}{f'{100 * lo:.1f}-{100 * hi:.1f}':>13}{100 * avg:>9.2f}"
              f"{100 * vote:>7.2f}{100 * papers:>11.2f}{100 * dnn:>9.2f}{100 * (dnn - avg):>+7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
