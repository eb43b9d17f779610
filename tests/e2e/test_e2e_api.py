"""End to end, the Python API and predict as a user runs them: scripts under mpirun (two
classifiers at once on sub-communicators; the API against the command line), and
python -m mpidd.predict on a finished run at several rank counts, on HDF5, .npy and PNG input,
and its refusals."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, make_tiny_dataset
from test_e2e import launcher, results, run

API_FIT = (os.path.join(ROOT, "tests", "helpers", "api_fit.py"),)
PREDICT = ("-m", "mpidd.predict")
# the command line's flags for api_fit.OPTIONS
CLI = ["--grid", "2x2", "--epochs", "2", "--batch-size", "32", "--width", "8", "--hidden", "16",
       "--coarse-epochs", "4", "--coarse-steps", "200", "--coarse-batch-size", "32", "--coherent-epochs", "1",
       "--threads", "1", "--seed", "2"]


@pytest.fixture(scope="module")
def hard(tmp_path_factory):
    """Noisy enough that no model is near 0% or 100% (so equal accuracies mean something)."""
    return make_tiny_dataset(tmp_path_factory.mktemp("hard") / "hard.h5", n=(512, 128, 128), noise=0.6, seed=3)


@pytest.fixture(scope="module")
def cli_run(hard, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("runs") / "compare")
    proc = run(["--data", hard, "--mode", "compare", "--overlap", "1", "--out", out, *CLI], np=2)
    assert proc.returncode == 0, proc.stderr
    return out


def test_two_classifiers_on_split_communicators_equal_each_alone(hard, tiny, tmp_path):
    """mpirun -n 4: COMM_WORLD split in two; each half fits its own data at the same time and
    gets, bit for bit, what the same fit gets alone under mpirun -n 2."""
    proc = run(["split", str(tmp_path), hard, tiny], np=4, script=API_FIT)
    assert proc.returncode == 0, proc.stderr
    for name, path in (("A", hard), ("B", tiny)):
        alone = tmp_path / name
        alone.mkdir()
        proc = run(["alone", str(alone), path], np=2, script=API_FIT)
        assert proc.returncode == 0, proc.stderr
        together, by_itself = np.load(tmp_path / f"{name}.npz"), np.load(alone / "alone.npz")
        for model in ("cnn-dnn", "average", "vote"):
            assert np.array_equal(together[model], by_itself[model]), (name, model)
    a, b = np.load(tmp_path / "A.npz"), np.load(tmp_path / "B.npz")
    assert not np.array_equal(a["cnn-dnn"], b["cnn-dnn"])


def test_the_api_and_the_command_line_give_the_same_model(cli_run, hard, tmp_path):
    proc = run(["cli", str(tmp_path), hard, "overlap=1"], np=2, script=API_FIT)
    assert proc.returncode == 0, proc.stderr
    api = json.load(open(tmp_path / "api_scores.json"))
    cli = results(cli_run)["accuracy"]
    for model, name in (("cnn-dnn", "CNN-DNN"), ("average", "average"), ("vote", "majority vote"),
                        ("coherent_random", "coherent (random init)"),
                        ("coherent_pretrained", "coherent (transfer learning)")):
        assert api["test"][model] == cli[name]["test"], model
        assert api["val"][model]["val"] == cli[name]["val"], model
    assert 0.3 < cli["CNN-DNN"]["test"] < 0.95  # a discriminating case
    mine = torch.load(tmp_path / "api_model.pt", weights_only=True)["models"]
    theirs = torch.load(os.path.join(cli_run, "model.pt"), weights_only=True)["models"]
    assert sorted(theirs) == ["coherent_pretrained", "coherent_random", "global", "twolevel"]
    for kind in ("twolevel", "coherent_random", "coherent_pretrained"):
        for i in range(4):
            for key, value in theirs[kind]["local"][i].items():
                assert torch.equal(mine[kind]["local"][i][key], value), (kind, i, key)
        for key, value in theirs[kind]["dnn"].items():
            assert torch.equal(mine[kind]["dnn"][key], value), (kind, key)


def predictions(path):
    import csv
    with open(path) as f:
        return list(csv.DictReader(f))


def test_predict_reproduces_the_runs_test_accuracies_at_1_2_4_and_8_ranks(cli_run, hard, tmp_path):
    accuracy = results(cli_run)["accuracy"]
    rows = {}
    for model, name in (("cnn-dnn", "CNN-DNN"), ("average", "average"), ("vote", "majority vote"),
                        ("coherent", "coherent (transfer learning)"), ("global", "global CNN")):
        for np_ in ((1, 2, 4, 8) if model == "cnn-dnn" else (3,)):  # 8: two ranks per subdomain, half the images each
            out = str(tmp_path / f"{model}_{np_}.csv")
            proc = run([cli_run, "--data", hard, "--out", out, "--model", model, "--threads", "1"], np=np_,
                       script=PREDICT)
            assert proc.returncode == 0, proc.stderr
            rows[model, np_] = predictions(out)
            correct = sum(int(r["correct"]) for r in rows[model, np_])
            assert correct / 128 == accuracy[name]["test"], (model, np_)
            assert f"accuracy {100 * accuracy[name]['test']:.2f}%" in proc.stdout
    assert rows["cnn-dnn", 1] == rows["cnn-dnn", 2] == rows["cnn-dnn", 4] == rows["cnn-dnn", 8]  # to the digit
    first = rows["cnn-dnn", 1][0]
    assert (list(first)[:3] == ["index", "predicted", "class_name"]
            and first["class_name"] == f"class{first['predicted']}")
    assert sum(float(first[f"p_class{k}"]) for k in range(4)) == pytest.approx(1, abs=1e-4)


def test_predict_classifies_png_files_and_arrays(cli_run, hard, tmp_path):
    import h5py
    from PIL import Image
    with h5py.File(hard) as f:
        x = f["test/images"][:6]
    folder = tmp_path / "pngs"
    folder.mkdir()
    for k in range(6):
        Image.fromarray(x[k, 0]).save(folder / f"img{k}.png")
    np.save(tmp_path / "x.npy", x)
    out = {}
    for name, source in (("png", folder), ("npy", tmp_path / "x.npy")):
        out[name] = str(tmp_path / f"{name}.csv")
        proc = run([cli_run, "--data", str(source), "--out", out[name], "--threads", "1"], np=2, script=PREDICT)
        assert proc.returncode == 0, proc.stderr
        assert "6 images" in proc.stdout
    png, npy = predictions(out["png"]), predictions(out["npy"])
    assert [r["file"] for r in png] == [f"img{k}.png" for k in range(6)]
    assert [r["predicted"] for r in png] == [r["predicted"] for r in npy]
    h5 = str(tmp_path / "p.h5")
    proc = run([cli_run, "--data", hard, "--out", h5, "--model", "average"], script=PREDICT)
    assert proc.returncode == 0, proc.stderr
    with h5py.File(h5) as f:
        assert f["probabilities"].shape == (128, 4) and list(f.attrs["classes"])[0] == "class0"
        assert np.array_equal(f["labels"][...], h5py.File(hard)["test/labels"][...])


def test_predict_refusals(cli_run, hard, tmp_path):
    from PIL import Image
    other = make_tiny_dataset(tmp_path / "big.h5", n=(8, 8, 8), size=20)
    rgb = make_tiny_dataset(tmp_path / "rgb.h5", n=(8, 8, 8), channels=3)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    with open(os.path.join(cli_run, "model.pt"), "rb") as f:
        (corrupt / "model.pt").write_bytes(f.read()[:5000])
    (tmp_path / "empty").mkdir()
    (tmp_path / "small").mkdir()
    Image.fromarray(np.zeros((12, 16), np.uint8)).save(tmp_path / "small" / "a.png")
    cases = [
        ([cli_run, "--data", other], 2, "images of shape 1x20x20 .* the model takes 1x16x16"),
        ([cli_run, "--data", rgb], 1, "images of shape 3x16x16"),
        ([str(tmp_path), "--data", hard], 2, "no saved model at"),
        ([str(corrupt), "--data", hard], 2, "cannot read .*corrupt"),
        ([cli_run, "--data", str(tmp_path / "small")], 2, "is 12x16 pixels, the model takes 16x16"),
        ([cli_run, "--data", str(tmp_path / "empty")], 1, "holds no image files"),
        ([cli_run, "--data", hard], 5, "5 ranks for 4 subdomains"),
    ]
    for args, np_, message in cases:
        out = tmp_path / "p.csv"
        proc = run([*args, "--out", str(out)], np=np_, script=PREDICT, timeout=120)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        errors = [line for line in proc.stderr.splitlines() if "error" in line]
        assert len(errors) == 1 and __import__("re").search(message, errors[0]), (message, proc.stderr)
        assert not out.exists()


def test_predict_help():
    proc = subprocess.run([sys.executable, "-m", "mpidd.predict", "--help"], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
    assert proc.returncode == 0
    for flag in ("--data", "--split", "--model", "--format", "(default: test)"):
        assert flag in proc.stdout


def test_the_readme_python_example_runs_as_written(tmp_path):
    """README's "Use from Python" script, extracted verbatim, under mpirun -n 4."""
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    section = readme.split("## Use from Python", 1)[1]
    script = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert "mpidd.TwoLevelClassifier" in script and "comm=comm" in script
    (tmp_path / "fit_digits.py").write_text(script)
    proc = subprocess.run([*launcher(4), sys.executable, "fit_digits.py"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr
    printed = proc.stdout.strip().splitlines()
    assert len(printed) == 1 and "'cnn-dnn'" in printed[0] and "bytes sent" in printed[0]  # rank 0 alone prints
    scores = eval(printed[0].split("}")[0] + "}")
    assert all(50 < s <= 100 for s in scores.values()), scores  # 10 classes: chance is 10%
    assert (tmp_path / "digits_model.pt").exists()
