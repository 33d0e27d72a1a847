#!/usr/bin/env bash
# One Ray node of ray_preprocess.sbatch; srun runs it once per node of the allocation.
#
#   ray_node.sh head   <ray start options...>
#   ray_node.sh worker <head GCS host:port> <ray start options...>
#
# Starts `ray start --block` on this node's Slurm address (NodeAddr), with its temp dir in
# VWLMM_RAY_TMPDIR (node-local, the same path on every node), and stays in the foreground so
# Slurm tracks it. The batch script's teardown (`scancel --signal=...`) stops it: SIGUSR2 after
# the job succeeded, SIGUSR1 after it failed; SIGTERM/SIGINT count as failed. It then passes
# SIGTERM to `ray start`, which stops every Ray process it started. USR1/USR2 rather than TERM
# because Slurm handles a TERM sent to a step as a cancellation and SIGKILLs it before Ray has
# cleaned up. A worker removes its temp dir after a success (the batch script removes the
# head's) and keeps it, with its logs, after a failure.
set -euo pipefail
source "${VWLMM_ROOT:?VWLMM_ROOT is not set}/cluster/slurm/common.sh"

role=${1:-}; shift || true
case $role in
  head) role_args=(--head) ;;
  worker) role_args=(--address="${1:?worker needs the head address}"); shift ;;
  *) vwlmm_die "usage: ray_node.sh head|worker ... (got '$role')" ;;
esac
tmp=${VWLMM_RAY_TMPDIR:?VWLMM_RAY_TMPDIR is not set (ray_preprocess.sbatch sets it)}
vwlmm_node_network

ray start --block "${role_args[@]}" --node-ip-address="$VWLMM_NODE_ADDR" --temp-dir="$tmp" \
  "$@" &
ray_pid=$!
stopping=0 succeeded=0
stop() { stopping=1 succeeded=$1; kill -TERM "$ray_pid" 2>/dev/null || true; }
trap 'stop 1' USR2
trap 'stop 0' USR1 TERM INT
rc=0
while kill -0 "$ray_pid" 2>/dev/null; do
  set +e; wait "$ray_pid"; rc=$?; set -e
done
# Asked to stop: a clean stop is success, whatever status the interrupted `wait` reported.
if (( stopping )); then
  if [[ $role == worker ]] && (( succeeded )); then
    rm -rf "$tmp"
    vwlmm_log "Ray worker on ${SLURMD_NODENAME:-$(hostname)} stopped; removed $tmp"
  fi
  exit 0
fi
exit "$rc"
