"""End to end, the follow-up's backbones: --arch densenet and ctcnn (the Keras CT example's CNN)
in every mode under mpirun, streamed, and mpidd.predict on their model files; the CT CNN on
volumes cut 4x4x2. Tiny data and tiny widths: this tests the paths, not the accuracy."""

import os

import h5py
import pytest

from conftest import make_tiny_dataset
from mpidd.writer import write_dataset
from test_e2e import TINY, results, run


def predicted_accuracy(run_dir, data, np_, model, tmp_path):
    proc = run([run_dir, "--data", data, "--out", str(tmp_path / f"{model}.csv"), "--model", model,
                "--threads", "1"], np=np_, script=("-m", "mpidd.predict"))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    """96/32/32 volumes of 16x16x16, chunks of 8 samples (a few blocks to stream)."""
    src = make_tiny_dataset(tmp_path_factory.mktemp("v") / "src.h5", n=(96, 32, 32), size=16, spatial=3)
    with h5py.File(src, "r") as f:
        splits = {s: (f[s]["images"][...], f[s]["labels"][...]) for s in ("train", "val", "test")}
    return write_dataset(str(tmp_path_factory.mktemp("v") / "vol.h5"), splits, classes=[f"c{k}" for k in range(4)],
                         chunk_samples=8)


def test_densenet_in_every_mode_and_predict(tiny, tmp_path):
    out = str(tmp_path / "dense")
    flags = [*TINY, "--arch", "densenet", "--dense-layers", "2,2", "--data-access", "stream"]
    proc = run(["--data", tiny, "--grid", "2x2", "--mode", "compare", "--out", out, *flags], np=2)
    assert proc.returncode == 0, proc.stderr
    assert "densenet local width factor" in proc.stdout
    r = results(out)
    assert r["arch"] == "densenet" and r["config"]["dense_layers"] == [2, 2]
    assert {"CNN-DNN", "coherent (random init)", "coherent (transfer learning)", "global CNN"} <= set(r["accuracy"])
    assert 0.7 / 4 < r["parameters"]["local"] / r["parameters"]["global"] < 1.3 / 4
    for model, name in (("cnn-dnn", "CNN-DNN"), ("global", "global CNN"), ("coherent", "coherent (transfer learning)")):
        acc = r["accuracy"][name]["test"]
        assert f"accuracy {100 * acc:.2f}%" in predicted_accuracy(out, tiny, 1, model, tmp_path), model
    proc = run(["--data", tiny, "--mode", "width", "--subnets", "2", "--out", str(tmp_path / "w"), *flags], np=2,
               timeout=120)
    assert proc.returncode == 2 and "a DenseNet's concatenated features" in proc.stderr, proc.stderr
    assert not (tmp_path / "w").exists()


def test_ct_cnn_on_volumes_cut_4x4x2_streamed_and_predict(volumes, tmp_path):
    """32 subvolumes of 4x4x8 on 4 ranks (8 each, in turn), every model of --mode compare, read
    batch by batch in the blocks order; then width mode, which recomposes the CT CNN."""
    out = str(tmp_path / "ct")
    flags = [*TINY, "--arch", "ctcnn", "--depth", "3", "--hidden", "32", "--data-access", "stream",
             "--shuffle", "blocks", "--epochs", "1", "--coherent-epochs", "1"]
    proc = run(["--data", volumes, "--grid", "4x4x2", "--mode", "compare", "--out", out, *flags], np=4)
    assert proc.returncode == 0, proc.stderr
    r = results(out)
    assert r["decomposition"]["grid"] == "4x4x2" and r["decomposition"]["subimage_shape"] == "4x4x8"
    assert r["config"]["shuffle_block"] == 8
    for stats in r["per_rank"]:
        assert stats["data_access"] == "stream" and len(stats["subdomains"]) == 8
        assert stats["stream"]["bytes_read"] >= 8 * 96 * 4 * 4 * 8  # its boxes, one epoch at least
    acc = r["accuracy"]["CNN-DNN"]["test"]
    assert f"accuracy {100 * acc:.2f}%" in predicted_accuracy(out, volumes, 2, "cnn-dnn", tmp_path)
    width = str(tmp_path / "ct_width")
    proc = run(["--data", volumes, "--mode", "width", "--subnets", "2", "--subnet-epochs", "1", "--out", width,
                *flags], np=2)
    assert proc.returncode == 0, proc.stderr
    w = results(width)
    acc = next(m["test_acc"] for m in w["models"] if m["kind"] == "recomposed")
    assert f"accuracy {100 * acc:.2f}%" in predicted_accuracy(width, volumes, 1, "recomposed", tmp_path)
    assert w["arch"] == "ctcnn" and os.path.exists(os.path.join(width, "model.pt"))
