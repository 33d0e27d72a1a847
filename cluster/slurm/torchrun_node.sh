#!/usr/bin/env bash
# One node of train.sbatch's torchrun launcher; srun runs it once per node.
#
#   torchrun_node.sh <torchrun arguments...>
#
# Runs torchrun with what it cannot find out by itself when a node's hostname does not resolve
# to the address the nodes talk on (common on clusters, and always so when it resolves to
# loopback):
#   --local-addr=<this node's NodeAddr>   the node's identity in the rendezvous; the first
#                                         node's becomes the ranks' MASTER_ADDR;
#   --rdzv-conf=is_host=1                 on the node whose NodeAddr is the rendezvous address
#                                         (MASTER_ADDR): it serves the c10d store. torch would
#                                         guess from the hostname, and a wrong guess leaves no
#                                         node serving it.
# and GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME set to the NodeAddr's interface unless already set
# (vwlmm_node_network in common.sh); the ranks inherit them.
set -euo pipefail
source "${VWLMM_ROOT:?VWLMM_ROOT is not set (train.sbatch sets it)}/cluster/slurm/common.sh"
vwlmm_node_network
rdzv_host=()
if [[ $VWLMM_NODE_ADDR == "${MASTER_ADDR:?MASTER_ADDR is not set (train.sbatch sets it)}" ]]; then
  rdzv_host=(--rdzv-conf=is_host=1)
fi
exec python -m torch.distributed.run --local-addr="$VWLMM_NODE_ADDR" "${rdzv_host[@]}" "$@"
