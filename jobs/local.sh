#!/bin/bash
# Launch mpidd on this machine.
#   jobs/local.sh [NP] [mpidd.train arguments...]     e.g. jobs/local.sh 4 --grid 2x2 --out runs/x
#   DRY_RUN=1 jobs/local.sh 4 ...                      print the command instead of running it
#   MPIEXEC=mpiexec PYTHON=.venv-system/bin/python MPIEXEC_PREFLAGS=--oversubscribe jobs/local.sh 4 ...
#                                                      another MPI (make setup MPI=system builds .venv-system)
# In the source tree it runs from the repository root with .venv's mpirun (the pip MPICH) and
# Python; an installed copy (DIR/share/mpidd/jobs) uses mpirun and python3 from PATH.
set -euo pipefail
if [[ -x "$(dirname "$0")/../.venv/bin/python" ]]; then
  cd "$(dirname "$0")/.."
  MPIEXEC=${MPIEXEC:-.venv/bin/mpirun} PYTHON=${PYTHON:-.venv/bin/python}
fi
MPIEXEC=${MPIEXEC:-mpirun} PYTHON=${PYTHON:-python3}
read -r -a PRE <<< "${MPIEXEC_PREFLAGS:-}"
NP=${1:-4}
shift || true
CMD=("$MPIEXEC" -n "$NP" ${PRE[@]+"${PRE[@]}"} "$PYTHON" -m mpidd.train "$@")
if [[ -n "${DRY_RUN:-}" ]]; then
  printf '%q' "${CMD[0]}"; printf ' %q' "${CMD[@]:1}"; printf '\n'
else
  exec "${CMD[@]}"
fi
