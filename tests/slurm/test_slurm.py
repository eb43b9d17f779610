"""The Slurm job scripts under a real scheduler: a one-node Slurm cluster of the tests' own
(tests/slurm/cluster.sh: Debian's slurmctld, slurmd and munge, ports, state and logs in a
temporary folder), the jobs submitted with sbatch as a user would.

Needs root (slurmd runs as root) and Slurm installed or apt to install it; skipped with the
reason otherwise, and left out with SLURM_TEST=0. Slurm starts a requeued job again once its
revoked credential has expired: 120 s by default, 10 s on this cluster (cred_expire).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, make_tiny_dataset

sys.path.insert(0, os.path.join(ROOT, "tests", "e2e"))  # run(): the end-to-end tests' mpirun launcher
from test_e2e import run  # noqa: E402

CLUSTER = os.path.join(ROOT, "tests", "slurm", "cluster.sh")
CPU_JOB = os.path.join("jobs", "slurm_cpu.sh")
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")

if os.environ.get("SLURM_TEST") == "0":
    pytest.skip("SLURM_TEST=0: the Slurm suite is left out", allow_module_level=True)
if any(v in os.environ for v in ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK")):
    pytest.skip("the Slurm tests launch their own jobs: run them outside mpirun", allow_module_level=True)
if os.geteuid() != 0:
    pytest.skip("the one-node Slurm cluster needs root (slurmd runs as root)", allow_module_level=True)
if not shutil.which("slurmctld") and not shutil.which("apt-get"):
    pytest.skip("Slurm is not installed and there is no apt-get to install it", allow_module_level=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """SLURM_CONF of a fresh one-node cluster; stopped afterwards, and no daemon may be left."""
    where = str(tmp_path_factory.mktemp("slurm") / "cluster")
    proc = subprocess.run(["bash", CLUSTER, "start", where], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        subprocess.run(["bash", CLUSTER, "stop", where], timeout=60)
        pytest.fail(f"cluster.sh start failed:\n{proc.stdout}{proc.stderr}")
    pids = [int(open(os.path.join(where, f"{d}.pid")).read()) for d in ("munged", "slurmctld", "slurmd")]
    yield os.path.join(where, "slurm.conf")
    subprocess.run(["bash", CLUSTER, "stop", where], timeout=60, check=True)
    left = [p for p in pids if alive(p)]
    assert not left and not os.path.exists(where), f"daemons left running: {left}"


def alive(pid) -> bool:
    """Running (a zombie waiting for its parent to reap it is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def mpi_plugin():
    """srun's --mpi for this Python's MPI: pmi2 for MPICH (the pip wheel), pmix for Open MPI."""
    out = subprocess.run([sys.executable, "-c", "from mpi4py import MPI; print(MPI.Get_library_version())"],
                         capture_output=True, text=True, timeout=60).stdout
    return "pmix" if "Open MPI" in out else "pmi2"


class Slurm:
    def __init__(self, conf, folder):
        self.env = dict(os.environ, SLURM_CONF=conf, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
        self.folder, self.mpi = folder, mpi_plugin()
        self.submitted = []

    def cmd(self, *args, check=True):
        proc = subprocess.run(args, env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=120)
        if check:
            assert proc.returncode == 0, f"{args}: {proc.stderr}"
        return proc

    def submit(self, config, run_dir, *options, python=sys.executable, script=CPU_JOB, script_args=()):
        """sbatch the job script as a user would (4 tasks, 1 core each), with mpidd.train flags
        `script_args`; returns the job id."""
        export = f"ALL,CONFIG={config},RUN={run_dir},PYTHON={python},SRUN_MPI={self.mpi}"
        out = self.cmd("sbatch", "--parsable", "--ntasks=4", "--cpus-per-task=1",
                       f"--output={self.folder}/job-%j.out", f"--export={export}", *options, script,
                       *script_args).stdout
        job_id = out.strip().split(";")[0]
        self.submitted.append(job_id)
        return job_id

    def job(self, job_id) -> dict:
        """scontrol show job, as {key: value}."""
        text = self.cmd("scontrol", "show", "job", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def log(self, job_id) -> str:
        path = os.path.join(self.folder, f"job-{job_id}.out")
        return open(path).read() if os.path.exists(path) else ""

    def wait_for(self, job_id, done, timeout=240):
        """Poll scontrol until done(job) holds."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            job = self.job(job_id)
            if done(job):
                return job
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} did not get there in {timeout} s: {self.job(job_id)}\n{self.log(job_id)}")

    def wait_for_log(self, job_id, text, timeout=120):
        start = time.monotonic()
        while text not in self.log(job_id):
            assert time.monotonic() - start < timeout, f"{text!r} not in job {job_id}'s output:\n{self.log(job_id)}"
            assert self.job(job_id)["JobState"] in ("PENDING", "RUNNING"), self.log(job_id)
            time.sleep(0.2)


@pytest.fixture(scope="module")
def slurm_cluster(cluster, tmp_path_factory):
    return Slurm(cluster, str(tmp_path_factory.mktemp("jobs")))


@pytest.fixture
def slurm(slurm_cluster):
    """The cluster; a job a test leaves behind (it failed) is cancelled before the next test."""
    yield slurm_cluster
    while slurm_cluster.submitted:
        slurm_cluster.cmd("scancel", slurm_cluster.submitted.pop(), check=False)


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    """A run long enough to be stopped in the middle (local CNNs: 60 epochs on 384 images)."""
    folder = tmp_path_factory.mktemp("slurm_data")
    data = make_tiny_dataset(folder / "tiny.h5", n=(384, 96, 96))
    path = folder / "tiny.toml"
    path.write_text(f'data = "{data}"\ngrid = "2x2"\nmode = "twolevel"\nepochs = 60\nbatch-size = 32\n'
                    f'width = 8\nhidden = 16\ncoarse-epochs = 5\ncoarse-batch-size = 32\nreport = false\n')
    return str(path)


@pytest.fixture(scope="module")
def reference(config, tmp_path_factory):
    """The same run under mpirun, uninterrupted, with the options the job script adds."""
    out = str(tmp_path_factory.mktemp("ref") / "run")
    proc = run(["--config", config, "--out", out, "--device", "cpu", "--threads", "1"], np=4)
    assert proc.returncode == 0, proc.stderr
    return out


def same_run(a, b):
    """Identical accuracies of every model and identical gathered probabilities."""
    ra, rb = (json.load(open(os.path.join(d, "results.json"))) for d in (a, b))
    assert ra["accuracy"] == rb["accuracy"] and ra["world_size"] == rb["world_size"] == 4
    pa, pb = (np.load(os.path.join(d, "checkpoints", "probabilities.npz")) for d in (a, b))
    for split in ("train", "val", "test"):
        assert np.array_equal(pa[split], pb[split]), split


def test_cpu_job_runs_under_srun_and_equals_mpirun(slurm, config, reference, tmp_path):
    run_dir = str(tmp_path / "run")
    job_id = slurm.submit(config, run_dir)
    job = slurm.wait_for(job_id, lambda j: j["JobState"] in TERMINAL)
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0" and job["Restarts"] == "0", slurm.log(job_id)
    assert "mpidd: 4 ranks x 1 threads" in slurm.log(job_id)
    same_run(run_dir, reference)


def test_a_dry_run_job_prints_the_plan_and_trains_nothing(slurm, config, tmp_path):
    """sbatch jobs/slurm_cpu.sh --dry-run: every task of the allocation takes part (srun), rank 0
    prints each rank's subdomains, the job completes, and no run directory is made."""
    run_dir = str(tmp_path / "run")
    job_id = slurm.submit(config, run_dir, script_args=("--dry-run",))
    job = slurm.wait_for(job_id, lambda j: j["JobState"] in TERMINAL)
    log = slurm.log(job_id)
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0" and job["Restarts"] == "0", log
    assert "mpidd: dry run" in log and "mode twolevel: grid 2x2" in log
    rows = [line.split() for line in log.splitlines() if re.match(r"\s+[0-3]\s+\S+\s+[0-3]\s", line)]
    assert [(r[0], r[2]) for r in rows] == [("0", "0"), ("1", "1"), ("2", "2"), ("3", "3")], log
    assert not os.path.exists(run_dir)


def python_wrapper(path, mpidd_train):
    """A stand-in for the job's PYTHON: `python -m mpidd.train ARGS` runs the bash `mpidd_train`
    (ARGS in "$@"); anything else (the script reading the marker) goes to this python."""
    path.write_text(f'#!/bin/bash\nif [[ "$1 $2" != "-m mpidd.train" ]]; then exec {sys.executable} "$@"; fi\n'
                    f'shift 2\n{mpidd_train}\n')
    path.chmod(0o755)


@pytest.mark.parametrize("how,slow_exit", [("--batch", True), ("--full", False)])
def test_a_signalled_job_stops_requeues_and_resumes_to_the_uninterrupted_result(slurm, config, reference,
                                                                               tmp_path, how, slow_exit):
    """scancel --signal=USR1 --batch (the batch shell only: the script forwards it to srun) or
    --full (every process of the job): checkpoints, exit 75, requeue, --resume, same result.
    slow_exit (with --batch, one job less than a case of its own): rank 1 lingers after its exit
    75, so srun (--kill-on-bad-exit) kills it once the others' 75 arrive and reports a signal;
    the marker says the step stopped, and it is requeued. (The lingering is an exec'd sleep: a
    shell waiting on a sleep would outlive the sleep's SIGTERM and exit 75 itself, which srun
    reports as an exit, not a signal: that race failed this test once in a fresh-clone run. How srun
    words rank 1's end varies, "task 1: Terminated" or not, so the test asks only for the script's
    line that it read the marker, which it prints only when srun's code was neither 0 nor 75.)"""
    run_dir = str(tmp_path / "run")
    python = sys.executable
    if slow_exit:
        python = str(tmp_path / "python")
        python_wrapper(tmp_path / "python", f'trap : USR1  # for mpidd.train: this shell lives on\n'
                       f'{sys.executable} -m mpidd.train "$@"; code=$?\n'
                       f'if [[ $code == 75 && $SLURM_PROCID == 1 ]]; then exec sleep 30; fi\nexit $code')
    job_id = slurm.submit(config, run_dir, python=python)
    slurm.wait_for_log(job_id, "local 0 (0, 0): epoch 2/60")
    slurm.cmd("scancel", "--signal=USR1", how, job_id)
    job = slurm.wait_for(job_id, lambda j: j["JobState"] in TERMINAL)
    log = slurm.log(job_id)
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", log
    assert job["Restarts"] == "1", log  # the scheduler's record: requeued once, then completed
    assert "mpidd: stopped (SIGUSR1)" in log and f"requeueing job {job_id}" in log
    assert f"mpidd: resuming {run_dir} (restart 1 of job {job_id})" in log
    if slow_exit:  # (the others may meet the same end without help: the marker is read every time)
        assert "rank 0 recorded the stop" in log, log  # srun exited neither 0 nor 75: the marker decided
    stops = json.load(open(os.path.join(run_dir, "results.json")))["restarts"]["stops"]
    assert [s["reason"] for s in stops] == ["SIGUSR1"]
    same_run(run_dir, reference)


def test_the_time_limit_signal_stops_and_requeues(slurm, config, tmp_path):
    """--time=2 --signal=USR1@100: Slurm signals the ranks 100 s before the limit, i.e. 20 s into
    the job or at its next time-limit check (every 30 s); the run stops with its checkpoints and
    the job is requeued. (A signal due before the job step exists is lost: Slurm sends it to the
    steps there are, hence the 20 s; the scripts' @300 leaves far more room.) The resumed run's
    result is the previous test's."""
    long = tmp_path / "long.toml"
    long.write_text(open(config).read().replace("epochs = 60", "epochs = 3000"))
    run_dir = str(tmp_path / "run")
    job_id = slurm.submit(str(long), run_dir, "--time=2", "--signal=USR1@100")
    slurm.wait_for(job_id, lambda j: j["Restarts"] == "1", timeout=110)
    slurm.cmd("scancel", job_id)  # not worth its 3000 epochs
    log = slurm.log(job_id)
    assert "mpidd: stopped (SIGUSR1)" in log and f"requeueing job {job_id}" in log, log
    assert json.load(open(os.path.join(run_dir, "checkpoints", "progress.json")))["state"] == "stopped"


def test_a_failing_rank_fails_the_job_without_requeue(slurm, config, tmp_path):
    """Rank 1 raises in its local phase: srun --kill-on-bad-exit ends the step, the job fails
    with the exit code, and the script does not requeue it."""
    wrapper = tmp_path / "python"
    python_wrapper(wrapper, f'exec {sys.executable} {ROOT}/tests/helpers/raise_on_rank.py 1 local "$@"')
    job_id = slurm.submit(config, str(tmp_path / "run"), python=str(wrapper))
    job = slurm.wait_for(job_id, lambda j: j["JobState"] in TERMINAL)
    log = slurm.log(job_id)
    assert job["JobState"] == "FAILED" and job["ExitCode"] != "0:0" and job["Restarts"] == "0", log
    assert "injected failure in the local phase" in log and "requeueing" not in log


def test_gpu_job_script_directives_are_accepted_by_the_scheduler(slurm):
    """sbatch --test-only: Slurm checks jobs/slurm_gpu.sh's directives (4 tasks, a GPU each)
    against the cluster (4 stand-in GPUs) and says when it would start it; more GPUs than the
    node has is refused, so the check can fail. (--cpus-per-task=1: the test node has 4 CPUs,
    the script asks 8 per task.)"""
    proc = slurm.cmd("sbatch", "--test-only", "--cpus-per-task=1", "jobs/slurm_gpu.sh", check=False)
    assert proc.returncode == 0 and re.search(r"to start at .* using \d+ processors on nodes mpiddnode", proc.stderr), \
        proc.stderr
    proc = slurm.cmd("sbatch", "--test-only", "--cpus-per-task=1", "--gpus-per-task=2",
                     "jobs/slurm_gpu.sh", check=False)
    assert proc.returncode != 0 and "not available" in proc.stderr, proc.stderr
