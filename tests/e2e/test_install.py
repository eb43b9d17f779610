"""mpidd installed as a package (`pip install .`), run from outside the checkout: its console
scripts mpidd-train, mpidd-predict, mpidd-report and mpidd-convert, and what it records about
itself. The installed copy is a plain --target folder on PYTHONPATH, so nothing of the
checkout is on the path."""

import os
import subprocess
import sys

import pytest

from conftest import launcher
from mpidd import __version__

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_backend_is_here() -> bool:
    """This environment has the build requirements of pyproject.toml (no download needed)."""
    import importlib.metadata
    import tomllib

    from packaging.requirements import Requirement
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        requires = tomllib.load(f)["build-system"]["requires"]
    for text in requires:
        req = Requirement(text)
        try:
            if not req.specifier.contains(importlib.metadata.version(req.name), prereleases=True):
                return False
        except importlib.metadata.PackageNotFoundError:
            return False
    return True


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the install folder, a directory outside the checkout to run in)."""
    target = tmp_path_factory.mktemp("site-packages")
    # no dependencies: torch, mpi4py and the rest are the environment's own; the build backend is
    # the environment's where it is recent enough for pyproject.toml, else pip fetches one
    isolation = ["--no-build-isolation"] if build_backend_is_here() else []
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *isolation,
                    "--target", str(target), ROOT], check=True, timeout=300)
    return target, tmp_path_factory.mktemp("elsewhere")


def run(installed, script, *argv):
    target, cwd = installed
    env = dict(os.environ, PYTHONPATH=str(target))
    return subprocess.run([str(target / "bin" / script), *argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_installed_copy_is_what_runs(installed):
    target, cwd = installed
    where = subprocess.run([sys.executable, "-c", "import mpidd, data_prep, mpidd.results as r; "
                            "print(mpidd.__file__); print(data_prep.__file__); print(r.source_commit())"],
                           cwd=cwd, env=dict(os.environ, PYTHONPATH=str(target)), capture_output=True, text=True,
                           check=True).stdout.split("\n")
    assert where[0].startswith(str(target)) and where[1].startswith(str(target))
    assert where[2] == "None"  # no checkout: results.json records no commit


@pytest.mark.parametrize("script", ["mpidd-train", "mpidd-predict", "mpidd-report"])
def test_console_scripts_version_and_help(installed, script):
    done = run(installed, script, "--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"mpidd {__version__}"
    done = run(installed, script, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: {script} ")


def test_mpidd_convert_lists_and_runs_a_converter(installed):
    done = run(installed, "mpidd-convert")
    assert done.returncode == 2 and "fashion_mnist" in done.stdout and "image_folder" in done.stdout
    done = run(installed, "mpidd-convert", "fashion_mnist", "--help")
    assert done.returncode == 0 and "--src" in done.stdout


def dry_run_table(installed, np, *argv):
    """Rank 0's table of `mpirun -n np mpidd-train --dry-run ...`: {rank: (subdomains, group, share)}."""
    target, cwd = installed
    done = subprocess.run([*launcher(np), str(target / "bin" / "mpidd-train"), "--dry-run", "--threads", "1", *argv],
                          cwd=cwd, env=dict(os.environ, PYTHONPATH=str(target), OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split()[:1] == ["rank"])
    rows = {}
    for line in lines[head + 1:head + 1 + np]:
        rank, _host, mine, group, share, unit, _access, _memory, _munit = line.split()
        rows[int(rank)] = (mine, group, float(share) * {"B": 1, "KiB": 1024, "MiB": 2**20}[unit])
    return done.stdout, rows


def test_dry_run_from_the_installed_copy(installed, tiny, tmp_path):
    """Which rank trains which subdomains and what it reads (512/128/128 images of 16x16 uint8:
    a box of 8x8 is 64 bytes an image), without training or making the run directory."""
    out = tmp_path / "never"
    text, rows = dry_run_table(installed, 3, "--data", str(tiny), "--grid", "2x2", "--out", str(out))
    images = 512 + 128 + 128
    assert not out.exists() and "grid 2x2" in text and '"grid": "2x2"' in text
    # P = 3 < N = 4: rank r trains r, r+3; rank 0 also reads the whole images for the global CNN
    assert rows == {0: ("0,3", "-", (2 * 64 + 256) * images), 1: ("1", "-", 64 * images),
                    2: ("2", "-", 64 * images)}
    # P = 4 = 2N on 1x2: two ranks a subdomain, each with half of the samples (data parallel)
    text, rows = dry_run_table(installed, 4, "--data", str(tiny), "--grid", "1x2", "--mode", "twolevel",
                               "--out", str(out))
    assert not out.exists()
    assert {r: rows[r][:2] for r in rows} == {0: ("0", "0/2"), 1: ("1", "0/2"), 2: ("0", "1/2"), 3: ("1", "1/2")}
    assert all(share == 16 * 8 * (256 + 64 + 64) for _, _, share in rows.values())
