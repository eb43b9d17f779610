"""End to end: jobs/experiments/run.py --quick runs configurations of the papers' grid under
mpirun and ends in one report whose table holds every run's results.json numbers."""

import glob
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from test_e2e import launcher

RUNNER = os.path.join(ROOT, "jobs", "experiments", "run.py")
TINY = ["--batch-size", "32", "--width", "8", "--hidden", "16", "--threads", "1"]


def grid(*args, timeout=300):
    mpirun, pre = launcher(2)[0], launcher(2)[3:]  # jobs/local.sh passes -n itself
    env = dict(os.environ, MPIEXEC=mpirun, PYTHON=sys.executable, MPIEXEC_PREFLAGS=" ".join(pre), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, RUNNER, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("config", sorted(glob.glob(os.path.join(ROOT, "jobs", "experiments", "*.toml"))),
                         ids=os.path.basename)
def test_configuration_parses_as_mpidd_train_would(config):
    from mpidd.cli.arguments import parse_args
    args = parse_args(["--config", config])
    name = os.path.basename(config)[:-5]
    if name.startswith("fm_"):  # fm_GRID_overlapD_ARCH: what the name says is what runs
        grid, overlap, arch = name[3:].split("_")
        assert (args.mode, args.grid, f"overlap{args.overlap}", args.arch) == ("compare", grid, overlap, arch)
    else:
        assert (args.mode, args.arch) == ("width", name.split("_")[1])


def test_the_grid_covers_the_papers_experiments():
    names = {os.path.basename(c)[:-5] for c in glob.glob(os.path.join(ROOT, "jobs", "experiments", "*.toml"))}
    assert {f"fm_{g}_overlap{o}_{a}" for g in ("2x2", "4x4") for o in (0, 2) for a in ("vgg", "resnet")} <= names
    assert "width_vgg" in names


def test_quick_grid_ends_in_one_report(tiny, tmp_path):
    out = tmp_path / "grid"
    only = "fm_2x2_overlap2_vgg,fm_4x4_overlap0_resnet,width"
    proc = grid("--quick", "--np", "2", "--data", tiny, "--out", str(out), "--only", only, "--", *TINY)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    runs = ["fm_2x2_overlap2_vgg", "fm_4x4_overlap0_resnet", "width_vgg"]
    text = (out / "report" / "report.md").read_text()
    for name in runs:
        r = json.load(open(out / name / "results.json"))
        assert r["config"]["epochs"] == 1 and r["data"] == str(out / "data_quick.h5")  # --quick's budget and data
        row = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        kinds = {m["kind"]: m["test_acc"] for m in r["models"]}
        key = "recomposed" if name.startswith("width") else "cnn_dnn"
        assert f"{100 * kinds[key]:.2f}" in cells and f"{100 * kinds['global']:.2f}" in cells
    assert r["mode"] == "width"
    two = json.load(open(out / "fm_2x2_overlap2_vgg" / "results.json"))["decomposition"]
    assert (two["grid"], two["overlap"]) == ("2x2", 2)
    again = grid("--quick", "--np", "2", "--data", tiny, "--out", str(out), "--only", only, "--", *TINY)
    assert again.returncode == 0 and again.stdout.count("done before") == 3  # an interrupted grid continues


def test_unknown_configuration_is_refused(tmp_path):
    proc = grid("--only", "nothing_like_this", "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and "no configuration" in proc.stderr
