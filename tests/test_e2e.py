"""End to end: the real command line under mpirun, in a subprocess, on tiny synthetic data."""

import json
import os
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from conftest import ROOT, make_tiny_dataset

if any(v in os.environ for v in ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK")):
    pytest.skip("end-to-end tests launch mpirun themselves: run them outside mpirun", allow_module_level=True)

BIN = os.path.dirname(sys.executable)
MPIRUN = os.environ.get("MPIDD_MPIRUN") or os.path.join(BIN, "mpirun")
TINY = ["--epochs", "3", "--batch-size", "32", "--width", "8", "--hidden", "16",
        "--coarse-epochs", "5", "--coarse-batch-size", "32", "--threads", "1"]


def run(args, np=None, timeout=240, script=("-m", "mpidd.train")):
    launcher = [MPIRUN, os.environ.get("MPIDD_MPIEXEC_NUMPROC_FLAG") or "-n", str(np),
                *os.environ.get("MPIDD_MPIEXEC_PREFLAGS", "").split()]
    cmd = (launcher if np else []) + [sys.executable, *script, *args]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def results(out):
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("e2e") / "tiny.h5", n=(512, 128, 128))


@pytest.fixture(scope="module")
def two_rank_run(tiny, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("runs") / "np2")
    proc = run(["--data", tiny, "--grid", "2x2", "--overlap", "1", "--out", out, *TINY], np=2)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return out, proc


def test_two_rank_run_writes_everything(two_rank_run):
    out, proc = two_rank_run
    r = results(out)
    assert r["world_size"] == 2 and r["decomposition"]["grid"] == "2x2"
    assert r["decomposition"]["subimage_shape"] == "10x10"
    assert r["decomposition"]["rank_of_subdomain"] == [0, 1, 0, 1]
    names = [m["name"] for m in r["models"]]
    assert names[:4] == [f"local {i} {c}" for i, c in enumerate(["(0, 0)", "(0, 1)", "(1, 0)", "(1, 1)"])]
    assert names[4:] == ["average", "majority vote", "CNN-DNN", "global CNN"]
    for m in r["models"]:
        assert 0.0 <= m["test_acc"] <= 1.0
    assert r["accuracy"]["CNN-DNN"]["test"] > 0.5  # 4 classes: chance is 0.25
    box_bytes = 2 * (512 + 128 + 128) * (10 * 10 + 8)  # two 10x10 boxes + labels, per split
    whole_bytes = (512 + 128 + 128) * (16 * 16 + 8)     # rank 0 also reads whole images for the global CNN
    assert [s["bytes_read"] for s in r["per_rank"]] == [box_bytes + whole_bytes, box_bytes]
    for s in r["per_rank"]:
        assert s["bytes_read_boxes"] == box_bytes
        assert s["peak_rss_bytes"] > 10 * 2 ** 20
        assert {"load", "local", "gather"} <= set(s["phases"])
    cp = r["timing"]["critical_path"]
    assert cp["cpu_s"] > 0 and r["timing"]["global_train_cpu_s"] > 0
    assert "MPICH" in r["versions"]["mpi_library"] or "Open MPI" in r["versions"]["mpi_library"]
    assert r["versions"]["torch"].startswith("2.")
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == [
        "coarse_dnn.pt", "global.pt", "local_0.pt", "local_1.pt", "local_2.pt", "local_3.pt"]
    assert sorted(os.listdir(os.path.join(out, "logs"))) == ["rank0.log", "rank1.log"]
    with open(os.path.join(out, "metrics.csv")) as f:
        lines = f.read().splitlines()
    assert lines[0].startswith("model,epoch,loss")
    assert len(lines) == 1 + 4 * 3 + 5 + 3  # 4 locals x 3 epochs, DNN 5 epochs, global 3 epochs
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["grid"] == "2x2" and cfg["epochs"] == 3 and "out" not in cfg
    # rank 0 printed progress and the table; only rank 0 prints
    assert "CNN-DNN" in proc.stdout and "critical path" in proc.stdout
    assert proc.stdout.count("mpidd: 2 ranks") == 1
    assert "local 0 (0, 0): epoch 3/3" in proc.stdout and "local 1 (0, 1): epoch" not in proc.stdout


def test_checkpoints_reload(two_rank_run):
    import torch
    from mpidd.models import CNNConfig, build_cnn
    out, _ = two_rank_run
    ck = torch.load(os.path.join(out, "checkpoints", "local_3.pt"), weights_only=False)
    assert ck["subdomain"] == 3 and ck["epoch"] == 3 and "optimizer" in ck
    model = build_cnn(1, 4, (10, 10), CNNConfig(width=8, hidden=16), ck["width_factor"])
    model.load_state_dict(ck["model"])


def test_same_accuracies_with_1_2_and_4_ranks(tiny, tmp_path):
    accs = {}
    for np_ in (1, 2, 4):
        out = str(tmp_path / f"np{np_}")
        proc = run(["--data", tiny, "--grid", "2x2", "--model", "twolevel", "--out", out, "--seed", "3",
                    *TINY], np=np_)
        assert proc.returncode == 0, proc.stderr
        accs[np_] = results(out)["accuracy"]
    assert accs[1] == accs[2] == accs[4]


def test_a_failing_rank_ends_the_job(tiny, tmp_path):
    start = time.perf_counter()
    proc = run(["1", "--data", tiny, "--model", "twolevel", "--out", str(tmp_path / "f"), *TINY],
               np=2, timeout=120, script=(os.path.join(ROOT, "tests", "raise_on_rank.py"),))
    assert proc.returncode != 0
    assert "rank 1" in proc.stderr and "injected failure" in proc.stderr
    assert time.perf_counter() - start < 60


def bad_file(tmp_path, change):
    path = make_tiny_dataset(tmp_path / "bad.h5", n=(40, 8, 8), dtype="float32")
    with h5py.File(path, "a") as f:
        change(f)
    return path


def _replace(f, name, value):
    del f[name]
    f[name] = value


def _nan_in_box_3(f):
    x = f["train/images"][...]
    x[5, 0, 12, 12] = np.nan
    _replace(f, "train/images", x)


@pytest.mark.parametrize("case,np_,message", [
    ("missing", 1, "does not exist"),
    ("nogroup", 1, "group /test is missing"),
    ("rank", 1, "expected \\(n, C, H, W\\)"),
    ("labels", 1, "labels out of range"),
    ("grid", 1, "at most 16 parts"),
    ("overlap", 1, "overlap 7 too large"),
    ("nan", 2, "image 5 holds NaN"),
    ("ranks", 3, "3 ranks but only 2 subdomains"),
    ("exists", 1, "exists: choose another --out or pass --overwrite"),
])
def test_bad_input_is_refused_before_training(tmp_path, tiny, case, np_, message):
    data, extra = tiny, []
    out = tmp_path / "run"
    if case == "missing":
        data = str(tmp_path / "nope.h5")
    elif case == "nogroup":
        data = bad_file(tmp_path, lambda f: f.__delitem__("test"))
    elif case == "rank":
        data = bad_file(tmp_path, lambda f: _replace(f, "val/images", np.zeros((8, 16, 16), np.float32)))
    elif case == "labels":
        data = bad_file(tmp_path, lambda f: _replace(f, "test/labels", np.arange(8) + 1))
    elif case == "grid":
        extra = ["--grid", "17x1"]
    elif case == "overlap":
        extra = ["--overlap", "7"]
    elif case == "nan":
        data = bad_file(tmp_path, _nan_in_box_3)
    elif case == "ranks":
        extra = ["--grid", "1x2"]
    elif case == "exists":
        out.mkdir()
    proc = run(["--data", data, "--out", str(out), "--model", "twolevel", *extra, *TINY], np=np_, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "mpidd.train: error:" in errors[0], proc.stderr
    assert any(__import__("re").search(message, e) for e in errors), proc.stderr
    assert "epoch" not in proc.stdout
    if case != "exists":
        assert not out.exists()  # refused before the run directory is made


def test_help_and_bad_flag():
    proc = run(["--help"])
    assert proc.returncode == 0
    for flag in ("--grid", "--overlap", "--threads", "--coarse-hidden", "(default: 2x2)"):
        assert flag in proc.stdout
    proc = run(["--optimizer", "lbfgs"], np=2)
    assert proc.returncode == 2 and proc.stderr.count("invalid choice") == 1


def test_config_file_and_command_line_precedence(tiny, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('grid = "1x2"\nepochs = 1\ncoarse-epochs = 2\nmodel = "twolevel"\nwidth = 4\n')
    out = str(tmp_path / "run")
    proc = run(["--config", str(cfg), "--data", tiny, "--out", out, "--width", "6", "--threads", "1"], np=2)
    assert proc.returncode == 0, proc.stderr
    resolved = json.load(open(os.path.join(out, "config.json")))
    assert resolved["grid"] == "1x2" and resolved["epochs"] == 1 and resolved["width"] == 6
    assert results(out)["decomposition"]["num_subdomains"] == 2


def test_no_arguments_names_the_command_that_makes_the_demo_data(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "mpidd.train"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "data/fashion_mnist.h5 does not exist" in proc.stderr
    assert "python -m data_prep.fashion_mnist" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_global_baseline_alone_on_one_rank(tiny, tmp_path):
    out = str(tmp_path / "g")
    proc = run(["--data", tiny, "--model", "global", "--out", out, *TINY])
    assert proc.returncode == 0, proc.stderr
    r = results(out)
    assert [m["name"] for m in r["models"]] == ["global CNN"]
    assert r["accuracy"]["global CNN"]["test"] > 0.5
    assert "critical_path" not in r["timing"] and r["timing"]["global_train_cpu_s"] > 0
    proc = run(["--data", tiny, "--model", "global", "--out", str(tmp_path / "g2"), *TINY], np=2)
    assert proc.returncode == 2 and "run it on 1 rank" in proc.stderr


def test_report_reprints_the_table(two_rank_run):
    out, proc = two_rank_run
    again = subprocess.run([sys.executable, "-m", "mpidd.report", out], cwd=ROOT, capture_output=True,
                           text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    assert again.returncode == 0
    table = again.stdout.strip()
    assert table.splitlines()[1].startswith("model") and table in proc.stdout


def test_overwrite_replaces_an_earlier_run(tiny, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "local_9.pt").write_text("stale")
    (out / "notes.txt").write_text("the user's own file")
    (out / "checkpoints" / "mine.pt").write_text("the user's own checkpoint")
    proc = run(["--data", tiny, "--grid", "1x2", "--model", "twolevel", "--out", str(out), "--overwrite",
                *TINY], np=2)
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(out / "checkpoints")) == ["coarse_dnn.pt", "local_0.pt", "local_1.pt", "mine.pt"]
    assert (out / "notes.txt").read_text() == "the user's own file"
