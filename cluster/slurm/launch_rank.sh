#!/usr/bin/env bash
# Runs ONE training process: the common tail of both launchers in train.sbatch.
#
#   launch_rank.sh <trainer command...>
#
# - Under VWLMM_LAUNCHER=srun (one Slurm task per process) it fills in torch.distributed's
#   variables (RANK, WORLD_SIZE, LOCAL_RANK, ...) from Slurm's; under torchrun they are set.
# - It sets this node's network variables (GLOO/NCCL_SOCKET_IFNAME from the NodeAddr's
#   interface, unless set; vwlmm_node_network in common.sh) where torchrun_node.sh has not.
# - It appends this rank's output to <job dir>/logs/rank-<RANK>.log; rank 0 is also copied to
#   the job's main output so `tail -f slurm-*.out` shows training progress.
# - It then execs the trainer, so Slurm's and torchrun's signals (SIGTERM/SIGUSR1 -> checkpoint
#   and exit) reach the trainer itself, and the rank's exit code is the trainer's.
set -euo pipefail
(( $# > 0 )) || { echo "usage: launch_rank.sh <trainer command...>" >&2; exit 2; }
source "${VWLMM_ROOT:?VWLMM_ROOT is not set (train.sbatch sets it)}/cluster/slurm/common.sh"
if [[ -z ${VWLMM_NODE_ADDR:-} ]]; then vwlmm_node_network; fi

if [[ ${VWLMM_LAUNCHER:-torchrun} == srun ]]; then
  export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID
  export GROUP_RANK=$SLURM_NODEID
  if [[ -n ${SLURM_NTASKS_PER_NODE:-} ]]; then export LOCAL_WORLD_SIZE=$SLURM_NTASKS_PER_NODE; fi
fi
: "${RANK:?RANK is not set: run under torchrun or with VWLMM_LAUNCHER=srun}"

log_dir="${VWLMM_JOB_DIR:?VWLMM_JOB_DIR is not set (train.sbatch sets it)}/logs"
mkdir -p "$log_dir"
log="$log_dir/rank-$RANK.log"
printf '==== attempt %s  node %s (%s, %s)  pid %s  rank %s/%s  %s\n' "${SLURM_RESTART_COUNT:-0}" \
  "${SLURMD_NODENAME:-$(hostname)}" "$VWLMM_NODE_ADDR" "${GLOO_SOCKET_IFNAME:-?}" "$$" "$RANK" \
  "${WORLD_SIZE:-?}" "$(date -Is)" >>"$log"
if [[ $RANK == 0 ]]; then
  # tee ignores the preemption signals: Slurm signals every process of the step, and a tee that
  # died on SIGTERM would break the trainer's stdout while it is writing its checkpoint.
  exec > >(trap '' TERM INT HUP USR1 USR2; exec tee -a "$log") 2>&1
else
  exec >>"$log" 2>&1
fi
exec "$@"
