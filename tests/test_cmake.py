"""The CMake/CTest registration: refuses an in-source build, registers every suite."""

import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

CMAKE = shutil.which("cmake") or os.path.join(os.path.dirname(sys.executable), "cmake")
pytestmark = pytest.mark.skipif(not os.path.exists(CMAKE), reason="cmake not installed")


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
    for name in ("unit", "mpi_np1", "mpi_np2", "mpi_np3", "mpi_np4", "e2e"):
        assert f": {name}" in listed
    assert f'{mpiexec} "-n" "4"' in listed and "--with-mpi" in listed
