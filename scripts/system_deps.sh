#!/usr/bin/env bash
# System packages the tests need beyond PyPI (installed only when missing; root on CI).
set -euo pipefail
need=()
# Slurm + munge: tests/cluster starts a real single-node Slurm on 127.0.0.1, and a two-node one
# in network namespaces, which need ip (iproute2) and nsenter (util-linux) (tests/cluster/netns.py).
for pair in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge ip:iproute2 \
            nsenter:util-linux; do
  bin=${pair%%:*}; pkg=${pair#*:}
  command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "system_deps: missing ${need[*]}; not root or no apt-get, so not installing" \
         "(the tests that need them will skip and say why)" >&2
    exit 0
  fi
  # A temporary policy-rc.d (exit 101 = "action forbidden") keeps the packages' init scripts
  # from starting system-wide daemons; the tests start their own, privately configured ones.
  policy=/usr/sbin/policy-rc.d
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy"
    trap 'rm -f "$policy"' EXIT
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q && apt-get install -y -q --no-install-recommends "${need[@]}"
fi
