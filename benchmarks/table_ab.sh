#!/usr/bin/env bash
# A re-tuned config table against the committed one, in one call (no Ray needed): the 8x512 kernel
# table (ALTO_AUTOTUNE=auto: configs come from the table) and the 8B grouped step, one process per
# arm: the step committed, new; the kernels committed, new; the step again (the GPU's drift falls
# on both). The same arm twice also shows how far two runs of the same code drift in loss. Logs and JSON under $OUT.
#   bash benchmarks/table_ab.sh [NEW_TABLE]    (default: benchmarks/results/tuned_<gpu>.json)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/alto_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/kernels:$PWD PYTHONUNBUFFERED=1
slug=$(python -c "import re,torch;print(re.sub(r'[^A-Za-z0-9]+','_',torch.cuda.get_device_name(0)).strip('_'))")
table=kernels/alto_kernels/tuned/$slug.json
new=${1:-benchmarks/results/tuned_$slug.json}
cp "$table" /tmp/table_committed.json
G=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -oiE 'h100|h200' | head -1 | tr A-Z a-z)
G=${G:-gpu}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  git log --oneline -1 2>/dev/null
  cmp -s /tmp/table_committed.json "$new" && echo "warning: $new is the committed table"
  use() { if [ "$1" = new ]; then cp "$new" "$table"; else cp /tmp/table_committed.json "$table"; fi; }
  i=0
  for step in engine:committed engine:new kquick:committed kquick:new engine:committed engine:new; do
    i=$((i + 1)); what=${step%%:*}; arm=${step#*:}
    use "$arm"
    echo "=== $i $arm $what"
    if [ "$what" = kquick ]; then
      python benchmarks/lora_kernels.py --quick --rep-ms 100 --graph-rep-ms 30 --out "$OUT/kquick_table_${arm}_$G.json"
    else
      python benchmarks/engine.py --shapes 8b --out "$OUT/engine_table_${arm}_${i}_$G.json" --summary /tmp/table_ab_summary.json
    fi
    echo "=== $i $arm $what rc=$?"
  done
  cp /tmp/table_committed.json "$table"
} 2>&1 | tee "$OUT/table_ab_$G.log"
