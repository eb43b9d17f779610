#!/bin/bash
# mpidd on a GPU cluster under Slurm: one MPI rank per GPU, one subdomain (or several in turn)
# per rank, --cpus-per-task cores per rank. Submit from the repository root:
#
#   sbatch jobs/slurm_gpu.sh                            jobs/fashion_mnist_2x2.toml on 4 GPUs
#   sbatch --nodes=4 --export=ALL,CONFIG=jobs/fashion_mnist_4x4.toml jobs/slurm_gpu.sh
#                                                       4x4 on 16 GPUs (4 nodes of 4)
#   sbatch jobs/slurm_gpu.sh --epochs 20                more mpidd.train flags (first start only)
#   DRY_RUN=1 bash jobs/slurm_gpu.sh                    print the command it would run; run nothing
#   sbatch jobs/slurm_gpu.sh --dry-run                  on the job's allocation: the grid, which rank trains
#                                                       which subdomains, bytes and memory per rank; trains nothing
#   DRY_RUN=1 DRY_RUN_EXIT=75 bash jobs/slurm_gpu.sh    ... and what it would do after that exit code
#
# Environment: CONFIG (TOML, keys = mpidd.train flags; default jobs/fashion_mnist_2x2.toml);
# RUN (run directory; default runs/<job name>-<job id>); PYTHON (default .venv-system/bin/python
# from `make setup MPI=system`, an mpi4py built against the site's MPI, else .venv/bin/python with
# the pip MPICH, else python3); SRUN_MPI (srun's --mpi plugin: default pmi2 for the pip MPICH of
# .venv, which speaks PMI-1/2 to Slurm's pmi2 plugin; else the site's MpiDefault; Open MPI builds
# usually want pmix; `srun --mpi=list` shows what the site offers). torch must be a CUDA build.
#
# Time limit, preemption and restart: 300 s before the time limit Slurm sends SIGUSR1 to every
# rank; `scancel --signal=USR1 [--batch|--full] JOB` does the same by hand, and SIGTERM (preemption)
# too: this script forwards USR1 and TERM that reach its shell (--batch) to srun, which passes
# them to the ranks. mpidd.train writes its checkpoints and exits with 75; this script then
# requeues the job: same job id, so same RUN; the requeued job finds RUN/config.json and runs
# `mpidd.train --resume RUN`. Any other exit code ends the job with it (a failing rank ends the
# step at once: --kill-on-bad-exit). Resume by hand with
# `sbatch --export=ALL,RUN=runs/NAME-ID jobs/slurm_gpu.sh`.
#
# Edit the resources (GPUs per node, and your site's --partition/--account):
#SBATCH --job-name=mpidd-gpu
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=8
#SBATCH --time=02:00:00
#SBATCH --output=%x-%j.out
# A requeued job appends to the same log instead of truncating it:
#SBATCH --open-mode=append
#SBATCH --requeue
# USR1 300 s before the time limit, sent to the job step's tasks (the mpidd ranks), not "B:" (the
# batch shell only): bash runs a trap only after the foreground srun has returned, too late to
# checkpoint, and each rank would then have to be signalled from here. Raise 300 when writing the
# checkpoints of your models takes longer.
#SBATCH --signal=USR1@300
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"

JOB_ID=${SLURM_JOB_ID:-JOBID}
CONFIG=${CONFIG:-jobs/fashion_mnist_2x2.toml}
RUN=${RUN:-runs/${SLURM_JOB_NAME:-mpidd-gpu}-$JOB_ID}
if [[ -z "${PYTHON:-}" ]]; then
  for PYTHON in .venv-system/bin/python .venv/bin/python python3; do [[ -x $PYTHON ]] && break; done
fi
if [[ -z "${SRUN_MPI+set}" && $PYTHON == .venv/bin/python ]]; then SRUN_MPI=pmi2; fi
THREADS=${SLURM_CPUS_PER_TASK:-1}
export OMP_NUM_THREADS=$THREADS

if [[ -f "$RUN/config.json" ]]; then  # a restart: everything else comes from the run's config.json
  echo "mpidd: resuming $RUN (restart ${SLURM_RESTART_COUNT:-0} of job $JOB_ID)" >&2
  TRAIN=(--resume "$RUN" --device cuda --threads "$THREADS")
else
  TRAIN=(--config "$CONFIG" --out "$RUN" --device cuda --threads "$THREADS" "$@")
fi
# --kill-on-bad-exit=1: a rank that fails ends the whole step at once instead of leaving the others
# waiting. srun exits with the highest exit code of the ranks, or 128+signal for a rank it had to
# kill: after a stop every rank exits 75, and srun may kill one still exiting when another's 75
# comes first, so whether the step stopped is read from the run's marker too (recorded_stops).
# --gpus-per-task=1: each rank gets its own GPU (Slurm binds it, so the rank sees one device).
# --cpus-per-task again: some Slurm versions do not pass sbatch's on to srun.
CMD=(srun ${SRUN_MPI:+--mpi=$SRUN_MPI} --kill-on-bad-exit=1 --gpus-per-task=1 --cpus-per-task="$THREADS"
     "$PYTHON" -m mpidd.train "${TRAIN[@]}")

show() { printf '%q' "$1"; shift; printf ' %q' "$@"; printf '\n'; }

# How many stops RUN's marker records if its state is "stopped", else -1. Rank 0 records a stop
# once every rank has saved its state, before any rank exits.
recorded_stops() {
  local n
  n=$("$PYTHON" - "$RUN/checkpoints/progress.json" 2>/dev/null <<'EOF'
import json, sys
marker = json.load(open(sys.argv[1]))
print(len(marker.get("stops", [])) if marker.get("state") == "stopped" else -1)
EOF
) || n=-1
  if [[ $n =~ ^-?[0-9]+$ ]]; then echo "$n"; else echo -1; fi
}

# After mpidd.train exited with $1: 75 (stopped by a signal, checkpoints written) requeues the
# job; any other code is the job's exit code.
finish() {
  if [[ $1 -ne 75 ]]; then exit "$1"; fi
  echo "mpidd: stopped before the time limit, checkpoints in $RUN: requeueing job $JOB_ID" >&2
  if [[ -n "${DRY_RUN:-}" ]]; then show scontrol requeue "$JOB_ID"; exit 0; fi
  scontrol requeue "$JOB_ID" || {
    echo "mpidd: could not requeue; resume with: sbatch --export=ALL,RUN=$RUN jobs/slurm_gpu.sh" >&2; exit 75; }
  exit 0
}

if [[ -n "${DRY_RUN:-}" ]]; then
  show "${CMD[@]}"
  finish "${DRY_RUN_EXIT:-0}"
fi
if [[ -z "${SLURM_JOB_ID:-}" ]]; then
  echo "$0: not inside a Slurm job: submit it with sbatch (DRY_RUN=1 prints the command)" >&2
  exit 2
fi
# srun in the background: bash runs a trap only once the foreground command returns, and the
# ranks must get the signal while they train.
stops_before=$(recorded_stops)
"${CMD[@]}" &
step=$!
trap 'kill -USR1 "$step" 2>/dev/null || true' USR1
trap 'kill -TERM "$step" 2>/dev/null || true' TERM
while :; do
  code=0
  wait "$step" || code=$?
  kill -0 "$step" 2>/dev/null || break  # wait returned for a signal (code > 128) while srun runs on
done
if [[ $code -ne 0 && $code -ne 75 && $(recorded_stops) -gt $stops_before ]]; then
  echo "mpidd: srun exited with $code, but every rank saved its state and rank 0 recorded the stop" \
       "in $RUN/checkpoints/progress.json (srun killed a rank that was exiting with 75)" >&2
  code=75
fi
finish "$code"
