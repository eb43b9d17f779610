"""End to end, data that need not fit in memory: --data-access stream and auto, --shuffle blocks.
The real command line under mpirun, on the tiny data rewritten with chunks of 64 samples (8
blocks in its training split), so that streaming reads blocks, not the whole split at once."""

import json
import os
import re
import subprocess
import sys

import h5py
import numpy as np
import pytest

from conftest import ROOT
from mpidd.writer import write_dataset
from test_e2e import TINY, results, run
from test_restart import EXIT_PREEMPTED, SIGNAL, marker, scores

SMALL_MEMORY = (os.path.join(ROOT, "tests", "helpers", "memory_on_rank.py"),)
# --global-alone: compared bit for bit across rank counts (data parallel, its sums follow the ranks)
COMPARE = ["--grid", "2x2", "--mode", "compare", "--seed", "5", "--global-alone", *TINY]


def splits_of(path):
    with h5py.File(path, "r") as f:
        return {s: (f[s]["images"][...], f[s]["labels"][...]) for s in ("train", "val", "test")}


@pytest.fixture(scope="module")
def chunked(tiny, tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("data") / "chunk64.h5"), splits_of(tiny),
                         classes=[f"class{k}" for k in range(4)], chunk_samples=64)


@pytest.fixture(scope="module")
def in_memory(chunked, tmp_path_factory):
    """The comparison on 4 ranks, images in memory: {shuffle: run directory}."""
    out = {}
    for shuffle in ("blocks", "exact"):
        out[shuffle] = str(tmp_path_factory.mktemp("runs") / f"memory_{shuffle}")
        proc = run(["--data", chunked, "--out", out[shuffle], *COMPARE, "--shuffle", shuffle,
                    "--data-access", "memory"], np=4)
        assert proc.returncode == 0, proc.stderr
    return out


def test_streaming_computes_what_memory_does_at_1_2_and_4_ranks(chunked, in_memory, tmp_path):
    """Every model's every score (locals, coarse DNN, coherent models, global CNN), bit for bit."""
    memory = results(in_memory["blocks"])
    for np_ in (1, 2, 4):
        out = str(tmp_path / f"stream{np_}")
        proc = run(["--data", chunked, "--out", out, *COMPARE, "--shuffle", "blocks", "--data-access", "stream"],
                   np=np_)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines()[0] == ("mpidd: data access stream on every rank (--data-access stream on "
                                               "rank 0)"), proc.stdout
        assert "warning: --shuffle blocks" not in proc.stdout  # a file in a mixed class order
        assert scores(out) == scores(in_memory["blocks"])
        r = results(out)
        assert r["accuracy"] == memory["accuracy"]
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["data_access_choice"]["modes"] == ["stream"] * 4
    box = 8 * 8  # a subimage of 8x8 uint8 pixels
    for stats in r["per_rank"]:
        assert stats["data_access"] == "stream" and stats["share_bytes"] == (512 + 128 + 128) * box * (
            1 + 4 * (stats["rank"] == 0))  # rank 0 also trains the global CNN on whole 16x16 images
        io = stats["stream"]
        # 3 local epochs and 2 + 2 coherent ones over the training boxes, at least
        assert io["bytes_read"] >= 7 * 512 * box and io["batches"] > 0 and io["wait_s"] >= 0
    for stats in memory["per_rank"]:
        assert stats["data_access"] == "memory" and stats["stream"] is None
    assert scores(in_memory["exact"]) != scores(in_memory["blocks"])  # the order is another
    out = str(tmp_path / "exact")
    proc = run(["--data", chunked, "--out", out, *COMPARE, "--data-access", "stream"], np=2)
    assert proc.returncode == 0, proc.stderr
    assert scores(out) == scores(in_memory["exact"])


def test_a_stop_in_the_middle_of_an_epoch_resumes_exactly_when_streaming(chunked, in_memory, tmp_path):
    out = str(tmp_path / "stopped")
    flags = ["--data", chunked, "--out", out, *COMPARE, "--shuffle", "blocks", "--data-access", "stream"]
    proc = run(["1", "local", "25", "TERM", *flags], np=2, script=SIGNAL)
    assert proc.returncode == EXIT_PREEMPTED, proc.stderr
    import torch
    ck = torch.load(os.path.join(out, "checkpoints", "local_1.pt"), weights_only=False)
    assert ck["loop"]["stopped"] and ck["loop"]["epoch"] == 2 and 0 < ck["loop"]["step"] < 16
    proc = run(["--resume", out, "--data-access", "memory"], np=2)  # how it reads may change
    assert proc.returncode == 0, proc.stderr
    assert scores(out) == scores(in_memory["blocks"])
    assert marker(out)["state"] == "finished"


def test_auto_streams_on_the_rank_whose_share_does_not_fit(chunked, in_memory, tmp_path):
    out = str(tmp_path / "auto")
    proc = run(["1", "20000", "--data", chunked, "--out", out, *COMPARE, "--shuffle", "blocks",
                "--mode", "twolevel"], np=2, script=SMALL_MEMORY)
    assert proc.returncode == 0, proc.stderr
    first = proc.stdout.splitlines()[0]
    assert first.startswith("mpidd: data access rank 0 memory, rank 1 stream (share 96.0 KiB <= 0.5 x "), first
    r = results(out)
    assert [s["data_access"] for s in r["per_rank"]] == ["memory", "stream"]
    # 20000 bytes on the node, shared by its 2 ranks
    assert "share 96.0 KiB > 0.5 x 9.8 KiB available to the rank" in r["config"]["data_access_choice"]["why"][1]
    rows = {row for row in scores(in_memory["blocks"]) if row[0].startswith(("local", "coarse"))}
    assert set(scores(out)) == rows


def test_bad_data_is_refused_in_stream_mode_before_training(tmp_path):
    rng = np.random.default_rng(0)
    splits = {s: (rng.random((n, 1, 16, 16)).astype(np.float32), rng.integers(0, 4, n))
              for s, n in (("train", 96), ("val", 32), ("test", 32))}
    path = write_dataset(str(tmp_path / "f.h5"), splits, chunk_samples=16)
    with h5py.File(path, "r+") as f:
        f["test"]["images"][21, 0, 12, 3] = np.inf  # in subdomain 2's box (rows 8..15, columns 0..7)
    out = tmp_path / "r"
    proc = run(["--data", path, "--grid", "2x2", "--mode", "twolevel", "--out", str(out), *TINY,
                "--data-access", "stream"], np=2, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (f"mpidd.train: error: {path}:/test/images: image 21 holds NaN or inf values; "
                                   f"clean the data file (found by rank 0)")
    assert not out.exists() and "epoch" not in proc.stdout
    with h5py.File(path, "r+") as f:
        f["test"]["images"][21, 0, 12, 3] = 0.5
        f["val"]["labels"][3] = 7
    proc = run(["--data", path, "--grid", "2x2", "--out", str(out), *TINY, "--data-access", "stream"], np=2,
               timeout=120)
    assert proc.returncode == 2 and "labels out of range: found label 7" in proc.stderr, proc.stderr
    assert not out.exists()


def test_the_streaming_benchmark_prints_what_its_runs_measured(chunked, tmp_path):
    """benchmarks/streaming.py on the tiny file (2 ranks, 2x the data): both tables, their numbers
    those of the runs' results.json."""
    from mpidd.data import inspect
    from test_e2e import launcher
    mpirun, pre = launcher(2)[0], launcher(2)[3:]  # jobs/local.sh passes -n itself
    env = dict(os.environ, MPIEXEC=mpirun, PYTHON=sys.executable, MPIEXEC_PREFLAGS=" ".join(pre), OMP_NUM_THREADS="1")
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "streaming.py"), "--data", chunked,
                           "--np", "2", "--factor", "2", "--out", str(out), "--", "--batch-size", "32", "--width", "8",
                           "--hidden", "16"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr
    assert inspect(str(out / "larger.h5")).sizes == {"train": 1024, "val": 128, "test": 128}
    memory = re.findall(r"^\s+(memory|stream)\s+(1x|2x)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+\d+$",
                        proc.stdout, re.M)
    assert len(memory) == 4, proc.stdout
    for access, size, share, *rss in memory:
        r = results(str(out / f"memory_{size}_{access}"))
        ranks = sorted(r["per_rank"], key=lambda s: s["rank"])
        assert float(share) == round(ranks[0]["share_bytes"] / 2**20, 1)
        assert [float(v) for v in rss[:2]] == [round(s["peak_rss_bytes"] / 2**20, 1) for s in ranks]
    speed = re.findall(r"^\s+(blocks|exact)\s+(memory|stream)\s+(\d+)\s+([\d.]+)\s", proc.stdout, re.M)
    assert len(speed) == 4, proc.stdout
    for shuffle, access, rate, ratio in speed:
        r = results(str(out / f"speed_{access}_{shuffle}"))
        assert [s["data_access"] for s in r["per_rank"]] == [access] * 2
        if access == "memory":
            assert float(ratio) == 1.0
