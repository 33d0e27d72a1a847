#!/usr/bin/env bash
# The GPU checks of this repo in one command, for a lent GPU host (see benchmarks/RESULTS.md).
# Expects megatron-core importable (wheels carried in .whl/ are installed to /tmp/site).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
OUT=${OUT:-/tmp/vwlmm-gpu-out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/megatron_core-0.19.2-*.whl && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
run() { echo "=== $*"; "$@" 2>&1 | grep -v -i "warn" | tee -a "$OUT/gpu_check.log"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu_check.log"
python3 -c "import torch, megatron.core as m; print('torch', torch.__version__, 'megatron-core', m.__version__)" | tee -a "$OUT/gpu_check.log"
run timeout 120 torchrun --nproc_per_node 1 --master_port 29612 benchmarks/gpu_parity.py
run timeout 150 python3 benchmarks/visual_word_kl.py
run timeout 240 torchrun --nproc_per_node 1 --master_port 29611 benchmarks/gpu_model_step.py
