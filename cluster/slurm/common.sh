# Shell helpers shared by the vwlmm Slurm batch scripts (sourced, not executed).
#
# Everything here derives from what Slurm tells the job (SLURM_* variables, `scontrol`), so the
# same scripts run unchanged on a laptop-sized single-node Slurm and on a large cluster.

vwlmm_log() { printf '[vwlmm %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
vwlmm_die() { vwlmm_log "error: $*"; exit 2; }

# First host of the allocation: rank 0 / Ray head / rendezvous store live there.
vwlmm_first_host() { scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1; }

# The address Slurm itself uses for a node (its NodeAddr), as an IP when DNS can give one.
# Slurm's NodeAddr is the interface the cluster is wired for; the bare hostname may resolve to a
# different (or, on small setups, a loopback) address.
vwlmm_node_addr() {
  local host=$1 addr ip
  addr=$(scontrol show node -o "$host" 2>/dev/null | tr ' ' '\n' | sed -n 's/^NodeAddr=//p')
  addr=${addr:-$host}
  if [[ $addr =~ ^[0-9.]+$ || $addr == *:* ]]; then echo "$addr"; return; fi
  ip=$(getent ahostsv4 "$addr" 2>/dev/null | awk 'NR==1 {print $1}')
  echo "${ip:-$addr}"
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
