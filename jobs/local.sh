#!/bin/bash
# Launch mpidd on this machine with the project's MPI.
#   jobs/local.sh [NP] [mpidd.train arguments...]     e.g. jobs/local.sh 4 --grid 2x2 --out runs/x
#   DRY_RUN=1 jobs/local.sh 4 ...                      print the command instead of running it
set -euo pipefail
cd "$(dirname "$0")/.."
NP=${1:-4}
shift || true
CMD=(.venv/bin/mpirun -n "$NP" .venv/bin/python -m mpidd.train "$@")
if [[ -n "${DRY_RUN:-}" ]]; then echo "${CMD[@]}"; else exec "${CMD[@]}"; fi
