# Shell helpers shared by the vwlmm Slurm batch scripts (sourced, not executed).
#
# Everything here derives from what Slurm tells the job (SLURM_* variables, `scontrol`), so the
# same scripts run unchanged on a laptop-sized single-node Slurm and on a large cluster.

vwlmm_log() { printf '[vwlmm %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
vwlmm_die() { vwlmm_log "error: $*"; exit 2; }

# First host of the allocation: rank 0 / Ray head / rendezvous store live there.
vwlmm_first_host() { scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1; }

# "name=addr ..." for the nodes of Slurm hostlist $1 (default: the job's): Slurm's NodeAddr of
# each, from one `scontrol` call. The batch scripts export the job's as VWLMM_NODE_ADDRS, so that
# the steps on every node (thousands of ranks under the srun launcher) find addresses without
# each asking slurmctld.
vwlmm_node_addrs() {
  scontrol show node -o "${1:-$SLURM_JOB_NODELIST}" | tr ' ' '\n' |
    awk -F= '$1 == "NodeName" {n = $2} $1 == "NodeAddr" {printf "%s%s=%s", sep, n, $2; sep = " "}'
}

# The address Slurm itself uses for a node (its NodeAddr), as an IP when DNS can give one.
# Slurm's NodeAddr is the interface the cluster is wired for; the bare hostname may resolve to a
# different (or, on small setups, a loopback) address. Looked up in VWLMM_NODE_ADDRS when set.
vwlmm_node_addr() {
  local host=$1 addr="" entry ip
  for entry in ${VWLMM_NODE_ADDRS:-}; do
    if [[ ${entry%%=*} == "$host" ]]; then addr=${entry#*=}; fi
  done
  if [[ -z $addr ]]; then
    entry=$(vwlmm_node_addrs "$host" 2>/dev/null) || true
    addr=${entry#*=}
  fi
  addr=${addr:-$host}
  if [[ $addr =~ ^[0-9.]+$ || $addr == *:* ]]; then echo "$addr"; return; fi
  ip=$(getent ahostsv4 "$addr" 2>/dev/null | awk 'NR==1 {print $1}')
  echo "${ip:-$addr}"
}

# The network interface that holds address $1 on this machine ('' when none does).
vwlmm_ifname_of() {
  command -v ip >/dev/null 2>&1 || return 0
  ip -o addr show 2>/dev/null | awk -v a="$1" '{split($4, p, "/"); if (p[1] == a) {print $2; exit}}'
}

# Network settings of the node a step runs on (call it on that node, inside the step):
#   VWLMM_NODE_ADDR     Slurm's NodeAddr of this node, the address its peers reach it on;
#   GLOO_SOCKET_IFNAME  the interface holding that address, unless already set. Without it gloo
#   NCCL_SOCKET_IFNAME  binds to what the hostname resolves to (loopback on many clusters, so
#                       peers on other nodes cannot connect) and NCCL may bootstrap on a NIC
#                       the other nodes cannot reach.
# Not in the batch script: each node derives its own (interface names differ between nodes).
vwlmm_node_network() {
  local node=${SLURMD_NODENAME:-$(hostname)} ifname
  VWLMM_NODE_ADDR=$(vwlmm_node_addr "$node")
  export VWLMM_NODE_ADDR
  ifname=$(vwlmm_ifname_of "$VWLMM_NODE_ADDR")
  if [[ -z $ifname ]]; then
    vwlmm_log "warning: no interface of $node holds its NodeAddr $VWLMM_NODE_ADDR;" \
      "GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME left as they are"
    return 0
  fi
  export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$ifname}
  export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$ifname}
}

# The nodes of this job whose slurmd does not take a TCP connection within $1 s (default 5),
# one per line: dead, or cut off from this node. Called after a step failed, to name the cause.
vwlmm_unresponsive_nodes() {
  local limit=${1:-5} port entry i pids=() names=()
  port=$(scontrol show config | awk '$1 == "SlurmdPort" {print $3}')
  for entry in ${VWLMM_NODE_ADDRS:-$(vwlmm_node_addrs)}; do
    timeout "$limit" bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$(vwlmm_node_addr "${entry%%=*}")" \
      "${port:-6818}" 2>/dev/null &
    pids+=($!) names+=("${entry%%=*}")
  done
  for i in "${!pids[@]}"; do wait "${pids[$i]}" || echo "${names[$i]}"; done
}

# A TCP port private to this job: 20000 + 10 * (job id mod 1200) + offset (offset 0..9), i.e.
# 20000-31999, below Linux's ephemeral range and above Ray's default worker ports (10002-19999).
# Two jobs sharing a node collide only if their ids are equal mod 1200.
vwlmm_job_port() {
  local offset=${1:-0}
  (( offset >= 0 && offset <= 9 )) || vwlmm_die "vwlmm_job_port: offset $offset not in 0..9"
  echo $(( 20000 + 10 * (SLURM_JOB_ID % 1200) + offset ))
}

# Where this job's logs go: VWLMM_JOB_DIR, else <VWLMM_LOG_ROOT or submit dir/slurm_logs>/<name>-<id>.
# Requeued runs keep the job id, so they write into the same directory (one file per attempt).
vwlmm_job_dir() {
  echo "${VWLMM_JOB_DIR:-${VWLMM_LOG_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}/slurm_logs}/${SLURM_JOB_NAME:-job}-${SLURM_JOB_ID}}"
}

# Training processes per node: VWLMM_NPROC_PER_NODE, else the GPUs Slurm gave this node
# (--gpus-per-node=[type:]G), else 1.
vwlmm_procs_per_node() {
  local gpus=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}
  gpus=${gpus##*:}
  echo "${VWLMM_NPROC_PER_NODE:-${gpus:-1}}"
}

# srun options that give each task the CPUs the job asked for. Since Slurm 22.05 srun does not
# inherit --cpus-per-task from sbatch; without this a torchrun task driving 8 GPUs could be
# pinned to a single core on clusters with task affinity.
vwlmm_srun_cpu_args() {
  if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then echo "--cpus-per-task=$SLURM_CPUS_PER_TASK"; fi
}
