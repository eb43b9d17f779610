"""The CMake/CTest registration: refuses an in-source build, registers every suite, installs the jobs."""

import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

CMAKE = shutil.which("cmake") or os.path.join(os.path.dirname(sys.executable), "cmake")
pytestmark = pytest.mark.skipif(not os.path.exists(CMAKE), reason="cmake not installed")


def suite_commands(listed):
    """{suite name: its command line} from `ctest -N -V`'s listing."""
    commands = dict(re.findall(r"^(\d+): Test command: (.*)$", listed, re.M))
    return {name: commands[n] for n, name in re.findall(r"^\s*Test\s+#(\d+): (\S+)$", listed, re.M)}


def test_in_source_build_is_refused(tmp_path):
    shutil.copy(os.path.join(ROOT, "CMakeLists.txt"), tmp_path)
    (tmp_path / "Makefile").write_text("# the project's own Makefile\n")
    proc = subprocess.run([CMAKE, "-S", str(tmp_path), "-B", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "refuses an in-source build" in proc.stderr
    assert (tmp_path / "Makefile").read_text() == "# the project's own Makefile\n"


def test_suites_registered_at_1_to_4_ranks(tmp_path):
    build = tmp_path / "build"
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    proc = subprocess.run([CMAKE, "-S", ROOT, "-B", str(build), f"-DPython3_EXECUTABLE={sys.executable}",
                           f"-DMPIEXEC_EXECUTABLE={mpiexec}"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    ctest = os.path.join(os.path.dirname(CMAKE), "ctest")
    listed = subprocess.run([ctest, "--test-dir", str(build), "-N", "-V"], capture_output=True, text=True).stdout
    for name in ("lint", "unit", "mpi_np1", "mpi_np2", "mpi_np3", "mpi_np4", "e2e", "e2e_restart", "e2e_stream",
                 "e2e_openmpi", "slurm"):
        assert f": {name}" in listed
    assert "SLURM_TEST=1" in listed
    assert f'{mpiexec} "-n" "4"' in listed and "--with-mpi" in listed
    commands = suite_commands(listed)
    # tests/ mirrors the suites: unit runs tests/unit alone and leaves the Open MPI, Slurm and other
    # end-to-end runs to their suites
    assert commands["unit"].endswith(' "tests/unit"')
    assert "tests/e2e" not in commands["unit"] and "tests/slurm" not in commands["unit"]
    assert '"--only-mpi" "tests/mpi"' in commands["mpi_np4"]
    assert commands["e2e_openmpi"].endswith(' "tests/e2e/test_openmpi.py"')
    assert commands["slurm"].endswith(' "tests/slurm"')
    # every test file runs in some suite (a folder or the file itself named on its command line)
    named = {arg for command in commands.values() for arg in re.findall(r'"(tests/[^"]*)"', command)}
    files = {os.path.relpath(os.path.join(folder, f), ROOT) for folder, _, names in os.walk(os.path.join(ROOT, "tests"))
             for f in names if f.startswith("test_") and f.endswith(".py")}
    assert len(files) > 20 and {f for f in files if f not in named and os.path.dirname(f) not in named} == set()


def test_site_mpi_flags_reach_the_mpi_suites_and_end_to_end_tests(tmp_path):
    build = tmp_path / "build"
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    proc = subprocess.run([CMAKE, "-S", ROOT, "-B", str(build), f"-DPython3_EXECUTABLE={sys.executable}",
                           f"-DMPIEXEC_EXECUTABLE={mpiexec}", "-DMPIEXEC_PREFLAGS=--oversubscribe;--bind-to;none",
                           "-DMPIDD_REQUIRE_OPENMPI=ON", "-DMPIDD_SLURM_TEST=OFF"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    ctest = os.path.join(os.path.dirname(CMAKE), "ctest")
    listed = subprocess.run([ctest, "--test-dir", str(build), "-N", "-V"], capture_output=True, text=True).stdout
    assert f'{mpiexec} "-n" "2" "--oversubscribe" "--bind-to" "none"' in listed
    assert "MPIDD_MPIEXEC_PREFLAGS=--oversubscribe --bind-to none" in listed  # e2e's environment
    assert "MPIDD_REQUIRE_OPENMPI=ON" in listed
    assert "SLURM_TEST=0" in listed  # make test SLURM_TEST=0: the Slurm suite skips itself


def test_install_puts_the_jobs_under_share(tmp_path):
    build, prefix = tmp_path / "build", tmp_path / "prefix"
    proc = subprocess.run([CMAKE, "-S", ROOT, "-B", str(build), f"-DPython3_EXECUTABLE={sys.executable}"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr, proc.stderr
    proc = subprocess.run([CMAKE, "--install", str(build), "--prefix", str(prefix)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    jobs = prefix / "share" / "mpidd" / "jobs"
    expected = sorted(f for f in os.listdir(os.path.join(ROOT, "jobs")) if f.endswith((".sh", ".toml")))
    assert {"local.sh", "slurm_cpu.sh", "slurm_gpu.sh", "fashion_mnist_2x2.toml",
            "fashion_mnist_4x4.toml"} <= set(expected)
    assert sorted(os.listdir(jobs)) == expected
    for name in expected:
        executable = os.access(jobs / name, os.X_OK)
        assert executable == name.endswith(".sh"), name
        assert (jobs / name).read_bytes() == open(os.path.join(ROOT, "jobs", name), "rb").read()
