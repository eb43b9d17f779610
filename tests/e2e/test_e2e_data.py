"""End to end: files in real formats (CIFAR pickles, NIfTI volumes) -> data_prep -> mpidd.train
under mpirun -> mpidd.predict, with the data file's per-channel normalisation all the way."""

import json
import os
import sys

import h5py
import numpy as np
import pytest

from conftest import ROOT
from test_e2e import results, run

sys.path.insert(0, os.path.join(ROOT, "tests", "unit"))  # the data_prep unit tests' file writers
from test_prep_cifar_medmnist import write_cifar10  # noqa: E402
from test_prep_folder_nifti import save_nifti  # noqa: E402

TINY = ["--no-report", "--epochs", "1", "--batch-size", "16", "--width", "8", "--hidden", "16", "--coarse-epochs", "2",
        "--coarse-steps", "200", "--threads", "1", "--mode", "twolevel"]


def convert(name, *argv):
    proc = run([*argv], script=("-m", f"data_prep.{name}"))
    assert proc.returncode == 0, proc.stderr
    return proc


def test_cifar_pickles_to_a_normalised_rgb_run_and_its_predictions(tmp_path):
    """CIFAR-10 batches -> 2x2 on 2 ranks: config.json and results.json hold the file's
    per-channel mean/std, every local CNN's state holds them, and mpidd.predict with the
    saved model (which normalises by itself) reproduces the run's CNN-DNN test accuracy."""
    write_cifar10(str(tmp_path / "cifar-10-batches-py"), per_batch=20)
    data = str(tmp_path / "cifar.h5")
    convert("cifar", str(tmp_path / "cifar-10-batches-py"), "--out", data, "--val", "20")
    with h5py.File(data) as f:
        mean, std = list(f.attrs["channel_mean"]), list(f.attrs["channel_std"])
        assert len(mean) == 3 and f["train/images"].shape == (80, 3, 32, 32)
    out = str(tmp_path / "run")
    proc = run(["--data", data, "--grid", "2x2", "--out", out, *TINY], np=2)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    r = results(out)
    for norm in (config["normalization"], r["normalization"]):
        assert norm["mean"] == pytest.approx(mean) and norm["std"] == pytest.approx(std)
    import torch
    state = torch.load(os.path.join(out, "model.pt"), weights_only=True)
    local = state["models"]["twolevel"]["local"][3]
    assert local["normalize.mean"].flatten().tolist() == pytest.approx(mean)
    cnn_dnn = r["accuracy"]["CNN-DNN"]["test"]
    proc = run([out, "--data", data, "--split", "test", "--out", str(tmp_path / "p.csv")],
               script=("-m", "mpidd.predict"))
    assert proc.returncode == 0, proc.stderr
    assert f"accuracy {100 * cnn_dnn:.2f}%" in proc.stdout

    # --normalize none: the same run without it, recorded as null
    out = str(tmp_path / "plain")
    proc = run(["--data", data, "--grid", "2x2", "--out", out, "--normalize", "none", *TINY], np=2)
    assert proc.returncode == 0, proc.stderr
    assert results(out)["normalization"] is None
    state = torch.load(os.path.join(out, "model.pt"), weights_only=True)
    assert not any(k.startswith("normalize.") for k in state["models"]["twolevel"]["local"][0])


def test_nifti_volumes_to_a_2x2x2_run(tmp_path):
    """NIfTI files (two classes: a bright blob in the lower or upper half) -> --shape 8x8x8
    uint8 volumes with a CT-like window -> 2x2x2 on 4 ranks (two subdomains each)."""
    rng = np.random.default_rng(0)
    grid = np.indices((10, 10, 10)).transpose(1, 2, 3, 0)
    for k, cls in enumerate(("lower", "upper")):
        for j in range(16):
            centre = rng.uniform(2, 8, 3)
            centre[2] = rng.uniform(1, 4) if k == 0 else rng.uniform(6, 9)
            blob = np.exp(-((grid - centre) ** 2).sum(-1) / 4)
            save_nifti(str(tmp_path / "vols" / cls / f"v{j}.nii.gz"),
                       -1000 + 1400 * blob + rng.normal(0, 20, blob.shape))
    data = str(tmp_path / "vols.h5")
    convert("nifti", str(tmp_path / "vols"), "--out", data, "--shape", "8x8x8", "--window", "-1000,400",
            "--dtype", "uint8", "--val", "0.2", "--test", "0.2")
    out = str(tmp_path / "run")
    proc = run(["--data", data, "--grid", "2x2x2", "--overlap", "1", "--out", out, *TINY], np=4)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    r = results(out)
    assert r["decomposition"]["grid"] == "2x2x2" and r["decomposition"]["subimage_shape"] == "6x6x6"
    assert r["sizes"] == {"train": 20, "val": 6, "test": 6} and r["classes"] == ["lower", "upper"]
    assert len(r["normalization"]["mean"]) == 1
