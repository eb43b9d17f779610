"""Launch scripts: valid bash, and a dry run that prints the command it would run."""

import glob
import os
import subprocess

import pytest

from conftest import ROOT

SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "jobs", "*.sh")))


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_bash_syntax(script):
    assert subprocess.run(["bash", "-n", script]).returncode == 0


def test_local_launcher_dry_run():
    proc = subprocess.run(["bash", os.path.join(ROOT, "jobs", "local.sh"), "2", "--grid", "1x2"],
                          env=dict(os.environ, DRY_RUN="1"), capture_output=True, text=True)
    assert proc.returncode == 0
    assert proc.stdout.strip() == ".venv/bin/mpirun -n 2 .venv/bin/python -m mpidd.train --grid 1x2"


@pytest.mark.parametrize("config", sorted(glob.glob(os.path.join(ROOT, "jobs", "*.toml"))), ids=os.path.basename)
def test_example_configs_parse(config):
    from mpidd.config import parse_args
    args = parse_args(["--config", config])
    assert args.mode in ("twolevel", "coherent", "global", "compare", "width")
