"""benchmarks/: the scripts that print BENCHMARKS.md's figures are not timed tests, but they must
keep running: each answers --help with its own command, and the I/O benchmark's chunk accounting
is checked on a tiny file."""

import glob
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "*.py")))


def test_every_benchmark_of_the_issue_is_there():
    names = {os.path.basename(s)[:-3] for s in SCRIPTS}
    assert {"time_to_accuracy", "overhead", "io_chunks", "communication", "scaling"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_benchmark_answers_help_with_its_command(script):
    proc = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"benchmarks/{os.path.basename(script)}" in open(script).read().split('"""')[1]


def test_io_benchmark_counts_the_chunks_a_subimage_touches(tiny):
    """16x16 images in 8x8 tiles: 2x2 subimages are single chunks (1.00x their share); with
    overlap 1 each 10x10 subimage meets all 4 chunks (4.00x)."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "io_chunks.py"), "--data", tiny,
                           "--grids", "2x2", "--overlaps", "0,1", "--chunks", ""],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = {int(m[0]): m for m in re.findall(r"^\s*2x2\s+(\d)\s+4\s+(\d+x\d+)\s+(yes|no)"
                                             r"\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)"
                                             r".*?(PASS|FAIL|--)\s*$", proc.stdout, re.M)}
    assert rows[0][1:] == ("8x8", "yes", "1.00", "1.00", "1.00", "PASS")
    assert rows[1][1:3] == ("10x10", "no") and rows[1][4] == "4.00" and rows[1][6] == "--"


def test_precision_benchmark_prints_both_precisions(tiny_h5):
    from mpidd.engine import precision_error
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "precision.py"), "--data", tiny_h5,
                           "--samples", "96", "--rounds", "1", "--grids", "2x2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    if precision_error("bf16-mixed", "cpu") is not None:
        assert "part 1 skipped" in proc.stdout
        return
    rows = re.findall(r"^(local CNN 2x2 \(8x8|global CNN \(16x16).*?\s(\d+)\s+(\d+)\s+([\d.]+)x", proc.stdout, re.M)
    assert [r[0] for r in rows] == ["local CNN 2x2 (8x8", "global CNN (16x16"], proc.stdout
    for _, rate32, rate16, ratio in rows:
        assert (int(rate32) > 0 and int(rate16) > 0
                and float(ratio) == pytest.approx(int(rate16) / int(rate32), abs=0.02))


def test_streaming_benchmark_sorts_the_training_split_by_class(tiny_h5, tmp_path):
    """The order part's worst case: the same training images and labels, sorted by class (stable),
    in the source's chunks; val and test as they are."""
    import importlib.util

    import h5py
    import numpy as np
    spec = importlib.util.spec_from_file_location("streaming", os.path.join(ROOT, "benchmarks", "streaming.py"))
    streaming = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(streaming)
    out = streaming.sorted_file(tiny_h5, str(tmp_path / "sorted.h5"))
    with h5py.File(tiny_h5, "r") as src, h5py.File(out, "r") as dst:
        y, x = src["train/labels"][:], src["train/images"][:]
        order = np.argsort(y, kind="stable")
        assert np.array_equal(dst["train/labels"][:], y[order]) and np.all(np.diff(dst["train/labels"][:]) >= 0)
        assert np.array_equal(dst["train/images"][:], x[order])
        assert dst["train/images"].chunks[0] == src["train/images"].chunks[0]
        for split in ("val", "test"):
            assert np.array_equal(dst[split]["images"][:], src[split]["images"][:])


def test_time_to_accuracy_figure_draws_every_point(tmp_path, monkeypatch):
    """The benchmark's figure: mpidd's runs (one point per E) and the global CNN's curves (DDP:
    the slowest process's CPU), against critical-path CPU seconds, on a non-blank PNG."""
    import importlib.util

    import matplotlib.axes
    import matplotlib.image
    import numpy as np
    spec = importlib.util.spec_from_file_location("tta", os.path.join(ROOT, "benchmarks", "time_to_accuracy.py"))
    tta = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tta)
    summary = {"target": 0.9, "rows": [
        {"method": "mpidd CNN-DNN 2x2", "processes": 4,
         "curve": [{"epoch": 2, "test_acc": 0.88, "cpu_s": 30.0}, {"epoch": 3, "test_acc": 0.905, "cpu_s": 44.0}]},
        {"method": "global CNN", "processes": 1,
         "curve": [{"epoch": 0.25, "test_acc": 0.8, "cpu_s": [40.0]},
                   {"epoch": 0.5, "test_acc": 0.86, "cpu_s": [80.0]}]},
        {"method": "global CNN, DDP (gloo)", "processes": 4,
         "curve": [{"epoch": 0.25, "test_acc": 0.78, "cpu_s": [12.0, 15.0, 11.0, 13.0]}]}]}
    drawn, plot = [], matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda self, x, y, **kw: drawn.append((list(x), list(y))) or plot(self, x, y, **kw))
    path = tta.plot(summary, str(tmp_path / "tta.png"))
    assert drawn == [([30.0, 44.0], [88.0, 90.5]), ([40.0, 80.0], [80.0, 86.0]), ([15.0], [78.0])]
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[0] > 100 and np.std(pixels) > 0.05


def test_docs_figures_blocks_hold_what_a_benchmark_printed():
    """make docs-figures' benchmark blocks: the command, the wall time, the provenance and the
    printed lines from `first` to `last`, between the block's own markers."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("docs_figures", os.path.join(ROOT, "benchmarks", "docs_figures.py"))
    docs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(docs)
    output = ("[mpidd] E=2: mpirun ...\nTime to test accuracy 0.900\nrow 1\nmpidd critical path shorter: yes\n"
              "results: /tmp\n")
    block = docs.benchmark_block("python b.py", output, "Time to test accuracy", "mpidd critical path", 125.0,
                                 {"source": {"commit": "0123456789abcdef", "dirty": False}})
    assert block.startswith("`python b.py` took 2m05s wall at commit 0123456, ")
    assert block.endswith("\n\n```\nTime to test accuracy 0.900\nrow 1\nmpidd critical path shorter: yes\n```")
    text = "a\n<!-- demo:begin -->\nx\n<!-- demo:end -->\n<!-- tta:begin -->\nold\n<!-- tta:end -->\nb\n"
    assert docs.replace_block(text, "new", "T", "tta") == text.replace("old", "new")
    with pytest.raises(SystemExit):
        docs.replace_block(text, "new", "T", "scaling")


def test_critical_path_benchmark_adds_up_the_phases(tiny, tmp_path):
    """2 ranks, 2x2 (P < N): the path with one rank per subdomain is the sum of its phases and no
    longer than the run's own (each rank trains two local CNNs one after another)."""
    out = tmp_path / "runs"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "critical_path.py"), "--data", tiny,
                           "--grids", "2x2", "--precisions", "32", "--epochs", "1", "--np", "2", "--out", str(out),
                           "--", "--batch-size", "32", "--width", "8", "--hidden", "16", "--coarse-steps", "50"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    row = re.search(r"^\s*2x2\s+32\s+8x8\s+" + r"([\d.]+)\s+" * 7 + r"([\d.]+)/2\s", proc.stdout, re.M)
    assert row, proc.stdout
    *parts, path, run_path = map(float, row.groups())
    assert all(p >= 0 for p in parts) and parts[1] > 0 and parts[5] > 0  # training steps, coarse DNN
    assert path == pytest.approx(sum(parts), abs=0.03) and path <= run_path + 0.01
