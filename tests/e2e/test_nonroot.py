"""make test as a user without root, on a machine without the Debian packages some suites want:
nothing is installed with apt, nothing asks for a password (standard input is closed), the
suites that need root or Debian's Open MPI are shown as skipped with their reasons, and the core
suites pass.

Run as root (CI), this test copies the checkout into a folder of the unprivileged user `nobody`
and runs `make test` there as that user, from nothing: its own .venv (pip only, with Debian's
python3, which any user may run), then a few suites (CTEST_ARGS), with Debian's Open MPI hidden
(MPICC_OPENMPI names no program). Not root, it is skipped: the make test around it is itself
the non-root run.
"""

import os
import pwd
import re
import shutil
import subprocess
import tempfile

import pytest

from conftest import ROOT

if os.geteuid() != 0:
    pytest.skip("not root: this make test is itself the non-root run", allow_module_level=True)
if not shutil.which("runuser"):
    pytest.skip("no runuser to run make test as another user", allow_module_level=True)

SUITES = "^(lint|mpi_np2|e2e_openmpi|slurm)"  # (no "$": make would read "$'" as a variable)
USER = "nobody"


def user_python():
    """A python3 (3.11 or newer, with venv) that USER may run: root's own may live under /root."""
    for python in ("/usr/bin/python3", "/usr/local/bin/python3"):
        done = subprocess.run(["runuser", "-u", USER, "--", python, "-c",
                               "import sys, venv, ensurepip; assert sys.version_info >= (3, 11)"],
                              capture_output=True)
        if done.returncode == 0:
            return python
    pytest.skip(f"no python3 >= 3.11 with venv that {USER} may run")


def copy_checkout(dest):
    """The files of the checkout (tracked, and untracked but not ignored), as a fresh clone has them."""
    files = subprocess.run(["git", "-C", ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if os.path.isfile(os.path.join(ROOT, name)):
            os.makedirs(os.path.join(dest, os.path.dirname(name)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, name), os.path.join(dest, name))


def test_make_test_as_a_user_without_root():
    user = pwd.getpwnam(USER)
    python = user_python()
    work = tempfile.mkdtemp(prefix="mpidd-nonroot-")
    try:
        checkout, home = os.path.join(work, "checkout"), os.path.join(work, "home")
        copy_checkout(checkout)
        os.makedirs(home)
        for base, dirs, names in os.walk(work):
            for name in [base] + [os.path.join(base, n) for n in dirs + names]:
                os.chown(name, user.pw_uid, user.pw_gid)
        # this machine's pip settings (where its wheels and indexes are), as any of its users has them
        env = [f"PATH={os.environ['PATH']}", f"HOME={home}", "LANG=C.UTF-8",
               *[f"{k}={v}" for k, v in os.environ.items() if k.startswith("PIP_")]]
        cmd = ["runuser", "-u", USER, "--", "env", "-i", *env, "make", "-C", checkout, "test", f"PYTHON={python}",
               "MPICC_OPENMPI=mpicc.absent", f"CTEST_ARGS=-R '{SUITES}'"]
        done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=1200)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    assert re.search(r"lint \.+ +Passed", out) and re.search(r"mpi_np2 \.+ +Passed", out), out[-4000:]
    assert re.search(r"e2e_openmpi \.+\*+Skipped", out) and re.search(r"slurm \.+\*+Skipped", out), out[-4000:]
    skipped = [line for line in out.splitlines() if line.startswith("skipped: SKIPPED [")]
    assert any("needs root" in line for line in skipped), out[-4000:]
    assert any("test_openmpi.py" in line and "openmpi" in line.split(":", 2)[2] for line in skipped), out[-4000:]
    assert "not root: apt-get needs root" in out  # the Open MPI install was refused, not attempted
    assert "password" not in out.lower() and "sudo:" not in out
