#!/usr/bin/env bash
# The fused token cross-entropy checked and A/B'd on a GPU in the least device time (no Ray
# needed): kernel_check (every kernel, the cross-entropy at 4096 x 128256 included), the head +
# loss fwd+bwd against F.cross_entropy over an fp32 upcast (time, peak memory), then the 8B
# grouped step with ALTO_FUSED_CE on and off in one process (tok/s, peak memory, losses).
# Logs and JSON under $OUT.
#   bash benchmarks/ce_lean.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/alto_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/kernels:$PWD PYTHONUNBUFFERED=1 ALTO_FUSED_CE=1  # the arm --off ALTO_FUSED_CE sets it to 0
G=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -oiE 'h100|h200' | head -1 | tr A-Z a-z)
G=${G:-gpu}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  git log --oneline -1 2>/dev/null
  echo "=== kernel_check"; python benchmarks/kernel_check.py; echo "=== kernel_check rc=$?"
  echo "=== cross_entropy"
  python benchmarks/cross_entropy.py --tokens 4096,16384 --out "$OUT/cross_entropy_$G.json"
  echo "=== cross_entropy rc=$?"
  echo "=== engine"
  python benchmarks/engine.py --shapes 8b --off ALTO_FUSED_CE --out "$OUT/engine_fused_ce_$G.json" \
    --summary "$OUT/engine_fused_ce_summary_$G.json"
  echo "=== engine rc=$?"
} 2>&1 | tee "$OUT/ce_lean_$G.log"
