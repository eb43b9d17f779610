"""What results.json records about where a run came from (the mpidd checkout's commit, the Slurm
job), the --version of every command line, and mpidd-convert's dispatch to the converters."""

import os
import subprocess
import sys

import pytest

import data_prep
from data_prep.__main__ import CONVERTERS, main as convert
from mpidd import __version__
from mpidd.data import inspect
from mpidd.results import slurm_job, source_commit

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_slurm_job_from_the_environment():
    assert slurm_job({}) is None
    job = slurm_job({"SLURM_JOB_ID": "4711", "SLURM_ARRAY_JOB_ID": "4700", "SLURM_ARRAY_TASK_ID": "11",
                     "SLURM_JOB_NAME": "mpidd"})
    assert job == {"job_id": "4711", "array_job_id": "4700", "array_task_id": "11", "job_name": "mpidd"}
    assert slurm_job({"SLURM_JOB_ID": "5"})["array_task_id"] is None


def test_source_commit_of_a_checkout_and_of_an_installed_copy(tmp_path):
    git = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True)
    if git.returncode != 0:
        pytest.skip("this copy of mpidd is not a git checkout")
    source = source_commit(ROOT)
    assert source["commit"] == git.stdout.strip() and isinstance(source["dirty"], bool)
    assert source_commit(str(tmp_path)) is None  # no .git: an installed copy records none


def test_source_commit_is_dirty_for_code_not_for_documentation(tmp_path):
    def git(*argv):
        subprocess.run(["git", "-C", str(tmp_path), *argv], check=True, capture_output=True,
                       env=dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
                                GIT_COMMITTER_EMAIL="t@t"))
    (tmp_path / "docs").mkdir()
    for name in ("code.py", "README.md", "docs/figure.png"):
        (tmp_path / name).write_text("a\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "x")
    assert source_commit(str(tmp_path))["dirty"] is False
    (tmp_path / "README.md").write_text("b\n")
    (tmp_path / "docs" / "figure.png").write_text("b\n")
    assert source_commit(str(tmp_path))["dirty"] is False  # make docs-figures rewrote the docs
    (tmp_path / "code.py").write_text("b\n")
    assert source_commit(str(tmp_path))["dirty"] is True


@pytest.mark.parametrize("module", ["mpidd.train", "mpidd.predict", "mpidd.report"])
def test_every_command_line_has_version(module, tmp_path):
    done = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"mpidd {__version__}"


def test_mpidd_convert_names_every_converter_and_runs_one(tmp_path, capsys):
    modules = {f[:-3] for f in os.listdir(os.path.dirname(data_prep.__file__))
               if f.endswith(".py") and f not in ("__init__.py", "__main__.py", "common.py")}
    assert set(CONVERTERS) == modules
    assert convert([]) == 2  # the list, on stdout (a usage error: nothing to run)
    listing = capsys.readouterr().out
    assert all(f"  {name} " in listing for name in CONVERTERS)
    assert convert(["no_such_set"]) == 2 and "no converter 'no_such_set'" in capsys.readouterr().err
    pytest.importorskip("sklearn")
    out = str(tmp_path / "digits.h5")
    assert convert(["digits", "--out", out, "--val", "300", "--test", "300"]) in (0, None)
    assert inspect(out).sizes == {"train": 1197, "val": 300, "test": 300}
