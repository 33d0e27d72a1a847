#!/usr/bin/env bash
# System packages the tests need beyond PyPI (installed only when missing; root on CI).
set -euo pipefail
need=()
# (filled in as subsystems need Debian packages, e.g. Slurm for cluster tests)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}"
fi
