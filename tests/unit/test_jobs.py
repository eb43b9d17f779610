"""Launch scripts: valid bash, and dry runs (DRY_RUN=1) that print the command they would run.

The Slurm scripts run here with a fake Slurm environment (no Slurm needed): first start, restart
from a run directory with config.json, the requeue after mpidd.train's exit code 75 (DRY_RUN_EXIT
makes the dry run act as if mpidd.train had exited with that code), and their #SBATCH headers; and
the real script with stand-ins for srun and scontrol, to see what it makes of srun's exit code and
the run's marker.
"""

import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "jobs", "*.sh")))
SLURM = {"slurm_cpu.sh": "cpu", "slurm_gpu.sh": "cuda"}  # script -> the --device it passes


def clean_env(**extra):
    """This process's environment without anything the scripts read, plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "DRY_RUN", "MPIEXEC")) and k not in ("RUN", "CONFIG", "PYTHON", "SRUN_MPI")}
    env.update(extra)
    return env


def run_script(script, *args, env, cwd=ROOT):
    return subprocess.run(["bash", script, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_bash_syntax(script):
    assert subprocess.run(["bash", "-n", script]).returncode == 0


def test_local_launcher_dry_run():
    """In the source tree with make's .venv: its mpirun and python (a checkout without one, e.g.
    tested from another environment, takes them from PATH)."""
    proc = run_script(os.path.join(ROOT, "jobs", "local.sh"), "2", "--grid", "1x2", env=clean_env(DRY_RUN="1"))
    assert proc.returncode == 0
    venv = os.access(os.path.join(ROOT, ".venv", "bin", "python"), os.X_OK)
    launcher, python = (".venv/bin/mpirun", ".venv/bin/python") if venv else ("mpirun", "python3")
    assert proc.stdout.strip() == f"{launcher} -n 2 {python} -m mpidd.train --grid 1x2"


def test_local_launcher_with_another_mpi(tmp_path):
    env = clean_env(DRY_RUN="1", MPIEXEC="/usr/bin/mpiexec", PYTHON=".venv-system/bin/python",
                    MPIEXEC_PREFLAGS="--oversubscribe --bind-to none")
    proc = run_script(os.path.join(ROOT, "jobs", "local.sh"), "4", "--out", "runs/a b", env=env)
    assert proc.returncode == 0
    assert shlex.split(proc.stdout) == ["/usr/bin/mpiexec", "-n", "4", "--oversubscribe", "--bind-to", "none",
                                        ".venv-system/bin/python", "-m", "mpidd.train", "--out", "runs/a b"]
    # an installed copy (share/mpidd/jobs, no .venv beside it) takes mpirun and python3 from PATH
    shutil.copy(os.path.join(ROOT, "jobs", "local.sh"), tmp_path)
    proc = run_script(str(tmp_path / "local.sh"), env=clean_env(DRY_RUN="1"), cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == "mpirun -n 4 python3 -m mpidd.train"


def slurm_env(submit_dir, **extra):
    """What Slurm would set in a 4-task job with 6 cores per task (and DRY_RUN=1)."""
    return clean_env(DRY_RUN="1", SLURM_JOB_ID="4242", SLURM_JOB_NAME="fm", SLURM_NTASKS="4",
                     SLURM_NNODES="1", SLURM_CPUS_PER_TASK="6", SLURM_SUBMIT_DIR=str(submit_dir), **extra)


def srun(script):
    return ["srun", "--kill-on-bad-exit=1"] + (["--gpus-per-task=1"] if SLURM[script] == "cuda" else []) + \
           ["--cpus-per-task=6"]


@pytest.mark.parametrize("script", sorted(SLURM))
def test_slurm_first_start(script, tmp_path):
    proc = run_script(os.path.join(ROOT, "jobs", script), "--epochs", "2", env=slurm_env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert shlex.split(proc.stdout) == srun(script) + [
        "python3", "-m", "mpidd.train", "--config", "jobs/fashion_mnist_2x2.toml", "--out", "runs/fm-4242",
        "--device", SLURM[script], "--threads", "6", "--epochs", "2"]
    assert not (tmp_path / "runs").exists()  # a dry run makes nothing


@pytest.mark.parametrize("script", sorted(SLURM))
def test_slurm_restart_resumes_the_run_directory(script, tmp_path):
    run = tmp_path / "runs" / "fm-4242"
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}")
    proc = run_script(os.path.join(ROOT, "jobs", script), "--epochs", "2",
                      env=slurm_env(tmp_path, SLURM_RESTART_COUNT="1", PYTHON="/opt/venv/bin/python"))
    assert proc.returncode == 0, proc.stderr
    assert shlex.split(proc.stdout) == srun(script) + [  # the run's config.json has the rest
        "/opt/venv/bin/python", "-m", "mpidd.train", "--resume", "runs/fm-4242", "--device", SLURM[script],
        "--threads", "6"]
    assert "resuming runs/fm-4242 (restart 1 of job 4242)" in proc.stderr


@pytest.mark.parametrize("script", sorted(SLURM))
def test_slurm_run_and_config_from_the_environment(script, tmp_path):
    run = tmp_path / "my runs" / "r1"
    env = slurm_env(tmp_path, RUN=str(run), CONFIG="jobs/fashion_mnist_4x4.toml")
    proc = run_script(os.path.join(ROOT, "jobs", script), env=env)
    args = shlex.split(proc.stdout)
    assert args[args.index("--config") + 1] == "jobs/fashion_mnist_4x4.toml"
    assert args[args.index("--out") + 1] == str(run)
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}")
    args = shlex.split(run_script(os.path.join(ROOT, "jobs", script), env=env).stdout)
    assert args[args.index("--resume") + 1] == str(run) and "--config" not in args


@pytest.mark.parametrize("script", sorted(SLURM))
@pytest.mark.parametrize("code", [0, 1, 75])
def test_slurm_requeues_after_exit_code_75_only(script, code, tmp_path):
    proc = run_script(os.path.join(ROOT, "jobs", script), env=slurm_env(tmp_path, DRY_RUN_EXIT=str(code)))
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("srun ")
    if code == 75:  # checkpoints written, stopped before the time limit: back into the queue
        assert proc.returncode == 0 and lines[1:] == ["scontrol requeue 4242"]
        assert "requeueing job 4242" in proc.stderr
    else:           # done, or failed: the job ends with mpidd.train's exit code
        assert proc.returncode == code and lines[1:] == []


@pytest.mark.parametrize("script", sorted(SLURM))
@pytest.mark.parametrize("venv,srun_mpi,expected", [
    (True, None, ["--mpi=pmi2"]),    # the pip MPICH of .venv speaks PMI-1/2 to Slurm's pmi2 plugin
    (True, "pmix", ["--mpi=pmix"]),  # SRUN_MPI wins
    (True, "", []),                  # SRUN_MPI= : the site's MpiDefault
    (False, None, []),               # python3: the site's MpiDefault
])
def test_slurm_mpi_plugin(script, venv, srun_mpi, expected, tmp_path):
    if venv:
        (tmp_path / ".venv" / "bin").mkdir(parents=True)
        os.symlink(shutil.which("true"), tmp_path / ".venv" / "bin" / "python")
    env = slurm_env(tmp_path, **({} if srun_mpi is None else {"SRUN_MPI": srun_mpi}))
    args = shlex.split(run_script(os.path.join(ROOT, "jobs", script), env=env, cwd=tmp_path).stdout)
    assert args[:1 + len(expected)] == ["srun", *expected] and args[1 + len(expected)] == "--kill-on-bad-exit=1"


@pytest.mark.parametrize("script", sorted(SLURM))
def test_slurm_refuses_to_run_outside_a_job(script, tmp_path):
    proc = run_script(os.path.join(ROOT, "jobs", script), env=clean_env(), cwd=tmp_path)
    assert proc.returncode == 2 and "not inside a Slurm job" in proc.stderr


@pytest.mark.parametrize("script", sorted(SLURM))
def test_slurm_header(script):
    with open(os.path.join(ROOT, "jobs", script)) as f:
        lines = f.read().splitlines()
    sbatch = [i for i, line in enumerate(lines) if line.startswith("#SBATCH")]
    # sbatch reads #SBATCH lines only up to the first command
    assert all(not line.strip() or line.startswith("#") for line in lines[:sbatch[-1]])
    options = [lines[i].split()[1] for i in sbatch]
    assert "--signal=USR1@300" in options  # to the ranks, not B: (the batch shell)
    assert "--requeue" in options and "--open-mode=append" in options
    assert {re.sub("=.*", "", o) for o in options} >= {"--job-name", "--nodes", "--time", "--cpus-per-task"}
    if SLURM[script] == "cuda":
        assert "--gpus-per-task=1" in options and "--ntasks-per-node=4" in options
    else:
        assert "--ntasks=4" in options


@pytest.mark.parametrize("config", sorted(glob.glob(os.path.join(ROOT, "jobs", "*.toml"))), ids=os.path.basename)
def test_example_configs_parse(config):
    from mpidd.cli.arguments import parse_args
    args = parse_args(["--config", config])
    assert args.mode in ("twolevel", "coherent", "global", "compare", "width")


def test_default_config_of_the_slurm_scripts_exists():
    for script in SLURM:
        with open(os.path.join(ROOT, "jobs", script)) as f:
            default = re.search(r"CONFIG=\$\{CONFIG:-([^}]+)\}", f.read()).group(1)
        assert os.path.exists(os.path.join(ROOT, default))


@pytest.mark.parametrize("script", sorted(SLURM))
@pytest.mark.parametrize("srun_code,stopped_now,requeued", [
    (143, True, True),    # a rank killed while it exited 75 after the recorded stop: still a stop
    (143, False, False),  # killed, and the marker holds only the earlier stop: a failure
    (1, False, False),    # a failing rank
    (75, True, True),     # every rank's 75 reached srun
])
def test_slurm_requeues_when_the_marker_records_a_new_stop(script, srun_code, stopped_now, requeued, tmp_path):
    """srun --kill-on-bad-exit takes a rank's 75 for a failure and may kill another rank still exiting
    (srun then reports 143): the script also asks RUN's marker whether rank 0 recorded a stop during
    this step. Runs the real script (not a dry run) with stand-ins for srun and scontrol on PATH."""
    bin_dir, run = tmp_path / "bin", tmp_path / "runs" / "fm-4242"
    bin_dir.mkdir()
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    marker = run / "checkpoints" / "progress.json"
    marker.write_text(json.dumps({"state": "stopped", "stops": [{"reason": "SIGUSR1"}]}))  # the previous start's
    new_marker = {"state": "stopped", "stops": [{"reason": "SIGUSR1"}, {"reason": "SIGTERM"}]} if stopped_now \
        else {"state": "running", "stops": [{"reason": "SIGUSR1"}]}
    (bin_dir / "srun").write_text(f"#!/bin/bash\necho \"$*\" > {tmp_path}/srun.args\n"
                                  f"echo {shlex.quote(json.dumps(new_marker))} > {marker}\nexit {srun_code}\n")
    (bin_dir / "scontrol").write_text(f"#!/bin/bash\necho \"scontrol $*\" >> {tmp_path}/scontrol.log\n")
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    env = slurm_env(tmp_path, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=sys.executable)
    del env["DRY_RUN"]
    proc = run_script(os.path.join(ROOT, "jobs", script), env=env)
    assert "--resume runs/fm-4242" in (tmp_path / "srun.args").read_text()
    scontrol = tmp_path / "scontrol.log"
    if requeued:
        assert proc.returncode == 0, proc.stderr
        assert scontrol.read_text() == "scontrol requeue 4242\n" and "requeueing job 4242" in proc.stderr
        assert ("rank 0 recorded the stop" in proc.stderr) == (srun_code != 75)
    else:
        assert proc.returncode == srun_code and not scontrol.exists(), proc.stderr
