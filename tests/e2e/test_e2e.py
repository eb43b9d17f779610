"""End to end: the real command line under mpirun, in a subprocess, on tiny synthetic data."""

import json
import os
import re
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from conftest import ROOT, launcher, make_tiny_dataset

if any(v in os.environ for v in ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK")):
    pytest.skip("end-to-end tests launch mpirun themselves: run them outside mpirun", allow_module_level=True)

# --coarse-steps 200: the coarse DNN's step budget, smaller than the default 2,000 to keep the suite short
TINY = ["--no-report", "--epochs", "3", "--batch-size", "32", "--width", "8", "--hidden", "16", "--coarse-steps", "200",
        "--coarse-epochs", "5", "--coarse-batch-size", "32", "--coherent-epochs", "2", "--threads", "1"]


def run(args, np=None, timeout=240, script=("-m", "mpidd.train"), env=None):
    """mpidd.train (or a test script) under mpirun -n np (np None: a singleton, no launcher)."""
    cmd = (launcher(np) if np else []) + [sys.executable, *script, *args]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def results(out):
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def two_rank_run(tiny, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("runs") / "np2")
    proc = run(["--data", tiny, "--grid", "2x2", "--overlap", "1", "--out", out, "--log-interval", "8", *TINY[1:]],
               np=2)  # with its report
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return out, proc


def test_two_rank_run_writes_everything(two_rank_run):
    out, proc = two_rank_run
    r = results(out)
    report = os.path.join(out, "report", "report.md")  # --report (the default): written at the end
    assert f"report: {report}" in proc.stdout and "![Training curves](np2_curves.png)" in open(report).read()
    assert os.path.getsize(os.path.join(out, "report", "np2_phases.png")) > 1000
    assert r["world_size"] == 2 and r["decomposition"]["grid"] == "2x2"
    from mpidd.results import slurm_job, source_commit  # the checkout it started from (None: not a git one)
    assert r["source"] == source_commit(ROOT) == r["restarts"]["segments"][0]["source"] and r["slurm"] == slurm_job()
    assert r["decomposition"]["subimage_shape"] == "10x10"
    assert r["decomposition"]["rank_of_subdomain"] == [0, 1, 0, 1]
    names = [m["name"] for m in r["models"]]
    assert names[:4] == [f"local {i} {c}" for i, c in enumerate(["(0, 0)", "(0, 1)", "(1, 0)", "(1, 1)"])]
    assert names[4:] == ["average", "majority vote", "CNN-DNN", "coherent (random init)",
                         "coherent (transfer learning)", "global CNN"]
    for m in r["models"]:
        assert 0.0 <= m["test_acc"] <= 1.0
        assert 0 < m["cpu_s"] <= m["total_cpu_s"] and m["kind"]
    assert r["accuracy"]["CNN-DNN"]["test"] > 0.5  # 4 classes: chance is 0.25
    assert r["accuracy"]["coherent (transfer learning)"]["test"] > 0.5
    tl, cnn_dnn = (next(m for m in r["models"] if m["kind"] == k) for k in ("coherent_pretrained", "cnn_dnn"))
    assert tl["params"] == cnn_dnn["params"] and tl["cpu_s"] > cnn_dnn["cpu_s"]  # it starts after the CNN-DNN
    for key in ("coherent_random", "coherent_pretrained"):
        c = r["timing"][key]
        assert c["steps"] == 2 * 16 and c["batch_size"] == 32  # 512 samples in batches of 32, 2 epochs
        assert 0 < c["exchange_fraction_max"] < 1 and 0 < c["exchange_cpu_fraction_max"] < 1
        assert c["bytes_per_step_per_rank"] == [2 * 32 * 2 * 4 * 4] * 2  # B x 2 subdomains x K floats, both ways
    box_bytes = 2 * (512 + 128 + 128) * (10 * 10 + 8)  # two 10x10 boxes + labels, per split
    whole_bytes = (512 + 128 + 128) * (16 * 16 + 8)     # rank 0 also reads whole images for the global CNN
    assert [s["bytes_read"] for s in r["per_rank"]] == [box_bytes + whole_bytes, box_bytes]
    # one node: its first rank trains the global CNN with the node's cores while rank 1 waits
    g = next(m for m in r["models"] if m["kind"] == "global")
    threads = len(os.sched_getaffinity(0))
    assert r["timing"]["global_ranks"] == g["ranks"] == 1 and g["cpu_s"] == g["cpu_s_rank0"] > 0
    assert r["timing"]["global_threads"] == max(1, threads) and r["per_rank"][0]["global_threads"] == max(1, threads)
    assert f"on rank 0 alone with {max(1, threads)} thread" in proc.stdout
    for s in r["per_rank"]:
        assert s["bytes_read_boxes"] == box_bytes
        assert s["peak_rss_bytes"] > 10 * 2 ** 20
        assert {"load", "local", "gather", "coherent_random", "coherent_pretrained"} <= set(s["phases"])
        assert 0 < s["phases"]["probabilities"]["cpu_s"] < s["phases"]["local"]["cpu_s"]  # a part of it
    cp = r["timing"]["critical_path"]
    assert cp["cpu_s"] > 0 and r["timing"]["global_train_cpu_s"] > 0
    assert cp["probabilities_cpu_s"] == r["per_rank"][cp["slowest_rank"]]["phases"]["probabilities"]["cpu_s"]
    assert "MPICH" in r["versions"]["mpi_library"] or "Open MPI" in r["versions"]["mpi_library"]
    assert r["versions"]["torch"].startswith("2.")
    coherent = [f"coherent_{init}_{f}" for init in ("pretrained", "random")
                for f in ["dnn.pt", "local_0.pt", "local_1.pt", "local_2.pt", "local_3.pt",
                          "rank0_optimizer.pt", "rank1_optimizer.pt"]]
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == [
        "coarse_dnn.pt", *coherent, "global.pt", "local_0.pt", "local_1.pt", "local_2.pt", "local_3.pt",
        "probabilities.npz", "progress.json"]
    marker = json.load(open(os.path.join(out, "checkpoints", "progress.json")))
    assert marker["state"] == "finished" and marker["world_size"] == 2 and marker["gathered"] is True
    assert len(r["devices"]) == 2 and all(d.endswith(":cpu") for d in r["devices"])
    assert r["restarts"]["stops"] == [] and len(r["restarts"]["segments"]) == 1
    assert sorted(os.listdir(os.path.join(out, "logs"))) == ["rank0.log", "rank1.log"]
    with open(os.path.join(out, "metrics.csv")) as f:
        lines = f.read().splitlines()
    assert lines[0].startswith("model,epoch,loss")
    # 4 locals x 3 epochs, 2 coherent x 2, global 3; the coarse DNN: 512 samples at batch 32 are 16
    # steps an epoch, so --coarse-steps 200 gives 13 epochs (more than --coarse-epochs 5)
    assert len(lines) == 1 + 4 * 3 + 13 + 2 * 2 + 3
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["grid"] == "2x2" and cfg["epochs"] == 3 and "out" not in cfg
    # rank 0 printed progress and the table; only rank 0 prints
    assert "CNN-DNN" in proc.stdout and "critical path" in proc.stdout and "of a step's wall time" in proc.stdout
    assert proc.stdout.count("mpidd: 2 ranks") == 1
    assert "local 0 (0, 0): epoch 3/3" in proc.stdout and "local 1 (0, 1): epoch" not in proc.stdout
    # every phase starts with a numbered line; every model that trains logs every --log-interval
    # batches (16 a model's epoch here); each line ends with the run's time left; plain lines
    phases = [line for line in proc.stdout.splitlines() if line.startswith("phase ")]
    assert [p.split(":")[0] for p in phases] == [f"phase {k} of 6" for k in range(1, 7)]
    assert phases[0].startswith("phase 1 of 6: local CNNs [0, 2] of 4")
    assert f"global CNN on rank 0 with {max(1, threads)} thread" in phases[-1]
    for model in ("local 0 (0, 0): epoch 1/3", "local 2 (1, 0): epoch 3/3", "coarse DNN: epoch 1/13",
                  "coherent (random init): epoch 2/2", "coherent (transfer learning): epoch 1/2",
                  "global CNN: epoch 3/3"):
        assert f"{model} batch 8/16 " in proc.stdout, model
    assert " left" in phases[-1] and "| run 0:00:" in proc.stdout
    assert "\r" not in proc.stdout and "\x1b" not in proc.stdout
    rank1 = open(os.path.join(out, "logs", "rank1.log")).read()
    assert "phase 1 of 6: local CNNs [1, 3] of 4" in rank1 and "local 3 (1, 1): epoch 2/3 batch 8/16 " in rank1


def test_checkpoints_reload(two_rank_run):
    import torch
    from mpidd.models import CNNConfig, build_cnn
    out, _ = two_rank_run
    ck = torch.load(os.path.join(out, "checkpoints", "local_3.pt"), weights_only=False)
    assert ck["subdomain"] == 3 and ck["epoch"] == 3 and "optimizer" in ck
    with open(os.path.join(out, "config.json")) as f:
        norm = json.load(f)["normalization"]  # the data file's statistics: part of every CNN
    model = build_cnn(1, 4, (10, 10), CNNConfig(width=8, hidden=16, input_mean=tuple(norm["mean"]),
                                                input_std=tuple(norm["std"])), ck["width_factor"])
    model.load_state_dict(ck["model"])


def test_same_accuracies_with_1_2_and_4_ranks(tiny, tmp_path):
    """Local, combined and coherent (model parallel) models alike: the ranks change nothing. (The
    global CNN with --global-alone: on rank 0 with its own threads at every rank count; without
    it, with the node's cores, which are more threads than one rank's from 2 ranks on.)"""
    accs = {}
    for np_ in (1, 2, 3, 4):  # 3: rank 0 owns two subdomains, ranks 1 and 2 one each
        out = str(tmp_path / f"np{np_}")
        proc = run(["--data", tiny, "--grid", "2x2", "--mode", "compare", "--out", out, "--seed", "3",
                    *TINY, "--epochs", "2", "--coarse-epochs", "2", "--global-alone"], np=np_)
        assert proc.returncode == 0, proc.stderr
        accs[np_] = results(out)["accuracy"]
        assert results(out)["timing"]["global_ranks"] == 1 and "global CNN on rank 0" in proc.stdout
    assert accs[1] == accs[2] == accs[3] == accs[4]
    assert "coherent (random init)" in accs[4]


@pytest.mark.parametrize("where,mode,np_,rank", [("local", "twolevel", 2, 1), ("exchange", "coherent", 2, 1),
                                                 ("exchange", "coherent", 3, 1), ("exchange", "coherent", 3, 0)])
def test_a_failing_rank_ends_the_job(tiny, tmp_path, where, mode, np_, rank):
    start = time.perf_counter()
    proc = run([str(rank), where, "--data", tiny, "--grid", "2x2", "--mode", mode, "--init", "random",
                "--out", str(tmp_path / "f"), *TINY],
               np=np_, timeout=120, script=(os.path.join(ROOT, "tests", "helpers", "raise_on_rank.py"),))
    assert proc.returncode != 0
    assert f"rank {rank}" in proc.stderr
    injected = f"injected failure in{'side' if where == 'exchange' else ''} the"
    assert injected in proc.stderr
    assert time.perf_counter() - start < 60
    with open(tmp_path / "f" / "logs" / f"rank{rank}.log") as f:  # kept whatever mpirun does with stderr
        assert f"mpidd: rank {rank} on" in (text := f.read()) and injected in text


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
    ("ranks", 3, "3 ranks for 2 subdomains: .* a multiple of the subdomains"),
    ("exists", 1, "exists: choose another --out, pass --overwrite, or --resume"),
    ("below_a_file", 2, "is a file, so no directory can be made below it"),
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
    elif case == "below_a_file":
        (tmp_path / "afile").write_text("")
        out = tmp_path / "afile" / "run"
    proc = run(["--data", data, "--out", str(out), "--mode", "twolevel", *extra, *TINY], np=np_, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "mpidd.train: error:" in errors[0], proc.stderr
    assert any(re.search(message, e) for e in errors), proc.stderr
    assert "epoch" not in proc.stdout
    if case not in ("exists", "below_a_file"):
        assert not out.exists()  # refused before the run directory is made


def test_help_and_bad_flag():
    proc = run(["--help"])
    assert proc.returncode == 0
    for flag in ("--grid", "--overlap", "--threads", "--coarse-hidden", "(default: auto)"):
        assert flag in proc.stdout
    proc = run(["--optimizer", "lbfgs"], np=2)
    assert proc.returncode == 2 and proc.stderr.count("invalid choice") == 1
    for module in ("mpidd.train", "mpidd.predict"):  # one short line, not argparse's whole usage
        proc = run(["RUN", "--bogus", "--data", "x"] if module == "mpidd.predict" else ["--bogus"],
                   script=("-m", module))
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
            f"python -m {module}: error: unknown flag --bogus; see --help"], proc.stderr


def test_config_file_and_command_line_precedence(tiny, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('grid = "1x2"\nepochs = 1\ncoarse-epochs = 2\nmode = "twolevel"\nwidth = 4\n')
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
    proc = run(["--data", tiny, "--mode", "global", "--out", out, *TINY])
    assert proc.returncode == 0, proc.stderr
    r = results(out)
    assert [m["name"] for m in r["models"]] == ["global CNN"]
    assert r["accuracy"]["global CNN"]["test"] > 0.5
    assert "critical_path" not in r["timing"] and r["timing"]["global_train_cpu_s"] > 0


# A launcher that fakes nodes of two ranks each: mpidd asks MPI for the ranks sharing a node
# through parallel.launch.node_comm (leaders, cores, memory), so splitting by rank // 2 there is
# what a job on several nodes looks like to mpidd.
TWO_RANK_NODES = """
from mpidd.parallel import launch
launch.node_comm = lambda comm: comm.Split(comm.Get_rank() // 2, comm.Get_rank())
from mpidd.train import entry_point
entry_point()
"""


def test_compare_trains_the_global_cnn_data_parallel_across_nodes(tiny, tmp_path):
    """--mode compare on two nodes (faked): the first rank of each node trains the global CNN
    (--global-threads of them), data parallel across the nodes, while the others wait; the same
    global CNN as --mode global on two ranks with as many threads."""
    script = tmp_path / "two_rank_nodes.py"
    script.write_text(TWO_RANK_NODES)
    out = str(tmp_path / "compare")
    proc = run(["--data", tiny, "--grid", "2x2", "--out", out, *TINY, "--global-threads", "1"], np=4,
               script=(str(script),))
    assert proc.returncode == 0, proc.stderr + proc.stdout
    r = results(out)
    threads = r["timing"]["global_threads"]
    assert r["timing"]["global_ranks"] == 2 and threads == 1
    assert [p["global_threads"] for p in r["per_rank"]] == [1, None, 1, None]
    assert "phase 6 of 6: global CNN, data parallel over 2 ranks" in proc.stdout
    g = next(m for m in r["models"] if m["kind"] == "global")
    assert g["ranks"] == 2 and g["cpu_s"] > g["cpu_s_rank0"] > 0  # its CPU: both trainers' summed

    alone = str(tmp_path / "global")
    proc = run(["--data", tiny, "--mode", "global", "--out", alone, *TINY, "--threads", str(threads)], np=2)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert results(alone)["accuracy"]["global CNN"] == r["accuracy"]["global CNN"]


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
    proc = run(["--data", tiny, "--grid", "1x2", "--mode", "twolevel", "--out", str(out), "--overwrite",
                *TINY], np=2)
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(out / "checkpoints")) == ["coarse_dnn.pt", "local_0.pt", "local_1.pt", "mine.pt",
                                                          "probabilities.npz", "progress.json"]
    assert (out / "notes.txt").read_text() == "the user's own file"


def test_transfer_learning_from_an_earlier_run_on_other_ranks(two_rank_run, tiny, tmp_path):
    """--from: the coherent model starts from an earlier run's checkpoints, here trained on 2
    ranks and continued on 4; only the coherent phase runs."""
    import torch
    earlier, _ = two_rank_run
    out = str(tmp_path / "tl")
    # a vanishing learning rate: the coherent model must stay the earlier run's CNN-DNN
    proc = run(["--data", tiny, "--mode", "coherent", "--from", earlier, "--out", out, "--overlap", "1", *TINY,
                "--transfer-lr", "1e-12", "--coherent-epochs", "1"], np=4)
    assert proc.returncode == 0, proc.stderr
    r = results(out)
    assert [m["name"] for m in r["models"]] == ["coherent (transfer learning)"]
    assert r["timing"]["coherent_pretrained"]["pretrained_from"] == earlier
    for name in ("local_0", "local_3", "dnn"):
        before = torch.load(os.path.join(earlier, "checkpoints", "coarse_dnn.pt" if name == "dnn" else f"{name}.pt"))
        after = torch.load(os.path.join(out, "checkpoints", f"coherent_pretrained_{name}.pt"))
        for key, value in before["model"].items():
            if value.is_floating_point() and "running" not in key:  # BatchNorm statistics do move
                torch.testing.assert_close(after["model"][key], value, rtol=1e-6, atol=1e-7)
    cnn_dnn = results(earlier)["accuracy"]["CNN-DNN"]["test"]
    assert abs(r["accuracy"]["coherent (transfer learning)"]["test"] - cnn_dnn) <= 0.05
    assert "local 0 (0, 0): epoch" not in proc.stdout  # no local phase
    assert sorted(os.listdir(os.path.join(out, "logs"))) == [f"rank{r}.log" for r in range(4)]


@pytest.mark.parametrize("change,message", [
    (["--width", "6"], "trained with --width 8, this run has 6"),
    (["--overlap", "0"], "trained with --overlap 1, this run has 0"),
    (["--arch", "resnet"], "trained with --arch vgg, this run has resnet"),
    (["--blocks-per-stage", "5", "--hidden", "99"],  # resnet-only key ignored
     "trained with --hidden 16, this run has 99"),
    (["--normalize", "none"], "normalised with mean [0.5075] std [0.218], this run's are none: drop --normalize none"),
    ("nodir", "no config.json there"),
    ("nockpt", "missing checkpoints/local_2.pt"),
    ("garbage", "cannot read checkpoint"),
    ("badjson", "config.json is not valid JSON"),
])
def test_a_run_that_does_not_fit_is_refused_as_pretrained(two_rank_run, tiny, tmp_path, change, message):
    import shutil
    earlier, _ = two_rank_run
    flags = ["--overlap", "1"]
    if change == "nodir":
        earlier = str(tmp_path)
    elif change in ("nockpt", "garbage", "badjson"):
        shutil.copytree(earlier, tmp_path / "copy")
        earlier = str(tmp_path / "copy")
        if change == "nockpt":
            os.remove(os.path.join(earlier, "checkpoints", "local_2.pt"))
        elif change == "garbage":
            with open(os.path.join(earlier, "checkpoints", "local_1.pt"), "wb") as f:
                f.write(b"not a checkpoint")
        else:
            with open(os.path.join(earlier, "config.json"), "w") as f:
                f.write("{")
    else:
        flags = change if change[0] == "--overlap" else flags + change
    out = tmp_path / "tl"
    proc = run(["--data", tiny, "--mode", "coherent", "--from", earlier, "--out", str(out), *TINY, *flags], np=1)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and proc.stderr.count("error:") == 1
    assert not out.exists()


def test_resnet_family_end_to_end(tiny, tmp_path):
    out = str(tmp_path / "resnet")
    proc = run(["--data", tiny, "--arch", "resnet", "--depth", "2", "--blocks-per-stage", "1", "--mode", "coherent",
                "--init", "random", "--grid", "2x2", "--out", out, *TINY], np=2)
    assert proc.returncode == 0, proc.stderr
    r = results(out)
    assert r["arch"] == "resnet" and r["accuracy"]["coherent (random init)"]["test"] > 0.4
    import torch
    ck = torch.load(os.path.join(out, "checkpoints", "coherent_random_local_1.pt"), weights_only=False)
    assert any("conv2" in k for k in ck["model"])  # residual blocks


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """Real data: scikit-learn's bundled handwritten digits (8x8), through data_prep.digits."""
    pytest.importorskip("sklearn")
    path = str(tmp_path_factory.mktemp("digits") / "digits.h5")
    proc = subprocess.run([sys.executable, "-m", "data_prep.digits", "--out", path], cwd=ROOT,
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0 and "train 1197, val 300, test 300" in proc.stdout, proc.stderr
    return path


WIDTH = ["--no-report", "--mode", "width", "--subnets", "4", "--width", "16", "--hidden", "32", "--subnet-epochs", "3",
         "--epochs", "2", "--batch-size", "32", "--threads", "1", "--target-acc", "0.8"]


@pytest.fixture(scope="module")
def width_run(digits, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("width") / "w2")
    proc = run(["--data", digits, "--out", out, *WIDTH], np=2)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return out, proc


def test_width_mode_on_real_digits(width_run):
    import torch
    out, proc = width_run
    r = results(out)
    assert r["mode"] == "width" and r["world_size"] == 2
    assert r["width"]["rank_of_subnet"] == [0, 1, 0, 1] and r["width"]["subnet_width"] == 4
    assert [m["name"] for m in r["models"]] == [
        "subnet 0", "subnet 1", "subnet 2", "subnet 3", "recomposed (before training)", "recomposed + 2 epochs",
        "global CNN (random init, 2 ep.)"]
    subnets, before, after, glob = r["models"][:4], r["models"][4], r["models"][5], r["models"][6]
    assert 4 * subnets[0]["params"] < before["params"] == after["params"] == glob["params"]
    # the recomposed network is the sub-networks' mean-logit ensemble: on real data it beats the
    # mean sub-network, and its loss obeys the convexity bound
    assert before["test_acc"] > np.mean([m["test_acc"] for m in subnets])
    b = r["loss_bound"]
    assert b["holds"] and b["recomposed_test_loss"] <= b["mean_subnet_test_loss"]
    assert abs(b["mean_subnet_test_loss"] - np.mean([m["test_loss"] for m in subnets])) < 1e-9
    assert after["test_acc"] > 0.8 and glob["test_acc"] > 0.8  # 10 classes: chance is 0.1
    # critical path: the slower rank's two sub-networks, then rank 0's recompose and training
    assert max(m["cpu_s"] for m in subnets) < before["cpu_s"] < after["cpu_s"] < after["total_cpu_s"]
    t = r["time_to_target"]
    assert t["target_test_acc"] == 0.8 and len(t["curves"]["global"]) == len(t["curves"]["recomposed"]) == 2 * 4
    assert [p["epoch"] for p in t["curves"]["global"]][3:5] == [1.0, pytest.approx(1 + 10 / 38)]  # 38 steps an epoch
    cpu = [p["cpu_s"] for p in t["curves"]["recomposed"]]
    assert all(a < b for a, b in zip(cpu, cpu[1:])) and cpu[-1] < after["cpu_s"] - before["cpu_s"]
    if t["recomposed"] and t["global_random_init"]:
        assert t["ratio"] == pytest.approx(t["recomposed"]["cpu_s"] / t["global_random_init"]["cpu_s"])
    # its clock starts after the sub-networks' training steps (their validation left out, so
    # before the table's `before`), and the time to the target is counted from there
    assert 0 < t["recomposed_start_cpu_s"] <= before["cpu_s"]
    if t["recomposed"]:
        assert t["recomposed"]["cpu_s"] >= t["recomposed_start_cpu_s"]
        assert (t["recomposed"]["cpu_s"] == t["recomposed_start_cpu_s"]) == (t["recomposed"]["epoch"] == 0)
    ck = sorted(os.listdir(os.path.join(out, "checkpoints")))
    assert ck == ["global.pt", "progress.json", "recomposed.pt", "recomposed_initial.pt"] + \
        [f"subnet_{m}.pt" for m in range(4)]
    sub = torch.load(os.path.join(out, "checkpoints", "subnet_3.pt"), weights_only=False)
    assert sub["subnet"] == 3 and sub["train_samples"] == 1197 and not sub["shard"]
    with open(os.path.join(out, "metrics.csv")) as f:
        lines = f.read().splitlines()
    assert len(lines) == 1 + 4 * 3 + 2 + 2  # 4 sub-networks x 3 epochs, recomposed 2, global 2
    assert "loss bound: recomposed test loss" in proc.stdout and "time to 80.0% test accuracy" in proc.stdout
    assert "subnet 0: epoch 3/3" in proc.stdout and "subnet 1: epoch" not in proc.stdout  # rank 0 prints
    again = subprocess.run([sys.executable, "-m", "mpidd.report", out], cwd=ROOT, capture_output=True,
                           text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    assert again.returncode == 0 and again.stdout.strip() in proc.stdout


def test_width_mode_same_results_on_1_and_2_ranks_and_shards_on_4(width_run, digits, tmp_path):
    out, _ = width_run
    one = str(tmp_path / "w1")
    assert run(["--data", digits, "--out", one, *WIDTH], np=1).returncode == 0
    assert results(one)["accuracy"] == results(out)["accuracy"]  # 1 rank trains all 4 in turn
    sharded = str(tmp_path / "s4")
    proc = run(["--data", digits, "--out", sharded, *WIDTH, "--shard", "--offdiag-noise", "0.01"], np=4)
    assert proc.returncode == 0, proc.stderr
    import torch
    sizes = [torch.load(os.path.join(sharded, "checkpoints", f"subnet_{m}.pt"), weights_only=False)["train_samples"]
             for m in range(4)]
    assert sizes == [300, 299, 299, 299]  # samples m, m+4, ... of 1197: disjoint, covering all
    r = results(sharded)
    assert r["width"]["shard"] and r["width"]["offdiag_noise"] == 0.01
    assert r["accuracy"]["subnet 0"] != results(out)["accuracy"]["subnet 0"]


@pytest.mark.parametrize("flags,np_,message", [
    (["--subnets", "3"], 1, "--width 16 is not divisible by --subnets 3"),
    (["--subnets", "2"], 3, "3 ranks but only 2 sub-networks"),
    (["--offdiag-noise", "-1"], 1, "--offdiag-noise must be >= 0"),
])
def test_width_mode_refuses_what_does_not_split(digits, tmp_path, flags, np_, message):
    out = tmp_path / "w"
    proc = run(["--data", digits, "--out", str(out), *WIDTH, *flags], np=np_, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr and proc.stderr.count("error:") == 1, proc.stderr
    assert not out.exists()


def test_width_mode_on_volumes_ignores_the_grid(tmp_path):
    """3D images (C, D, H, W): the channel split does not depend on the image's shape or --grid."""
    data = make_tiny_dataset(tmp_path / "vol.h5", n=(96, 32, 32), size=8, spatial=3)
    out = str(tmp_path / "w3d")
    proc = run(["--data", data, "--out", out, "--mode", "width", "--grid", "2x2", "--subnets", "2", "--width", "4",
                "--hidden", "8",
                "--subnet-epochs", "1", "--epochs", "1", "--batch-size", "16", "--threads", "1"], np=2)
    assert proc.returncode == 0, proc.stderr
    r = results(out)
    assert r["loss_bound"]["holds"] and r["width"]["subnet_width"] == 2 and len(r["models"]) == 5


def test_width_classifier_from_python_equals_the_command_line(width_run, digits, tmp_path):
    """mpidd.WidthClassifier under mpirun -n 2 with the options of WIDTH: the same accuracies."""
    out, _ = width_run
    proc = run(["width", str(tmp_path), digits], np=2, script=(os.path.join(ROOT, "tests", "helpers", "api_fit.py"),))
    assert proc.returncode == 0, proc.stderr
    api = json.load(open(tmp_path / "width.json"))
    cli = results(out)["accuracy"]
    assert api["test"] == pytest.approx(cli["recomposed + 2 epochs"]["test"], abs=1e-6)  # float32 vs float64 mean
    assert api["val"] == cli["recomposed + 2 epochs"]["val"]
    assert api["initial_val"] == cli["recomposed (before training)"]["val"]
    assert [api["subnets"][str(m)]["val"] for m in range(4)] == [cli[f"subnet {m}"]["val"] for m in range(4)]
    assert api["sent"]["parameters"] > 0 or api["sent"]["results"] > 0
    # the API's saved file and the run directory's model.pt: the recomposed network (and, the run, the global CNN)
    for source, model, name in ((str(tmp_path / "width_model.pt"), "recomposed", "recomposed + 2 epochs"),
                                (out, "recomposed", "recomposed + 2 epochs"),
                                (out, "global", "global CNN (random init, 2 ep.)")):
        proc = run([source, "--data", digits, "--model", model, "--out", str(tmp_path / "p.csv")],
                   script=("-m", "mpidd.predict"))
        assert proc.returncode == 0, proc.stderr
        assert f"accuracy {100 * cli[name]['test']:.2f}%" in proc.stdout, (source, model)


FAST = ["--epochs", "1", "--coarse-epochs", "1", "--coarse-steps", "0", "--coherent-epochs", "1", "--width", "8",
        "--hidden", "16", "--batch-size", "64", "--threads", "1"]


@pytest.mark.parametrize("np_,grid", [(1, "2x2"), (2, "1x2"), (3, "2x2"), (4, "2x2")])
def test_grid_auto_follows_the_rank_count(tiny, tmp_path, np_, grid):
    """No --grid: the default --mode compare runs to the end at every rank count, on a grid chosen
    from it (one subdomain per rank where it factors, else several per rank), said first. (Larger
    rank counts: the dry runs below, and decomposition.choose_grid's unit test up to 16.)"""
    out = str(tmp_path / "auto")
    proc = run(["--data", tiny, "--out", out, *FAST], np=np_)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].startswith(f"mpidd: grid auto: {grid} for {np_} rank"), proc.stdout
    r = results(out)
    assert r["decomposition"]["grid"] == grid and r["world_size"] == np_
    assert [m["kind"] for m in r["models"]][-6:] == ["average", "vote", "cnn_dnn", "coherent_random",
                                                     "coherent_pretrained", "global"]
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["grid"] == grid and config["grid_choice"].startswith(f"grid auto: {grid}")
    if np_ == 3:  # the run's config.json reproduces it, grid included, as an explicit choice
        again = str(tmp_path / "again")
        proc = run(["--config", os.path.join(out, "config.json"), "--data", tiny, "--out", again], np=np_)
        assert proc.returncode == 0, proc.stderr
        assert "grid auto" not in proc.stdout and results(again)["accuracy"] == r["accuracy"]


@pytest.mark.parametrize("np_,grid,rank_0", [(5, "3x3", "0,5"), (6, "2x3", "0")])
def test_grid_auto_beyond_four_ranks_in_a_dry_run(tiny, tmp_path, np_, grid, rank_0):
    """--dry-run at 5 ranks (9 subdomains, up to 2 per rank) and 6 (2x3, one each): the grid
    that rank count gets and each rank's subdomains, without training (routine tests train on
    at most 4 ranks)."""
    proc = run(["--data", tiny, "--out", str(tmp_path / "auto"), "--dry-run", *FAST], np=np_)
    assert proc.returncode == 0, proc.stderr
    assert f"mode compare: grid {grid} (grid auto: {grid} for {np_} ranks" in proc.stdout, proc.stdout
    rows = [line.split() for line in proc.stdout.splitlines() if re.match(r"\s+\d+\s", line)]
    assert [r[0] for r in rows] == [str(r) for r in range(np_)] and rows[0][2] == rank_0, proc.stdout
    assert not (tmp_path / "auto").exists()


def test_report_with_figures_of_two_runs(two_rank_run, width_run, tiny, tmp_path):
    """python -m mpidd.report RUN RUN RUN --out DIR (2x2, 4x4 and a width run): report.md's tables
    hold results.json's numbers, every figure it links is a PNG with content, and the heat maps
    and across-runs plots draw results.json's numbers."""
    from PIL import Image
    from mpidd import figures as drawn
    four = str(tmp_path / "grid4x4")
    proc = run(["--data", tiny, "--grid", "4x4", "--out", four, "--no-report", *FAST], np=4)
    assert proc.returncode == 0, proc.stderr
    runs = [two_rank_run[0], width_run[0], four]
    out = tmp_path / "report"
    proc = run([*runs, "--out", str(out)], script=("-m", "mpidd.report"))
    assert proc.returncode == 0, proc.stderr
    text = (out / "report.md").read_text()
    figures = re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)
    name = os.path.basename(runs[0])
    assert {f"{name}_{k}.png" for k in ("decomposition", "curves", "accuracy", "phases", "confusion")} <= set(figures)
    assert f"{os.path.basename(runs[1])}_time_to_accuracy.png" in figures
    assert {f"{name}_subdomain_accuracy.png", "grid4x4_subdomain_accuracy.png", "runs_accuracy_against_N.png",
            "runs_speedup_against_N.png"} <= set(figures)
    for run_dir, grid in ((runs[0], (2, 2)), (four, (4, 4))):  # the heat maps' cells: each local CNN's
        r = results(run_dir)
        acc, ranks, index = drawn.subdomain_accuracies(r)
        assert acc.shape == grid and sorted(index.ravel()) == list(range(grid[0] * grid[1]))
        for m in (m for m in r["models"] if m["kind"] == "local"):
            where = np.argwhere(index == m["subdomain"])[0]
            assert acc[tuple(where)] == m["test_acc"] and ranks[tuple(where)] == m["rank"]
            assert f"({where[0]}, {where[1]})" in m["name"]
    across = drawn.across_runs([(os.path.basename(d), results(d)) for d in runs])  # the width run has no grid
    two, four_r = results(runs[0]), results(four)
    assert across["N"] == [4, 16] and across["cnn_dnn"] == [two["accuracy"]["CNN-DNN"]["test"],
                                                          four_r["accuracy"]["CNN-DNN"]["test"]]
    assert across["global"] == [two["accuracy"]["global CNN"]["test"], four_r["accuracy"]["global CNN"]["test"]]
    assert across["speedup"][1] == four_r["timing"]["global_over_critical_path"]
    # 16 subdomains on 4 ranks: the critical path trains 4 local CNNs one after the other
    assert across["flop_limit"][1] == four_r["flops"]["global_forward"] / (4 * four_r["flops"]["local_forward"])
    for file in figures:
        with Image.open(out / file) as im:
            assert im.format == "PNG" and min(im.size) > 100
            pixels = np.asarray(im.convert("L"), dtype=float)
        assert pixels.std() > 5, file  # not blank
    r = results(runs[0])
    for m in r["models"]:  # the run's own table
        params = "-" if m.get("params") is None else f"{m['params']:,}"
        assert f"| {m['name']} | {params} | {100 * m['val_acc']:.2f} | {100 * m['test_acc']:.2f} |" in text
    row = next(line for line in text.splitlines() if line.startswith(f"| {name} | 2x2 overlap 1"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    locals_ = [m["test_acc"] for m in r["models"] if m["kind"] == "local"]
    assert cells[2:5] == [f"{100 * min(locals_):.2f}", f"{100 * max(locals_):.2f}",
                          f"{100 * r['accuracy']['average']['test']:.2f}"]
    assert cells[6] == f"{100 * r['accuracy']['CNN-DNN']['test']:.2f}"
    counts = np.array(r["confusion"]["counts"])  # the CNN-DNN's test predictions, row by row
    assert (counts.sum() == r["sizes"]["test"]
            and np.trace(counts) == round(r["accuracy"]["CNN-DNN"]["test"] * counts.sum()))
    for cls, row in zip(r["classes"], counts):
        assert f"| {cls} | " + " | ".join(str(n) for n in row) + " |" in text
    proc = run([str(tmp_path / "missing"), "--out", str(out)], script=("-m", "mpidd.report"))
    assert proc.returncode == 2 and "error:" in proc.stderr

    # make docs-figures' writer: the docs' demo blocks and figures from one run, with its commit
    docs = tmp_path / "docs_root"
    (docs / "docs" / "figures").mkdir(parents=True)
    for name in ("README.md", "BENCHMARKS.md"):
        (docs / name).write_text("before\n<!-- demo:begin -->\nold numbers\n<!-- demo:end -->\nafter\n")
    proc = run(["--parts", "demo", "--run", runs[0], "--wall", "75.4", "--root", str(docs)],
               script=(os.path.join(ROOT, "benchmarks", "docs_figures.py"),))
    assert proc.returncode == 0, proc.stderr
    readme, bench = (docs / "README.md").read_text(), (docs / "BENCHMARKS.md").read_text()
    acc = r["accuracy"]
    assert "old numbers" not in readme and readme.startswith("before\n") and readme.endswith("after\n")
    assert (f"`make demo` took 1m15s wall (CNN-DNN {100 * acc['CNN-DNN']['test']:.2f}%, average "
            f"{100 * acc['average']['test']:.2f}%") in readme
    assert f"commit {r['source']['commit'][:7]}" in readme if r.get("source") else "commit unknown" in readme
    from mpidd.cli.report import format_any
    assert format_any(r) in bench and "took 1m15s wall" in bench
    assert {"demo_curves.png", "demo_subdomain_accuracy.png"} <= set(os.listdir(docs / "docs" / "figures"))
