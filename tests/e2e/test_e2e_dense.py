"""End to end: mpidd.train --task regress | segment under mpirun, on tiny fields (in subprocesses)."""

import json
import os

import h5py
import numpy as np
import pytest

from mpidd.metrics import regression_scores, regression_sums, ssim
from mpidd.writer import write_dataset

from test_e2e import run

FAST = ["--epochs", "2", "--coarse-epochs", "2", "--coherent-epochs", "1", "--batch-size", "32",
        "--coarse-batch-size", "32", "--unet-width", "8", "--threads", "1", "--log-interval", "0", "--no-report"]


def fields(n, seed):
    """Sources (n, 1, 16, 16) and the fields a wide blur makes of them (reaching across 8x8 boxes)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, 1, 16, 16, generator=g) > 0.9).float() * torch.rand(n, 1, 16, 16, generator=g)
    u = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(x, (4, 4, 4, 4)), 9, 1) * 9
    return x.numpy(), u.numpy()


@pytest.fixture(scope="module")
def dense_files(tmp_path_factory):
    """A regression file (sources -> fields) and a segmentation file (its fields' level sets)."""
    d = tmp_path_factory.mktemp("dense")
    regress, segment = {}, {}
    for k, (split, n) in enumerate((("train", 96), ("val", 32), ("test", 32))):
        x, u = fields(n, k)
        regress[split] = (x, None, u)
        segment[split] = (x, np.zeros(n, np.int64), np.digitize(u[:, 0], [0.3, 0.8]).astype(np.uint8))
    return (write_dataset(str(d / "regress.h5"), regress),
            write_dataset(str(d / "segment.h5"), segment, classes=["a", "b"], target_classes=["low", "mid", "high"]))


def results(out):
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def regress_runs(dense_files, tmp_path_factory):
    outs = {}
    for np_ in (1, 2, 4):
        out = str(tmp_path_factory.mktemp("runs") / f"np{np_}")
        report = ["--report"] if np_ == 2 else []  # after FAST's --no-report
        proc = run(["--task", "regress", "--data", dense_files[0], "--grid", "2x2", "--out", out, *FAST, *report],
                   np=np_)
        assert proc.returncode == 0, proc.stderr + proc.stdout
        outs[np_] = (out, proc)
    return outs


def test_a_dense_run_is_the_same_on_1_2_and_4_ranks(regress_runs, dense_files):
    """Local U-Nets, two-level, coherent (from random weights, and from the two-level model) and the
    global U-Net, the global U-Net domain parallel: every score (SSIM too) and every predicted value
    the same at every rank count; the domain-parallel U-Net close to the global U-Net it computes;
    the scores are those of the written predictions."""
    r = {np_: results(out) for np_, (out, _) in regress_runs.items()}
    keys = ("local_only", "two_level", "coherent_random", "coherent_pretrained", "domain_parallel", "global")
    names = ["local U-Nets (no exchange)", "two-level (coarse exchange)", "coherent (random init)",
             "coherent (transfer learning)", "global U-Net, domain parallel", "global U-Net"]
    assert list(r[1]["metrics"]) == names
    assert r[1]["metrics"] == r[2]["metrics"] == r[4]["metrics"]
    assert r[4]["decomposition"]["rank_of_subdomain"] == [0, 1, 2, 3] and r[2]["world_size"] == 2
    with h5py.File(dense_files[0]) as f:
        target = f["test/targets"][...]
    preds = {}
    for np_, (out, proc) in regress_runs.items():
        with h5py.File(os.path.join(out, "predictions.h5")) as f:
            preds[np_] = {k: f["test"][k][...] for k in keys}
        assert "two-level (coarse exchange)" in proc.stdout and "critical path" in proc.stdout
        assert "phase 1 of 6: local U-Nets" in proc.stdout and "phase 6 of 6: global U-Net on rank 0" in proc.stdout
        assert " left" in next(line for line in proc.stdout.splitlines() if line.startswith("coherent (random init)"))
    for k in preds[1]:
        assert np.array_equal(preds[1][k], preds[2][k]) and np.array_equal(preds[1][k], preds[4][k]), k
    # the same model and batches as the global U-Net: 1.4e-3 apart at most after 6 Adam steps (fields ~0.25),
    # where another model is 0.67 away
    assert np.allclose(preds[1]["domain_parallel"], preds[1]["global"], atol=5e-3)
    assert not np.allclose(preds[1]["global"], preds[1]["coherent_random"], atol=5e-3)
    for key, name in zip(keys, names):
        want = regression_scores(regression_sums(preds[1][key], target))
        got = r[1]["metrics"][name]["test"]
        assert got["mae"] == pytest.approx(want["mae"], rel=1e-5) and got["rel_l2"] == pytest.approx(
            want["rel_l2"], rel=1e-5)
        want_ssim = ssim(preds[1][key], target, target.max() - target.min()).mean()
        assert got["ssim"] == pytest.approx(want_ssim, rel=1e-6)
    assert not np.array_equal(preds[1]["local_only"], preds[1]["two_level"])  # the corrections reached the fields
    assert not np.array_equal(preds[1]["two_level"], preds[1]["coherent_pretrained"])  # it trained on
    timing = r[4]["timing"]
    assert timing["critical_path"]["cpu_s"] > 0 and timing["global_train_cpu_s"] > 0
    assert timing["coherent_pretrained"]["cpu_s_max"] > 0 and timing["domain_parallel"]["cpu_s_max"] > 0
    out = regress_runs[2][0]
    assert os.path.exists(os.path.join(out, "logs", "rank1.log")) and os.path.exists(os.path.join(out, "metrics.csv"))


def test_a_dense_run_reports_its_scores_and_draws_its_predictions(regress_runs, dense_files):
    """RUN/report/report.md: every model's scores and a figure of each model's test predictions,
    which show the predictions.h5 and data file's values; mpidd.report prints the run's table."""
    import subprocess
    import sys
    from mpidd.figures import dense_panels
    out, proc = regress_runs[2]
    r = results(out)
    with open(os.path.join(out, "report", "report.md")) as f:
        report = f.read()
    for name, dataset in r["predictions"]["datasets"].items():
        figure = f"np2_predictions_{dataset.split('/')[-1]}.png"
        assert f"| {name} | " in report and f"]({figure})" in report
        assert os.path.getsize(os.path.join(out, "report", figure)) > 10_000
    assert "np2_curves.png" in report and "np2_phases.png" in report
    panels = dense_panels(out, r, "test/two_level", samples=2)
    with h5py.File(os.path.join(out, "predictions.h5")) as p, h5py.File(dense_files[0]) as d:
        for k, (i, image, target, pred, error) in enumerate(panels):
            assert i == k and np.array_equal(image, d["test/images"][k, 0])
            assert np.array_equal(target, d["test/targets"][k, 0]) and np.array_equal(pred, p["test/two_level"][k, 0])
            assert np.allclose(error, np.abs(p["test/two_level"][k, 0] - d["test/targets"][k, 0]))
    table = subprocess.run([sys.executable, "-m", "mpidd.report", out], capture_output=True, text=True)
    assert table.returncode == 0 and table.stdout.strip() in proc.stdout, table.stderr + table.stdout
    assert "two-level (coarse exchange)" in table.stdout


def test_a_dense_run_is_predicted_again_from_its_model_file(regress_runs, dense_files, tmp_path):
    """RUN/model.pt: mpidd.predict (1 and 2 ranks) and TwoLevelUNet.load give the run's own test
    predictions, model by model, and the scores of results.json."""
    from mpi4py import MPI

    import mpidd
    out, _ = regress_runs[2]
    with h5py.File(os.path.join(out, "predictions.h5")) as f:
        written = {k: f["test"][k][...] for k in f["test"]}
    for np_, model, key in ((2, None, "coherent_pretrained"), (1, "two-level", "two_level")):
        path = str(tmp_path / f"p{np_}.h5")
        proc = run([os.path.join(out), "--data", dense_files[0], "--out", path, *(["--model", model] if model else [])],
                   np=np_, script=("-m", "mpidd.predict"))
        assert proc.returncode == 0, proc.stderr + proc.stdout
        with h5py.File(path) as f:
            assert np.array_equal(f["predictions"][...], written[key]), key
        mae = results(out)["metrics"][{"coherent_pretrained": "coherent (transfer learning)",
                                       "two_level": "two-level (coarse exchange)"}[key]]["test"]["mae"]
        assert f"mae {mae:.5f}" in proc.stdout, proc.stdout
    net = mpidd.TwoLevelUNet.load(out, comm=MPI.COMM_SELF)
    with h5py.File(dense_files[0]) as f:
        x = f["test/images"][...]
    assert np.array_equal(net.predict(x, "local-only"), written["local_only"])
    assert sorted(net.scores_) == ["coherent-pretrained", "coherent-random", "local-only", "two-level"]
    bad = run([out, "--data", dense_files[0], "--out", str(tmp_path / "p.csv")], np=1, script=("-m", "mpidd.predict"))
    assert bad.returncode == 2 and "use --out FILE.h5" in bad.stderr


def test_a_segmentation_run_scores_every_class(dense_files, tmp_path):
    out = str(tmp_path / "seg")
    proc = run(["--task", "segment", "--loss", "ce+dice", "--mode", "twolevel", "--data", dense_files[1],
                "--out", out, *FAST], np=2)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    r = results(out)
    assert r["task"] == "segment" and r["targets"]["classes"] == ["low", "mid", "high"]
    assert list(r["metrics"]) == ["local U-Nets (no exchange)", "two-level (coarse exchange)"]
    for m in r["metrics"].values():
        assert len(m["test"]["iou"]) == 3 and 0 < m["test"]["miou"] <= 1 and 0 < m["test"]["pixel_acc"] <= 1
    assert "test miou" in proc.stdout and "pixel acc" in proc.stdout  # the table, the progress lines
    with h5py.File(os.path.join(out, "predictions.h5")) as f:
        masks = f["test/two_level"][...]
    assert masks.shape == (32, 16, 16) and set(np.unique(masks).tolist()) <= {0, 1, 2}
    from mpidd.figures import dense_panels, dense_predictions
    with h5py.File(dense_files[1]) as d:
        truth = d["test/targets"][:2]
    for k, (_, _, target, pred, error) in enumerate(dense_panels(out, r, "test/two_level", samples=2)):
        assert np.array_equal(target, truth[k]) and np.array_equal(error, masks[k] != truth[k])
    assert dense_predictions(out, r, "test/two_level", "two-level", str(tmp_path / "masks.png")) is not None


def test_a_dense_run_with_overlap_sees_a_halo_and_predicts_its_tiles(dense_files, tmp_path):
    """--overlap 2: each local U-Net reads its 8x8 tile with 2 pixels of its neighbours' (12x12
    boxes, shifted inwards at the border) and predicts its tile; mpidd.predict on one rank
    rebuilds the same models from RUN/model.pt and predicts the run's fields again."""
    out = str(tmp_path / "halo")
    proc = run(["--task", "regress", "--mode", "twolevel", "--overlap", "2", "--data", dense_files[0], "--grid", "2x2",
                "--out", out, *FAST], np=2)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    d = results(out)["decomposition"]
    assert (d["overlap"], d["subimage_shape"], d["tile_shape"]) == (2, [12, 12], [8, 8])
    assert "subimages 12x12 (overlap 2) predicting tiles 8x8" in proc.stdout
    with h5py.File(os.path.join(out, "predictions.h5")) as f:
        written = {k: f["test"][k][...] for k in f["test"]}
    assert written["two_level"].shape == (32, 1, 16, 16)
    path = str(tmp_path / "again.h5")
    again = run([out, "--data", dense_files[0], "--out", path], np=1, script=("-m", "mpidd.predict"))
    assert again.returncode == 0, again.stderr + again.stdout
    with h5py.File(path) as f:
        assert np.array_equal(f["predictions"][...], written["two_level"])


@pytest.mark.parametrize("phase,rank,polls,sig", [("local", 1, 5, "USR1"), ("coarse", 1, 3, "TERM"),
                                                  ("coherent_dense", 0, 4, "USR1"), ("domain_parallel", 1, 4, "USR1"),
                                                  ("global", 0, 4, "TERM")])
def test_a_stopped_dense_run_resumes_to_the_uninterrupted_results(phase, rank, polls, sig, regress_runs, dense_files,
                                                                  tmp_path):
    """A signal on one rank in each phase stops every rank (exit 75, state saved); --resume
    ends with the scores, predictions and metrics.csv of the run that was never stopped."""
    import csv
    signal_helper = os.path.join(os.path.dirname(os.path.dirname(__file__)), "helpers", "signal_on_rank.py")
    whole, _ = regress_runs[2]
    out = str(tmp_path / "run")
    proc = run([str(rank), phase, str(polls), sig, "--task", "regress", "--data", dense_files[0], "--grid", "2x2",
                "--out", out, *FAST], np=2, script=(signal_helper,))
    assert proc.returncode == 75, proc.stderr + proc.stdout
    assert f"--resume {out}" in proc.stdout and not os.path.exists(os.path.join(out, "results.json"))
    proc = run(["--resume", out], np=2)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "resuming" in proc.stdout
    done_before = {"local": [], "coarse": ["local 0 (0, 0): epoch"],  # trainings read back: no step, no line
                   "coherent_dense": ["local 0 (0, 0): epoch", "coarse exchange: epoch"],
                   "domain_parallel": ["local 0 (0, 0): epoch", "coarse exchange: epoch",
                                       "coherent (transfer learning): epoch"],
                   "global": ["local 0 (0, 0): epoch", "coarse exchange: epoch", "coherent (transfer learning): epoch",
                              "global U-Net, domain parallel: epoch"]}
    assert not [line for line in done_before[phase] if line in proc.stdout], proc.stdout
    got, want = results(out), results(whole)
    assert got["metrics"] == want["metrics"] and len(got["restarts"]["segments"]) == 2
    with h5py.File(os.path.join(out, "predictions.h5")) as f, h5py.File(os.path.join(whole, "predictions.h5")) as g:
        assert sorted(f["test"]) == sorted(g["test"])
        for k in f["test"]:
            assert np.array_equal(f["test"][k][...], g["test"][k][...]), k

    def scores(run_dir):
        with open(os.path.join(run_dir, "metrics.csv")) as f:
            return sorted((r["model"], r["epoch"], r["loss"], r["val_acc"]) for r in csv.DictReader(f))
    assert scores(out) == scores(whole)
    assert not [f for f in os.listdir(os.path.join(out, "checkpoints")) if "state" in f]  # resume states removed


def test_image_files_and_masks_convert_and_train(tmp_path):
    """data_prep.image_folder --masks on PNG files written here, then mpidd.train --task segment
    on 2 ranks: the converter's masks are what the run scores."""
    import subprocess
    import sys

    from PIL import Image
    from conftest import ROOT
    x, u = fields(40, 7)
    for k in range(40):
        image = (255 * x[k, 0] / max(x[k, 0].max(), 1e-6)).astype(np.uint8)
        Image.fromarray(image).save(tmp_path / f"img{k:02d}.png")
        (tmp_path / "masks").mkdir(exist_ok=True)
        Image.fromarray((u[k, 0] > 0.3).astype(np.uint8)).save(tmp_path / "masks" / f"img{k:02d}.png")
    (tmp_path / "images").mkdir()
    for f in tmp_path.glob("img*.png"):
        f.rename(tmp_path / "images" / f.name)
    data = str(tmp_path / "seg.h5")
    conv = subprocess.run([sys.executable, "-m", "data_prep.image_folder", str(tmp_path / "images"), "--masks",
                           str(tmp_path / "masks"), "--mask-classes", "cold,warm", "--color", "gray", "--out", data,
                           "--val", "0.2", "--test", "0.2"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert conv.returncode == 0, conv.stderr
    out = str(tmp_path / "run")
    proc = run(["--task", "segment", "--mode", "twolevel", "--data", data, "--grid", "2x2", "--out", out, *FAST],
               np=2)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    r = results(out)
    assert r["targets"]["classes"] == ["cold", "warm"] and r["sizes"] == {"train": 24, "val": 8, "test": 8}
    with h5py.File(data) as f:
        assert np.isin(f["test/targets"][...], [0, 1]).all() and f["test/targets"][...].any()
    assert all(len(m["test"]["iou"]) == 2 for m in r["metrics"].values())


def broken(path, tmp_path, edit):
    """A copy of `path` changed by edit(h5py.File)."""
    import shutil
    copy = str(tmp_path / f"{edit.__name__}.h5")
    shutil.copy(path, copy)
    with h5py.File(copy, "r+") as f:
        edit(f)
    return copy


def nan_in_last_box(f):
    f["val/targets"][5, 0, 12, 12] = np.nan  # subdomain 3 (bottom right): rank 1 of 2 reads it


def mask_out_of_range(f):
    f["train/targets"][7, 2, 3] = 9


@pytest.mark.parametrize("case", ["nan", "mask", "kind", "ranks", "overlap", "mode", "stream", "halo", "halo_dice"])
def test_bad_dense_runs_are_refused_in_one_line(dense_files, tmp_path, case):
    regress, segment = dense_files
    args, np_, message = {
        "nan": (["--task", "regress", "--data", broken(regress, tmp_path, nan_in_last_box)], 2,
                "target 5 holds NaN or inf values; clean the data file (found by rank 1)"),
        "mask": (["--task", "segment", "--data", broken(segment, tmp_path, mask_out_of_range)], 2,
                 "mask 7 holds class 9, outside 0..2"),
        "kind": (["--task", "segment", "--data", regress], 1, "--task segment needs masks"),
        "ranks": (["--task", "regress", "--data", regress, "--grid", "1x2"], 3, "3 ranks but only 2 subdomains"),
        "overlap": (["--task", "regress", "--data", regress, "--overlap", "5"], 1,
                    "overlap 5 too large for grid 2x2 on images 16x16: at most 4 along axis 0"),
        "mode": (["--task", "regress", "--data", regress, "--mode", "width"], 1,
                 "trains --mode twolevel, coherent, halo, global or compare, without --from and --dry-run: "
                 "drop --mode width"),
        "stream": (["--task", "regress", "--data", regress, "--data-access", "stream"], 1,
                   "drop --data-access stream"),
        "halo": (["--task", "regress", "--data", regress, "--mode", "halo", "--unet-depth", "4"], 2,
                 "tiles 8x8 of 16x16 do not: choose another --grid or --unet-depth"),
        "halo_dice": (["--task", "segment", "--data", segment, "--mode", "halo", "--loss", "ce+dice"], 1,
                      "the domain-parallel U-Net trains on a mean over pixels (--loss mse, l1 or ce), not on "
                      "--loss ce+dice"),
    }[case]
    out = str(tmp_path / "run")
    grid = [] if "--grid" in args else ["--grid", "2x2"]
    proc = run([*args, *grid, "--out", out, *FAST], np=np_)
    assert proc.returncode == 2, proc.stderr + proc.stdout
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not os.path.exists(out)
