#!/usr/bin/env bash
# The fill-free forward checked and A/B'd on a GPU in the least device time (no Ray needed):
# kernel_check with the shrink's tickets on, the 8x512 table with the kernels in $BEFORE (default
# ab_before/kernels: a copy of the kernels before it) and with the working tree's, then the sync
# probe. Logs and JSON under $OUT.
#   bash benchmarks/fills_lean.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/alto_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/kernels:$PWD PYTHONUNBUFFERED=1 ALTO_SHRINK_TICKETS=1
before=${BEFORE:-ab_before/kernels}
if [ ! -d "$before/alto_kernels" ]; then  # made before the call, beside the working tree (untracked, so it travels)
  echo "no $before/alto_kernels: mkdir -p ab_before && git archive 303445d kernels/alto_kernels | tar x -C ab_before" >&2
  exit 2
fi
G=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -oiE 'h100|h200' | head -1 | tr A-Z a-z)
G=${G:-gpu}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  git log --oneline -1 2>/dev/null
  echo "=== kernel_check"; python benchmarks/kernel_check.py; echo "=== kernel_check rc=$?"
  for arm in before after; do
    pp=$PYTHONPATH; [ "$arm" = before ] && pp=$PWD/$before:$PYTHONPATH
    echo "=== kquick-$arm"
    PYTHONPATH=$pp ALTO_AUTOTUNE=full python benchmarks/lora_kernels.py --quick --out "$OUT/kernels_quick_fills_${arm}_$G.json"
    echo "=== kquick-$arm rc=$?"
  done
  echo "=== sync"; python benchmarks/sync_probe.py; echo "=== sync rc=$?"
} 2>&1 | tee "$OUT/fills_lean_$G.log"
