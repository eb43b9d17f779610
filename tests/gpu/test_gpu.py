"""The GPU paths end to end (CTest suite `gpu`, `make gpu-check`): device selection with one rank
per GPU and several ranks sharing one, local training, bf16-mixed, the coherent exchange, data
parallel with more ranks than subdomains, predict and the Python API, each at 1, 2 and 4 ranks
where it applies. Every accuracy is compared with the same run on the CPU (TOLERANCE), and each
run's wall time is printed (a subprocess's wall time ends after the device has synchronised:
the run has written its results).

Skipped, with the reason, where torch sees no CUDA device. MPIDD_GPU_CHECK_DEVICE=cpu runs the
same checks with the CPU in place of the GPU (the harness itself, on a machine without one).
"""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, launcher

DEVICE = os.environ.get("MPIDD_GPU_CHECK_DEVICE", "cuda")
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip(f"no CUDA device: torch {torch.__version__} sees none (torch.cuda.is_available() is False, "
                f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})", allow_module_level=True)
if any(v in os.environ for v in ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK")):
    pytest.skip("the GPU suite launches mpirun itself: run it outside mpirun", allow_module_level=True)

# GPU and CPU kernels differ in their rounding (cuDNN picks its own algorithms): on this small,
# easy data every accuracy must agree within this many points of 1 (0.05 = 5 percentage points).
TOLERANCE = 0.05
SMALL = ["--no-report", "--epochs", "3", "--batch-size", "32", "--width", "8", "--hidden", "16", "--coarse-steps",
         "200", "--coarse-epochs", "5", "--coarse-batch-size", "32", "--coherent-epochs", "2", "--threads", "1"]
TIMES = []


def launch(np, argv, timeout=600):
    cmd = [*launcher(np), sys.executable, *argv]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=timeout)
    return done, time.perf_counter() - start


def train(tiny, out, np, device, *flags):
    """mpidd.train on `device`; its results.json. Records the wall time for the summary."""
    done, wall = launch(np, ["-m", "mpidd.train", "--data", tiny, "--out", str(out), "--device", device,
                             *SMALL, *flags])
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-2000:]
    TIMES.append((f"{np} ranks {' '.join(flags)}", device, wall))
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


def assert_close(on_device, on_cpu):
    for name, acc in on_cpu["accuracy"].items():
        if isinstance(acc, dict) and "test" in acc:
            got = on_device["accuracy"][name]["test"]
            assert abs(got - acc["test"]) <= TOLERANCE, f"{name}: {DEVICE} {got:.4f}, cpu {acc['test']:.4f}"


@pytest.fixture(scope="module", autouse=True)
def summary():
    yield
    print(f"\nGPU suite on {DEVICE}: {torch.cuda.get_device_name(0) if DEVICE == 'cuda' else 'cpu'}, "
          f"{torch.cuda.device_count() if DEVICE == 'cuda' else 0} device(s) visible, torch {torch.__version__}")
    for what, device, wall in TIMES:
        print(f"  {what:<48} {device:<5} {wall:7.1f} s wall")


@pytest.mark.parametrize("np", [1, 2, 4])
def test_device_selection_one_rank_per_gpu_or_sharing(np, tiny, tmp_path):
    """Rank r takes GPU (node-local rank r) % (GPUs visible): as many ranks as GPUs each get one,
    more ranks share them round robin."""
    r = train(tiny, tmp_path / "run", np, DEVICE, "--grid", "2x2", "--mode", "twolevel")
    devices = [s["device"] for s in r["per_rank"]]
    if DEVICE == "cuda":
        count = torch.cuda.device_count()
        assert [d.split(" ")[0] for d in devices] == [f"cuda:{rank % count}" for rank in range(np)]
    else:
        assert devices == ["cpu"] * np


@pytest.mark.parametrize("np", [1, 2, 4])
def test_compare_mode_matches_the_cpu(np, tiny, tmp_path):
    """Local CNNs, gather, coarse DNN, both coherent models (the exchange) and the global CNN."""
    flags = ("--grid", "2x2")
    assert_close(train(tiny, tmp_path / "dev", np, DEVICE, *flags), train(tiny, tmp_path / "cpu", np, "cpu", *flags))


def test_bf16_mixed_matches_the_cpu(tiny, tmp_path):
    flags = ("--grid", "2x2", "--mode", "twolevel", "--precision", "bf16-mixed")
    if DEVICE == "cuda" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    on_cpu = train(tiny, tmp_path / "cpu", 2, "cpu", "--grid", "2x2", "--mode", "twolevel")
    assert_close(train(tiny, tmp_path / "dev", 2, DEVICE, *flags), on_cpu)


def test_data_parallel_with_more_ranks_than_subdomains(tiny, tmp_path):
    """4 ranks on 1x2: two ranks a subdomain, gradients summed over each pair on the device."""
    flags = ("--grid", "1x2", "--mode", "twolevel")
    on_device = train(tiny, tmp_path / "dev", 4, DEVICE, *flags)
    assert [s["data_parallel"] for s in on_device["per_rank"]] == [[0, 2], [0, 2], [1, 2], [1, 2]]
    assert_close(on_device, train(tiny, tmp_path / "cpu", 4, "cpu", *flags))


def test_predict_on_the_device_reproduces_the_run(tiny, tmp_path):
    run = tmp_path / "run"
    r = train(tiny, run, 2, DEVICE, "--grid", "2x2", "--mode", "twolevel")
    out = tmp_path / "p.csv"
    done, wall = launch(2, ["-m", "mpidd.predict", str(run), "--data", tiny, "--out", str(out), "--device", DEVICE])
    assert done.returncode == 0, done.stderr[-3000:]
    TIMES.append(("2 ranks predict", DEVICE, wall))
    rows = out.read_text().splitlines()[1:]
    import h5py
    with h5py.File(tiny) as f:
        labels = f["test"]["labels"][...]
    predicted = [int(line.split(",")[1]) for line in rows]
    acc = sum(int(p == y) for p, y in zip(predicted, labels)) / len(labels)
    assert abs(acc - r["accuracy"]["CNN-DNN"]["test"]) <= 1 / len(labels)  # the run's own scoring, up to a tie


def test_the_api_on_the_device(tiny, tmp_path):
    script = tmp_path / "fit.py"
    script.write_text(f"""
import json, sys
import h5py
from mpi4py import MPI
import mpidd
with h5py.File({str(tiny)!r}) as f:
    x, y = f["train"]["images"][...], f["train"]["labels"][...]
    xt, yt = f["test"]["images"][...], f["test"]["labels"][...]
scores = {{}}
for device in ({DEVICE!r}, "cpu"):
    clf = mpidd.TwoLevelClassifier(grid="2x2", epochs=3, batch_size=32, width=8, hidden=16, coarse_steps=200,
                                   device=device, comm=MPI.COMM_WORLD).fit(x, y)
    scores[device] = clf.score(xt, yt)
if MPI.COMM_WORLD.rank == 0:
    print(json.dumps(scores))
""")
    done, wall = launch(2, [str(script)])
    assert done.returncode == 0, done.stderr[-3000:]
    TIMES.append(("2 ranks API fit on device and on cpu", DEVICE, wall))
    scores = json.loads(done.stdout.strip().splitlines()[-1])
    assert abs(scores[DEVICE] - scores["cpu"]) <= TOLERANCE
