"""End to end: the examples under mpirun, in a subprocess, at their --tiny sizes."""

import json
import os
import re

import h5py
import numpy as np
import pytest

from mpidd import data

from conftest import ROOT
from test_e2e import run

HEAT = os.path.join(ROOT, "examples", "insitu_heat.py")
ROW = re.compile(r"^(local CNN \d \([\d, ]+\)|average|vote|CNN-DNN)\s+([\d.]+)\s+([\d.]+)$", re.M)
RANK_ROW = re.compile(r"^(\d+)\s+[\d.]+\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)$", re.M)


def table(out):
    """{model: (val, test)}, [(rank, halo bytes, and the classifier's probabilities, results,
    metadata and total bytes sent)] and the CG iterations of a printed table."""
    accuracies = {name: (float(val), float(test)) for name, val, test in ROW.findall(out)}
    ranks = [tuple(int(v.replace(",", "")) for v in row) for row in RANK_ROW.findall(out)]
    iterations = int(re.search(r"CG, (\d+) iterations for all (\d+) samples", out).group(1))
    return accuracies, ranks, iterations


@pytest.mark.parametrize("dim, np_", [(2, 4), (3, 8)])
def test_insitu_heat_tiny(dim, np_):
    proc = run(["--tiny", "--dim", str(dim)], np=np_, timeout=180, script=(HEAT,))
    assert proc.returncode == 0, proc.stderr + proc.stdout
    accuracies, ranks, iterations = table(proc.stdout)
    locals_ = sorted(n for n in accuracies if n.startswith("local CNN"))
    assert [n.split()[2] for n in locals_] == [str(i) for i in range(np_)]
    assert set(accuracies) - set(locals_) == {"average", "vote", "CNN-DNN"}
    assert all(0.0 <= a <= 1.0 for pair in accuracies.values() for a in pair)
    assert accuracies["CNN-DNN"][1] > 0.4  # 4 classes: chance is 0.25 (tiny runs reach about 0.6-0.7)

    # --tiny: 16 (3D: 8) points per axis, 1600/200/400 samples, K = 4, two blocks per axis
    n, K, block = 1600 + 200 + 400, 4, (16 if dim == 2 else 8) // 2
    assert [r for r, *_ in ranks] == list(range(np_))
    for r, halo, probs, results, metadata, total in ranks:
        # every rank of a 2x2 (2x2x2) grid has one neighbour per axis: one float64 face each way per CG step
        assert halo == dim * block ** (dim - 1) * 8 * n * iterations
        # clf.bytes_sent_: float32 (n, K) probabilities of its subdomain, train + val in fit, test in score_all;
        # rank 0's own stay on rank 0
        assert probs == (0 if r == 0 else 4 * K * (1600 + 200 + 400))
        # rank 0 broadcasts fit's scores and histories and score_all's accuracies: small
        assert 0 < results < 50_000 if r == 0 else results == 0
        assert 0 < metadata < 50_000 and total == probs + results + metadata
    assert "parameters, exchange and gradients sent: 0 bytes; fields gathered: 0 bytes" in proc.stdout


ONLINE_ROW = re.compile(r"^\s*(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", re.M)


def test_insitu_heat_online_trains_while_the_solver_runs_and_continues_from_its_checkpoint(tmp_path):
    """--online --tiny: partial_fit every 2 solver steps of 250 draws; a first run of 1,000
    training draws saves its checkpoint after every call; started again with 1,500 it continues
    after the 1,000 samples it had seen (nothing solved twice) and ends with 1,500 seen. A run of
    1,500 straight through prints the online and offline test accuracies, close at this size
    (CNN-DNN 0.708 online against 0.738 offline on an AMD EPYC, 0.700 against 0.757 on an Intel
    Xeon with AMX: the numbers move with the CPU model, hence the 0.08)."""
    checkpoint = str(tmp_path / "online.pt")
    first = run(["--tiny", "--online", "--train", "1000", "--checkpoint", checkpoint, "--no-offline-check"], np=4,
                timeout=180, script=(HEAT,))
    assert first.returncode == 0, first.stderr + first.stdout
    assert [int(r[0]) for r in ONLINE_ROW.findall(first.stdout)] == [500, 1000] and os.path.exists(checkpoint)
    again = run(["--tiny", "--online", "--train", "1500", "--checkpoint", checkpoint], np=4, timeout=180,
                script=(HEAT,))
    assert again.returncode == 0, again.stderr + again.stdout
    assert "continuing after 1000 samples" in again.stdout
    assert [int(r[0]) for r in ONLINE_ROW.findall(again.stdout)] == [1500]
    straight = run(["--tiny", "--online"], np=4, timeout=180, script=(HEAT,))
    assert straight.returncode == 0, straight.stderr + straight.stdout
    rows = ONLINE_ROW.findall(straight.stdout)
    assert [int(r[0]) for r in rows] == [500, 1000, 1500]
    assert rows[-1][1:3] == ONLINE_ROW.findall(again.stdout)[-1][1:3]  # the continued run ends where this one does
    scores = {m: (float(a), float(b)) for m, a, b in
              re.findall(r"^(cnn-dnn|average|vote)\s+([\d.]+)\s+([\d.]+)$", straight.stdout, re.M)}
    assert set(scores) == {"cnn-dnn", "average", "vote"}
    assert scores["cnn-dnn"][0] > 0.4 and abs(scores["cnn-dnn"][0] - scores["cnn-dnn"][1]) <= 0.08
    assert re.search(r"partial_fit [\d.]+ s for 3 calls \([\d.]+ s per solver step", straight.stdout)


def test_insitu_heat_refuses_the_wrong_rank_count():
    proc = run(["--tiny"], np=2, timeout=60, script=(HEAT,))
    assert proc.returncode != 0
    assert "runs on 4 ranks (mpirun -n 4), not 2" in proc.stderr


def heat_operator(u, screening2=0.25):
    """h^2 (-Laplace u + kappa^2 u) of whole fields (n, *shape), u = 0 outside: the example's
    stencil, with (h kappa)^2 = screening2 (the example's default --screening 0.5)."""
    dim = u.ndim - 1
    padded = np.pad(u, [(0, 0)] + [(1, 1)] * dim)
    out = (2 * dim + screening2) * u
    for d in range(1, dim + 1):
        for shift in (-1, 1):
            out -= np.roll(padded, shift, axis=d)[(slice(None),) + (slice(1, -1),) * dim]
    return out


@pytest.fixture(scope="module")
def heat_volumes(tmp_path_factory):
    """The 3D example's tiny fields (8^3 points, 1600/200/400 samples), written with --write."""
    path = str(tmp_path_factory.mktemp("heat") / "heat3d.h5")
    proc = run(["--tiny", "--dim", "3", "--write", path], np=8, timeout=180, script=(HEAT,))
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert f"wrote {path}: 1600/200/400 fields of 8x8x8 points" in proc.stdout
    return path


def test_insitu_heat_writes_whole_fields_assembled_from_the_ranks_boxes(heat_volumes):
    """Rank 0 puts each rank's box where it belongs: the whole field solves the heat equation
    with non-negative sources (a misplaced box would leave negative spikes at its faces)."""
    info = data.inspect(heat_volumes)
    assert info.image_shape == (1, 8, 8, 8) and info.dtype == "float32" and info.num_classes == 4
    with h5py.File(heat_volumes) as f:
        u = f["train/images"][:64, 0].astype(np.float64)
        labels = f["train/labels"][...]
        assert info.mean[0] == pytest.approx(float(f["train/images"][...].astype(np.float64).mean()), rel=1e-9)
    source = heat_operator(u)
    assert source.min() > -1e-4 * source.max() and (u > 0).all()
    assert sorted(set(labels.tolist())) == [0, 1, 2, 3]
    shuffled = u.copy()
    shuffled[:, :4, :4, :4], shuffled[:, 4:, 4:, 4:] = u[:, 4:, 4:, 4:], u[:, :4, :4, :4]
    assert heat_operator(shuffled).min() < -1e-2 * source.max()  # the check can fail


@pytest.mark.parametrize("grid,flags", [
    ("2x2x2", ["--mode", "compare", "--overlap", "1", "--arch", "resnet"]),  # every model, 3D ResNet
    ("4x4x2", ["--mode", "twolevel"]),  # 32 subdomains on 4 ranks: 8 each, in turn
])
def test_training_on_the_heat_volumes(heat_volumes, tmp_path, grid, flags):
    """mpidd.train on volumes (3D VGG/ResNet local, coherent and global CNNs), on 4 ranks."""
    out = str(tmp_path / "run")
    proc = run(["--data", heat_volumes, "--grid", grid, "--out", out, "--epochs", "1", "--coarse-epochs", "2",
                "--coherent-epochs", "1", "--width", "8", "--hidden", "16", "--batch-size", "64", "--threads", "1",
                "--no-report", *flags], np=4, timeout=240)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    with open(os.path.join(out, "results.json")) as f:
        r = json.load(f)
    N = 8 if grid == "2x2x2" else 32
    assert r["decomposition"]["grid"] == grid and len(r["decomposition"]["rank_of_subdomain"]) == N
    names = [m["name"] for m in r["models"]]
    assert sum(n.startswith("local ") for n in names) == N and {"average", "majority vote", "CNN-DNN"} <= set(names)
    if "compare" in flags:
        assert {"coherent (random init)", "coherent (transfer learning)", "global CNN"} <= set(names)
    assert r["normalization"]["mean"] == pytest.approx(list(data.inspect(heat_volumes).mean))
    # each rank read only its subvolumes' hyperslabs: float32 voxels of its boxes + int64 labels
    voxels = int(np.prod([int(v) for v in r["decomposition"]["subimage_shape"].split("x")]))
    for stats in r["per_rank"]:
        assert stats["bytes_read_boxes"] == len(stats["subdomains"]) * 2200 * (4 * voxels + 8)
    assert all(0 <= m["test_acc"] <= 1 for m in r["models"])


@pytest.mark.parametrize("task", ["regress", "segment"])
def test_insitu_heat_writes_sources_and_temperatures_for_dense_tasks(tmp_path, task):
    """--task regress: the images are the sources f and the targets the temperatures u that
    solve the screened heat equation for them (each rank's box in its place); --task segment:
    the targets are u's level sets at 0.1 and 0.3 of the largest temperature."""
    path = str(tmp_path / f"{task}.h5")
    regress = str(tmp_path / "regress.h5")
    for t, p in {task: path, "regress": regress}.items():
        if not os.path.exists(p):
            proc = run(["--tiny", "--size", "16", "--screening", "0.1", "--task", t, "--write", p], np=4,
                       timeout=180, script=(HEAT,))
            assert proc.returncode == 0, proc.stderr + proc.stdout
    info = data.inspect(path, task=task)
    assert info.sizes == {"train": 1600, "val": 200, "test": 400} and info.image_shape == (1, 16, 16)
    with h5py.File(regress) as f:
        f_src = f["train/images"][:64, 0].astype(np.float64)
        u = {s: f[f"{s}/targets"][...].astype(np.float64) for s in ("train", "val", "test")}
    h2 = (1.0 / 17) ** 2
    residual = heat_operator(u["train"][:64, 0], 0.01) - h2 * f_src
    assert np.abs(residual).max() < 1e-4 * (h2 * f_src).max()
    shuffled = u["train"][:64, 0].copy()
    shuffled[:, :8, :8], shuffled[:, 8:, 8:] = u["train"][:64, 0, 8:, 8:], u["train"][:64, 0, :8, :8]
    assert np.abs(heat_operator(shuffled, 0.01) - h2 * f_src).max() > 1e-2 * (h2 * f_src).max()  # can fail
    if task == "segment":
        top = max(v.max() for v in u.values())
        with h5py.File(path) as f:
            masks = f["test/targets"][...]
            assert list(f.attrs["target_classes"]) == ["cold", "warm", "hot"]
        assert np.array_equal(masks, np.digitize(u["test"][:, 0], [0.1 * top, 0.3 * top]))
        assert set(np.unique(masks).tolist()) == {0, 1, 2}
