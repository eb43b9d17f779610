#!/bin/bash
# A one-node Slurm cluster of its own, for the tests (tests/slurm/test_slurm.py) or by hand:
#
#   tests/slurm/cluster.sh start DIR    install Slurm and munge with apt when missing, write DIR/slurm.conf,
#                                       start munged, slurmctld and slurmd, wait until the node is idle
#   export SLURM_CONF=DIR/slurm.conf    then sbatch, srun, squeue, scontrol ... talk to it
#   tests/slurm/cluster.sh stop DIR     stop the three daemons and remove DIR
#
# Everything lives in DIR: configuration, munge key and socket, state, spool, logs, pid files;
# the ports are free ones chosen at start. A Slurm cluster already running on this machine is not
# touched (its slurm.conf, munge socket and ports are not used). Runs as root (slurmd must), with
# no cgroups (proctrack/linuxproc, task/none) and no accounting database; `scontrol show job`
# keeps finished jobs for MinJobAge seconds. The node offers max(cores, 4) CPUs
# (SlurmdParameters=config_overrides), so the routine 4-rank jobs fit on a 2-core machine,
# oversubscribed as mpirun would be. The partition allows requeue (JobRequeue=1).
set -euo pipefail

usage() { echo "usage: $0 start|stop DIR" >&2; exit 2; }
[[ $# -eq 2 ]] || usage
action=$1
dir=$2
node=mpiddnode

# The cluster runs slurmd as root; never sudo (nothing may ask for a password): not root, it fails.
as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else echo "$0: not root" >&2; return 1; fi; }

install() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null &&
    command -v munged >/dev/null && return 0
  command -v apt-get >/dev/null || { echo "$0: Slurm is not installed and there is no apt-get" >&2; return 1; }
  as_root apt-get update -qq &&
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      slurmctld slurmd slurm-client munge >/dev/null
}

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

stop() {
  local conf=$dir/slurm.conf
  for daemon in slurmd slurmctld munged; do
    local pidfile="$dir/$daemon.pid"
    [[ -f $pidfile ]] || continue
    local pid
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
  # What the daemons started (slurmstepd, job scripts, srun, the ranks) carries this cluster's
  # SLURM_CONF in its environment: nothing of it may outlive the cluster.
  local environ pid
  for environ in /proc/[0-9]*/environ; do
    pid=${environ#/proc/}; pid=${pid%/environ}
    [[ $pid == "$$" || $pid == "$PPID" ]] && continue
    if { tr '\0' '\n' < "$environ"; } 2>/dev/null | grep -qxF "SLURM_CONF=$conf"; then kill -9 "$pid" 2>/dev/null || true; fi
  done
  rm -rf "$dir"
}

start() {
  [[ $(id -u) -eq 0 ]] || { echo "$0: slurmd must run as root" >&2; exit 1; }
  install || exit 1
  mkdir -p "$dir"/{state,spool,munge}
  dir=$(cd "$dir" && pwd)
  chmod 700 "$dir/munge"
  dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
  chmod 400 "$dir/munge/munge.key"
  munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
    --pid-file="$dir/munged.pid" --log-file="$dir/munged.log" --seed-file="$dir/munge/munge.seed"

  local cpus memory
  cpus=$(nproc); (( cpus < 4 )) && cpus=4
  memory=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
  cat > "$dir/slurm.conf" <<EOF
# written by $0 start $dir
ClusterName=mpiddtest
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire: a requeued job waits this long (120 s by default) before it starts again, and may
# not start sooner: its old credential is revoked until then
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=10
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
# job ids unlike any earlier test cluster's: MPICH names its shared memory after the PMI
# key-value space, which Slurm's pmi2 names after the job id, and a killed job leaves it behind
FirstJobId=$(( (RANDOM << 15 | RANDOM) % 50000000 + 1000000 ))
JobRequeue=1
MinJobAge=600
KillWait=10
GresTypes=gpu
NodeName=$node NodeHostname=$(hostname -s) NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory Gres=gpu:4 State=UNKNOWN
PartitionName=test Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
  # four stand-in GPUs (gres/gpu wants a device file each; no job here uses them): sbatch
  # --test-only can check the GPU job script's directives against the cluster
  printf 'Name=gpu File=%s\n' /dev/null /dev/zero /dev/full /dev/urandom > "$dir/gres.conf"
  export SLURM_CONF=$dir/slurm.conf
  slurmctld -i   # -i: ignore any state left in StateSaveLocation (there is none)
  slurmd -N "$node"
  for _ in $(seq 100); do
    if [[ $(sinfo -h -n "$node" -o %t 2>/dev/null) == idle ]]; then
      echo "export SLURM_CONF=$dir/slurm.conf"
      return 0
    fi
    sleep 0.2
  done
  echo "$0: the node did not become idle within 20 s; logs in $dir" >&2
  sinfo -N >&2 || true
  tail -n 5 "$dir/slurmctld.log" "$dir/slurmd.log" >&2 || true
  exit 1
}

case $action in
  start) start ;;
  stop) stop ;;
  *) usage ;;
esac
