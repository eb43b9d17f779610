"""Open MPI end to end: the real command line under Debian's Open MPI, in a subprocess.

`make test` (through `make openmpi`) installs Debian's openmpi-bin and libopenmpi-dev with apt and
builds an mpi4py against Open MPI into <venv>/openmpi. With that directory first on PYTHONPATH,
the venv's own Python (torch, h5py, mpidd) runs under `mpirun.openmpi`, beside the pip MPICH the
other suites use. With `make MPI=system` on an Open MPI machine, the venv's own mpi4py is Open
MPI's and is used when <venv>/openmpi is absent. CTest runs this file as `e2e_openmpi`.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from conftest import ROOT

if any(v in os.environ for v in ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK")):
    pytest.skip("the Open MPI end-to-end test launches mpirun itself: run it outside mpirun", allow_module_level=True)

MPI4PY_DIR = os.environ.get("MPIDD_OPENMPI_MPI4PY") or os.path.join(sys.prefix, "openmpi")
MPIRUN = os.environ.get("MPIDD_OPENMPI_MPIRUN") or shutil.which("mpirun.openmpi")
REQUIRED = os.environ.get("MPIDD_REQUIRE_OPENMPI", "").upper() in ("1", "ON", "TRUE", "YES")
SIDE_BY_SIDE = os.path.isdir(os.path.join(MPI4PY_DIR, "mpi4py"))
ENV = dict(
    os.environ,
    PYTHONPATH=os.pathsep.join([MPI4PY_DIR, ROOT] if SIDE_BY_SIDE else [ROOT]),
    OMP_NUM_THREADS="1",
    # Open MPI refuses to run as root without both (containers, CI machines); ignored otherwise.
    OMPI_ALLOW_RUN_AS_ROOT="1",
    OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
    # Shared-memory copies without CMA (process_vm_readv), which some containers forbid. Not
    # needed on the development VM (a 40 MB gather worked without it); kept so the test does not
    # depend on the container's ptrace policy.
    OMPI_MCA_btl_vader_single_copy_mechanism="none",
)
TINY = ["--no-report", "--grid", "2x2", "--mode", "twolevel", "--epochs", "3", "--batch-size", "32", "--width", "8",
        "--hidden", "16", "--coarse-epochs", "5", "--coarse-batch-size", "32", "--threads", "1"]
HOW = ("`make openmpi` builds it: Debian's openmpi-bin and libopenmpi-dev (apt), then "
       "MPICC=mpicc.openmpi pip install --no-binary=mpi4py --target <venv>/openmpi mpi4py")


def library():
    """The MPI library of the mpi4py that ENV's Python imports (MPI itself not started)."""
    code = ("import mpi4py; mpi4py.rc.initialize = False; from mpi4py import MPI; "
            "print(mpi4py.__file__); print(MPI.Get_library_version())")
    proc = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=60)
    lines = (proc.stdout if proc.returncode == 0 else proc.stderr).strip().splitlines() or ["?"]
    return " ".join(lines[:2]) if proc.returncode == 0 else lines[-1]  # mpi4py's path, the library's first line


@pytest.fixture(scope="module")
def openmpi():
    if not MPIRUN:
        reason = f"no mpirun.openmpi on PATH (set MPIDD_OPENMPI_MPIRUN for another name); {HOW}"
    elif "Open MPI" not in (lib := library()):
        where = MPI4PY_DIR if SIDE_BY_SIDE else f"{MPI4PY_DIR} (absent) nor this Python's own"
        reason = f"no mpi4py built against Open MPI in {where} (found: {lib}); {HOW}"
    else:
        return MPIRUN
    if REQUIRED:  # under `make test`, which built it: a missing Open MPI is a failure, not a skip
        pytest.fail(reason)
    pytest.skip(reason)


def launch(mpirun, args, np_=2, script=("-m", "mpidd.train"), timeout=120):
    cmd = [mpirun, "-n", str(np_), "--oversubscribe", sys.executable, *script, *args]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def test_two_level_run_under_open_mpi(openmpi, tiny, tmp_path):
    out = tmp_path / "run"
    proc = launch(openmpi, ["--data", tiny, "--out", str(out), *TINY])
    assert proc.returncode == 0, proc.stderr[-4000:] + proc.stdout[-2000:]
    with open(out / "results.json") as f:
        r = json.load(f)
    assert r["world_size"] == 2 and len(r["per_rank"]) == 2
    assert "Open MPI" in r["versions"]["mpi_library"], r["versions"]
    assert r["decomposition"]["rank_of_subdomain"] == [0, 1, 0, 1]
    assert r["accuracy"]["CNN-DNN"]["test"] > 0.5  # 4 classes: chance is 0.25
    assert proc.stdout.count("mpidd: 2 ranks") == 1  # only rank 0 prints


def test_a_failing_rank_ends_the_job_under_open_mpi(openmpi, tiny, tmp_path):
    start = time.perf_counter()
    proc = launch(openmpi, ["1", "local", "--data", tiny, "--out", str(tmp_path / "f"), *TINY],
                  script=(os.path.join(ROOT, "tests", "helpers", "raise_on_rank.py"),))
    assert proc.returncode != 0
    assert "rank 1" in proc.stderr and "injected failure in the local phase" in proc.stderr
    assert time.perf_counter() - start < 60
