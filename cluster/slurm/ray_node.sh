#!/usr/bin/env bash
# One Ray node of ray_preprocess.sbatch; srun runs it once per node of the allocation.
#
#   ray_node.sh head   <ray start options...>
#   ray_node.sh worker <head GCS host:port> <ray start options...>
#
# Starts `ray start --block` on this node's Slurm address (NodeAddr) and stays in the foreground
# so Slurm tracks it. On SIGUSR2 (the batch script's teardown, `scancel --signal=USR2`) or
# SIGTERM/SIGINT it passes SIGTERM to `ray start`, which then stops every Ray process it
# started. USR2 rather than TERM for the teardown because Slurm handles a TERM sent to a step
# as a cancellation and SIGKILLs it before Ray has cleaned up.
set -euo pipefail
source "${VWLMM_ROOT:?VWLMM_ROOT is not set}/cluster/slurm/common.sh"

role=${1:-}; shift || true
case $role in
  head) role_args=(--head) ;;
  worker) role_args=(--address="${1:?worker needs the head address}"); shift ;;
  *) vwlmm_die "usage: ray_node.sh head|worker ... (got '$role')" ;;
esac
node_addr=$(vwlmm_node_addr "${SLURMD_NODENAME:-$(hostname)}")

ray start --block "${role_args[@]}" --node-ip-address="$node_addr" "$@" &
ray_pid=$!
stopping=0
trap 'stopping=1; kill -TERM "$ray_pid" 2>/dev/null || true' USR2 TERM INT
rc=0
while kill -0 "$ray_pid" 2>/dev/null; do
  set +e; wait "$ray_pid"; rc=$?; set -e
done
# Asked to stop: a clean stop is success, whatever status the interrupted `wait` reported.
if (( stopping )); then exit 0; fi
exit "$rc"
