#!/usr/bin/env bash
# Runs benchmark phases on a lent GPU machine (the `device` tool) and leaves their JSON under $OUT.
#
#   bash benchmarks/device_run.sh kernels engine cpu      # one call, phases in order
#   bash benchmarks/device_run.sh sweep-alto sweep-asha
#   bash benchmarks/device_run.sh sweep-full-0-7
#
# The image has torch/triton/transformers/peft but no Ray / OR-Tools: those come from the site
# archive that ../shared/tools/device-site writes to .device/ (carry it). Results are written to
# benchmarks/results/ (as the committed commands say) and copied to $OUT with one log per call.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/alto_out}
mkdir -p "$OUT" benchmarks/results /tmp/site
if [ -f .device/site-py312.tar.xz ]; then
  tar xJf .device/site-py312.tar.xz -C /tmp/site
fi
# kernels/alto_kernels is imported as alto_kernels (pyproject's package-dir); the repo is not
# pip-installed there.
export PYTHONPATH=/tmp/site:$PWD/kernels:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
LOG=$OUT/device_run.log
touch /tmp/device_run.start
R=benchmarks/results
S=$R/summary.json
status=0

run() {  # run <name> <command...>: log it, keep going on failure, remember the failure
  echo "=== $1: ${*:2}" | tee -a "$LOG"
  local t0=$SECONDS
  "${@:2}" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "=== $1: rc=$rc in $((SECONDS - t0)) s" | tee -a "$LOG"
  [ "$rc" = 0 ] || status=1
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG"
# the card in result names of the phases that say $G (an H200 may come for an H100: its figures must
# not land in a file named after the other card)
G=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -oiE 'h100|h200|a100|l40s?' | head -1 | tr A-Z a-z)
G=${G:-gpu}
for phase in "$@"; do
  case "$phase" in
    tune)  # the config table: autotune the kernels over the shapes alto-ray meets; later phases of
           # this call use it (commit it to kernels/alto_kernels/tuned/ from $OUT)
      slug=$(python -c "import re,torch;print(re.sub(r'[^A-Za-z0-9]+','_',torch.cuda.get_device_name(0)).strip('_'))")
      run tune python benchmarks/tune_kernels.py --out $R/tuned_$slug.json
      mkdir -p kernels/alto_kernels/tuned && cp $R/tuned_$slug.json kernels/alto_kernels/tuned/$slug.json ;;
    multi-tenant-gpu)  # the multi-tenant example with its groups on the GPU (coordinator in GPU mode)
      run "$phase" python examples/multi_tenant.py --device cuda --workdir /tmp/alto_mt ;;
    quickstart)  # README's main job (examples/quickstart.py; its set-up step needs a network, the
                 # image has the packages): a GPU is present, so it trains there
      run "$phase" python examples/quickstart.py ;;
    epilogue)  # the one-node linear's epilogue variant (GEMMs add into the stored LoRA deltas) against
               # the in-kernel adds, same run: correctness, the 8x512 kernel cases, the engine
      run kernel_check python benchmarks/kernel_check.py
      run kernels-quick env ALTO_AUTOTUNE=full python benchmarks/lora_kernels.py --quick --out $R/kernels_h100_epilogue_quick.json
      run engine-epilogue python benchmarks/engine.py --shapes 1b,8b --off ALTO_LINEAR_EPILOGUE --out $R/engine_h100_epilogue.json --summary /tmp/epilogue_summary.json ;;
    ncu)  # hardware counters of the four LoRA kernels at the headline case (Nsight Compute, lora_ncu.py);
          # the report goes to $OUT beside the log
      command -v ncu >/dev/null || run ncu-missing python benchmarks/lora_ncu.py --plain
      run ncu bash -c "command -v ncu && ncu --clock-control none --profile-from-start off -k regex:lora_ --set full \
        --page details python benchmarks/lora_ncu.py > $OUT/ncu_lora_$G.txt 2>&1; rc=\$?; grep -c . $OUT/ncu_lora_$G.txt; \
        tail -5 $OUT/ncu_lora_$G.txt; exit \$rc" ;;
    candidates)  # the candidate configs (_common.CANDIDATE_CONFIGS): each pinned in (b), outputs and gradients
                 # against the table config's, (b)/(a) in device time; then correctness with them in the lists
      run candidates python benchmarks/candidates.py --out $R/candidates_$G.json
      run kernel_check env ALTO_AUTOTUNE=full ALTO_CANDIDATE_CONFIGS=1 python benchmarks/kernel_check.py ;;
    candidates-ab)  # one call that decides the candidates: candidates.py; if every output and gradient held,
                    # the table tuned again with them in the lists (written to the working tree's tuned/ and
                    # $OUT at once), the engine's 8B step with the kernels and table of $BEFORE against the
                    # working tree's, correctness with the new table, then, while the call has time, a second
                    # engine round and the dX pass's registers per config
      base_pp=$PYTHONPATH
      arm_pp() { if [ "$1" = before ]; then echo "$PWD/${BEFORE:?set BEFORE}:$base_pp"; else echo "$base_pp"; fi; }
      run candidates python benchmarks/candidates.py --out $R/candidates_$G.json
      cp $R/candidates_$G.json "$OUT"/ 2>/dev/null
      if python -c "import json,sys; d=json.load(open('$R/candidates_$G.json')); \
          m=max(v for s in d['shapes'].values() for k,rows in s.items() if k.startswith('lora_') for r in rows for v in r.get('max_rel_diff', {}).values()); \
          print('largest relative difference of any candidate:', m); sys.exit(0 if m < 3e-2 else 1)"; then
        slug=$(python -c "import re,torch;print(re.sub(r'[^A-Za-z0-9]+','_',torch.cuda.get_device_name(0)).strip('_'))")
        run tune-candidates env ALTO_CANDIDATE_CONFIGS=1 python benchmarks/tune_kernels.py --out $R/tuned_candidates_$slug.json
        cp $R/tuned_candidates_$slug.json kernels/alto_kernels/tuned/$slug.json
        cp $R/tuned_candidates_$slug.json "$OUT"/
        for arm in before after; do
          run engine-$arm env PYTHONPATH="$(arm_pp $arm)" python benchmarks/engine.py --shapes 8b --out $R/engine_cand_${arm}_$G.json --summary /tmp/engine_$arm.sum.json
        done
        run kernel_check env ALTO_CANDIDATE_CONFIGS=1 python benchmarks/kernel_check.py
        for arm in before after; do
          [ $SECONDS -lt 500 ] && run engine2-$arm env PYTHONPATH="$(arm_pp $arm)" python benchmarks/engine.py --shapes 8b --out $R/engine_cand2_${arm}_$G.json --summary /tmp/engine_$arm.sum.json
        done
        [ $SECONDS -lt 540 ] && run kernel-regs python benchmarks/kernel_regs.py --out $R/kernel_regs_$G.json
      else
        echo "a candidate changed an output: no re-tune" | tee -a "$LOG"; status=1
      fi ;;
    siblings-ab)  # sibling linears (q/k/v, gate/up) as one node (ALTO_SIBLING_LINEARS=1) or one node each:
                  # correctness (kernel_check's sibling checks), the engine's steps alternating (1B+8B, then
                  # 8B again), then where the 8B step's time goes with the grouping on
      run kernel_check python benchmarks/kernel_check.py
      for round in 1 2; do
        shapes=$([ $round = 1 ] && echo 1b,8b || echo 8b)
        for arm in 0 1; do
          run engine-siblings$arm-$round env ALTO_SIBLING_LINEARS=$arm python benchmarks/engine.py --shapes $shapes --out $R/engine_siblings${arm}_${round}_$G.json --summary /tmp/engine_siblings.sum.json
        done
      done
      run eprofile-siblings env ALTO_SIBLING_LINEARS=1 python benchmarks/engine_profile.py --shape 8b ;;
    siblings-pass-ab)  # the siblings' dX in one lora_bwd_dx_siblings pass (ALTO_SIBLING_DX_PASS=1) against a
                       # lora_bwd_dx each ("chained", ALTO_SIBLING_DX_PASS=0), alternating, then a node each
                       # (ALTO_SIBLING_LINEARS=0): correctness, where the 8B step's time goes, the engine's 8B step
      run kernel_check python benchmarks/kernel_check.py ${KCHECK_ARGS:-}
      sib_env() { case $1 in off) echo ALTO_SIBLING_LINEARS=0;; pass) echo ALTO_SIBLING_DX_PASS=1;;
                              chained) echo ALTO_SIBLING_DX_PASS=0;; esac; }
      for arm in chained pass chained pass off; do
        run eprofile-siblings-$arm env $(sib_env $arm) python benchmarks/engine_profile.py --shape 8b --steps 5
      done
      i=0
      for arm in chained pass chained pass; do
        i=$((i + 1))
        run engine-siblings-$arm-$i env $(sib_env $arm) python benchmarks/engine.py --shapes 8b --out $R/engine_siblings_${arm}_${i}_$G.json --summary /tmp/engine_siblings.sum.json
      done ;;
    shrink-rows)  # the forward shrink split over rows (no split-K tickets) against the production one
      run shrink-rows python benchmarks/shrink_rows.py ;;
    rows-ab)  # the candidate configs (ALTO_CANDIDATE_CONFIGS=1: the shrink's row split, the dY pass without B's look-ahead): correctness with every case autotuned,
              # then the 8x512 table with the kernels of $BEFORE (a copy without them, as kernels-ab) and
              # the working tree's, alternating
      base_pp=$PYTHONPATH
      arm_pp() { if [ "$1" = before ]; then echo "$PWD/${BEFORE:?set BEFORE}:$base_pp"; else echo "$base_pp"; fi; }
      [ "${ROWS_CHECK:-1}" = 1 ] && run kernel_check env ALTO_AUTOTUNE=full ALTO_CANDIDATE_CONFIGS=1 python benchmarks/kernel_check.py
      for arm in ${ROWS_ARMS:-before after}; do
        run kquick-$arm env PYTHONPATH="$(arm_pp $arm)" ALTO_AUTOTUNE=full ALTO_CANDIDATE_CONFIGS=1 python benchmarks/lora_kernels.py --quick --out $R/kernels_quick_rows_${arm}_$G.json
      done ;;
    kcheck)  # correctness only, at the 8B shapes
      run kernel_check python benchmarks/kernel_check.py ;;
    kernels)  # every case autotuned for itself (ALTO_AUTOTUNE=full): the kernels at their best
      run kernel_check python benchmarks/kernel_check.py
      run kernels env ALTO_AUTOTUNE=full python benchmarks/lora_kernels.py --out $R/kernels_h100.json --summary $S ;;
    kprofile-op)  # per-kernel device time, per 8B shape: base, (b) fused_linear_multi_lora, (b'') the sink one-node path
      run kprofile-op python benchmarks/lora_kernels.py --profile --profile-only --out /tmp/kprof.json ;;
    kquick)  # the 8x512 cases only (the headline's), every case autotuned for itself; summary untouched
      run kquick env ALTO_AUTOTUNE=full python benchmarks/lora_kernels.py --quick --out $R/kernels_quick_${TAG:-h100}.json ;;
    chunk-ab)  # rows per chunk (ALTO_LORA_CHUNK; lora_bwd_dy's BLOCK_M and the dA/dB atomics' grain):
               # per-kernel profiles at 64 (default), 128, 256; then the 8x512 table and the engine's 8B
               # step at 64 and 128, each pair in this call
      for c in 64 128 256; do
        run kprofile-chunk$c env ALTO_AUTOTUNE=full ALTO_LORA_CHUNK=$c python benchmarks/lora_kernels.py --profile --profile-only
      done
      run kernel_check-chunk128 env ALTO_LORA_CHUNK=128 python benchmarks/kernel_check.py
      for c in 64 128; do
        run kquick-chunk$c env ALTO_AUTOTUNE=full ALTO_LORA_CHUNK=$c python benchmarks/lora_kernels.py --quick --out $R/kernels_quick_chunk${c}_${TAG:-h100}.json
      done
      for c in 64 128; do
        run engine-chunk$c env ALTO_LORA_CHUNK=$c python benchmarks/engine.py --shapes 8b --out $R/engine_chunk${c}_${TAG:-h100}.json --summary /tmp/engine_chunk$c.json
      done ;;
    refresh)  # the committed figures with the current code: correctness at the 8B shapes, the full kernels
              # table and the engine's 1B/8B check, both written to summary.json
      run kernel_check python benchmarks/kernel_check.py
      run kernels env ALTO_AUTOTUNE=full python benchmarks/lora_kernels.py --out $R/kernels_$G.json --summary $S
      run engine python benchmarks/engine.py --shapes 1b,8b --out $R/engine_${G}_refresh.json --summary $S ;;
    kconfigs)  # the shrink / dY / dX passes autotuned over a wide grid at the 8x512 r16 case, then (b)
               # in device time with the committed lists' best and with the grid's best, same call
      run kconfigs python benchmarks/kernel_configs.py --out $R/kernel_configs_$G.json ;;
    kernels-ab)  # two arms in one call: the kernels in $BEFORE (a copy of kernels/alto_kernels from an earlier
                 # commit, importable as alto_kernels: git archive <commit> kernels/alto_kernels | tar x ...) and
                 # the working tree's; correctness first, then per-kernel profiles, the 8x512 table and the
                 # engine's 8B step, alternating ($AB_ROUNDS rounds of profiles and engine steps, default 2)
      base_pp=$PYTHONPATH
      arm_pp() { if [ "$1" = before ]; then echo "$PWD/${BEFORE:?set BEFORE}:$base_pp"; else echo "$base_pp"; fi; }
      arms=$(for _ in $(seq ${AB_ROUNDS:-2}); do echo before after; done)
      run kernel_check python benchmarks/kernel_check.py
      for arm in $arms; do
        run kprofile-$arm env PYTHONPATH="$(arm_pp $arm)" ALTO_AUTOTUNE=full python benchmarks/lora_kernels.py --profile --profile-only
      done
      for arm in before after; do
        run kquick-$arm env PYTHONPATH="$(arm_pp $arm)" ALTO_AUTOTUNE=full python benchmarks/lora_kernels.py --quick --out $R/kernels_quick_${arm}_${TAG:-h100}.json
      done
      for arm in $arms; do
        run engine-$arm env PYTHONPATH="$(arm_pp $arm)" python benchmarks/engine.py --shapes 8b --out $R/engine_ab_${arm}_${TAG:-h100}.json --summary /tmp/engine_$arm.sum.json
      done ;;
    host-ab)  # host cost, two arms in one call ($BEFORE as kernels-ab): kernel_host.py (host time per call
              # and cProfile of the hot case) alternating, correctness, then per arm the 8x512 table and
              # the engine's 1B (host-bound) and 8B steps, alternating
      base_pp=$PYTHONPATH
      arm_pp() { if [ "$1" = before ]; then echo "$PWD/${BEFORE:?set BEFORE}:$base_pp"; else echo "$base_pp"; fi; }
      for arm in before after before after; do
        run khost-$arm env PYTHONPATH="$(arm_pp $arm)" python benchmarks/kernel_host.py
      done
      run kernel_check python benchmarks/kernel_check.py
      for arm in before after; do
        run kquick-$arm env PYTHONPATH="$(arm_pp $arm)" ALTO_AUTOTUNE=full python benchmarks/lora_kernels.py --quick --out $R/kernels_quick_host_${arm}_$G.json
      done
      for round in 1 2; do
        for arm in before after; do
          run engine-$arm env PYTHONPATH="$(arm_pp $arm)" python benchmarks/engine.py --shapes 1b,8b --out $R/engine_host_${arm}_${round}_$G.json --summary /tmp/engine_$arm.sum.json
        done
      done ;;
    kheadline)  # the 8x512 cases (the headline's) with the current code, merged into summary.json
      run kheadline env ALTO_AUTOTUNE=full python benchmarks/lora_kernels.py --quick --out $R/kernels_headline_h100.json --summary $S ;;
    khost-apply)  # alto's autograd Functions through torch's Function.apply wrapper or straight (_common.DIRECT_APPLY)
      run khost-apply python benchmarks/kernel_host.py --ab _common.DIRECT_APPLY --rounds 10 --calls 300 ;;
    sync)  # does a LoRA fwd+bwd wait for the GPU? host cost per call issued while the GPU sleeps
      run sync python benchmarks/sync_probe.py --engine 1b ;;
    gc)  # the grouped 1B step with Python's cyclic collector held off inside it or not, alternating
      run gc python benchmarks/gc_step.py --shape 1b --steps 60 --rounds 4 --out $R/gc_step_$G.json ;;
    khost)  # where the launcher's host time goes (cProfile of the hot case)
      run khost python benchmarks/kernel_host.py ;;
    kprofile)  # per-kernel device time of the hot case and a chunk-size sweep, then the 8x512 cases
      run kprofile python benchmarks/lora_kernels.py --profile --chunks 32,64,128,256 --quick --out /tmp/kquick.json ;;
    engine)  # with same-run A/Bs: all fused backbone ops off (the backbone's own), then each of the two newest off
      run engine python benchmarks/engine.py --shapes 1b,8b --eager-ops-too --off ALTO_FUSED_ROPE --off ALTO_FUSED_LINEAR --out $R/engine_h100.json --summary $S ;;
    lgemm)  # the one-node linear with alto's own GEMMs (LoRA expand in the epilogue) vs cuBLAS, then
            # the engine's 8B step with them (ALTO_LINEAR_GEMM=1) beside the engine check
      run lgemm python benchmarks/lora_gemm.py --out $R/lora_gemm_h100.json
      run engine-check python benchmarks/engine.py --shapes 1b,8b --out $R/engine_h100_check.json --summary /tmp/check_summary.json
      run engine-gemm env ALTO_LINEAR_GEMM=1 python benchmarks/engine.py --shapes 8b --out $R/engine_h100_gemm.json --summary /tmp/gemm_summary.json ;;
    lgemm-flat)  # lora_gemm with and without the flattened configs (static segment walk), same call
      run lgemm-noflat python benchmarks/lora_gemm.py --flatten off --ranks r16 --out $R/lora_gemm_h100_noflat.json
      run lgemm python benchmarks/lora_gemm.py --out $R/lora_gemm_h100.json ;;
    engine-gemm)  # the engine's 8B step with ALTO_LINEAR_GEMM=1 and (arm engine_off_linear_gemm) without, same run
      run engine-gemm env ALTO_LINEAR_GEMM=1 python benchmarks/engine.py --shapes 8b --off ALTO_LINEAR_GEMM --out $R/engine_${TAG:-h100}_gemm.json --summary /tmp/gemm_summary.json ;;
    kernels-aside)  # the kernels table on another card (TAG=h200 ...): its own JSON, summary.json untouched
      run kernel_check python benchmarks/kernel_check.py
      run kernels env ALTO_AUTOTUNE=full python benchmarks/lora_kernels.py --out $R/kernels_${TAG:-h100}.json ;;
    engine-check)  # the engine's figures with the current code, not written to the summary (a check)
      run "$phase" python benchmarks/engine.py --shapes 1b,8b --out $R/engine_h100_check.json --summary /tmp/check_summary.json ;;
    engine-sdpa)  # the engine with cuDNN attention allowed again (ALTO_SDPA_SKIP_CUDNN=0), same run
      run engine-sdpa python benchmarks/engine.py --shapes 1b,8b --off ALTO_SDPA_SKIP_CUDNN --out $R/engine_h100.json --summary $S ;;
    graphs)  # the grouped step eager vs replayed as a CUDA graph: losses/weights check, then timing
      run graphs python benchmarks/graph_step.py --shapes 1b,8b --profile --out $R/graph_step_h100.json --summary $S ;;
    graph-tune)  # the same Tune sweep with LoRATask(cuda_graphs=False) and True, text of varying length
      run graph-tune python benchmarks/graph_tune.py --out $R/graph_tune_h100.json ;;
    pack)  # host time of packing a step's batch, before/after, GPU idle and busy
      run pack python benchmarks/pack_host.py --out $R/pack_host_h100.json ;;
    blas)  # host and device time of the base GEMMs per BLAS library (cuBLASLt, cuBLAS)
      run blas python benchmarks/blas_host.py --out $R/blas_host_h100.json ;;
    hprofile)  # where the 1B step's host time goes (it is host-bound) and its kernels
      run hprofile python benchmarks/engine_profile.py --shape 1b --host ;;
    eprofile)  # where the grouped engine's 8B step spends its device time
      run eprofile python benchmarks/engine_profile.py --shape 8b ;;
    engine-nosink)  # the same with the kernels returning LoRA grads through autograd (A/B of the sink)
      run engine-nosink env ALTO_GRAD_SINK=0 python benchmarks/engine.py --shapes 1b,8b --out $R/engine_h100_nosink.json --summary /tmp/nosink_summary.json ;;
    gprofile)  # the sweep's grouped step in the engine alone (no Ray): time and cProfile
      run gprofile python benchmarks/group_profile.py ;;
    cpu)  # the CPU benchmarks, on the GPU machine's 16 cores
      run scheduler python benchmarks/scheduler.py --out $R/scheduler.json --summary $S
      run allocator python benchmarks/allocator.py --out $R/allocator.json --summary $S ;;
    sweep-alto)
      run "$phase" python benchmarks/sweep.py --arm alto --out $R/sweep_alto.json --time-budget 540 ;;
    sweep-asha)  # without actor reuse 15 of 16 trials fit in 540 s (about 25 s of start-up per trial)
      run "$phase" python benchmarks/sweep.py --arm asha --reuse-actors --out $R/sweep_asha.json --time-budget 540 ;;
    multigpu)  # rank-local vs FSDP; needs a 2-GPU kind (nvidia-h200-x2)
      run multigpu torchrun --nproc_per_node 2 benchmarks/multigpu.py --out $R/multigpu_h200x2.json --summary $S ;;
    ranklocal-one)  # the Ray-actor rank-local path with one rank (NCCL world of one): any 1-GPU machine
      run "$phase" python benchmarks/ranklocal_tune.py --ranks 1 --out $R/ranklocal_one_gpu_h100.json ;;
    ranklocal-fused)  # a sharded backbone with the fused norms, SwiGLU and one-node linears against
                      # without them (the sharded path before), one rank, alternating; then ranklocal-one
      for round in 1 2; do
        run "unfused-$round" env ALTO_FUSED_NORM=0 ALTO_FUSED_MLP=0 ALTO_FUSED_LINEAR=0 torchrun --nproc_per_node 1 benchmarks/multigpu.py --out $R/ranklocal_one_rank_8b_unfused_$round.json
        run "fused-$round" torchrun --nproc_per_node 1 benchmarks/multigpu.py --out $R/ranklocal_one_rank_8b_fused_$round.json
      done
      run ranklocal-one python benchmarks/ranklocal_tune.py --ranks 1 --out $R/ranklocal_one_gpu_h100_fused.json ;;
    ranklocal-tune)  # a gpus_per_group=2 task through Ray Tune vs one GPU; needs nvidia-h200-x2
      run ranklocal-tune python benchmarks/ranklocal_tune.py --out $R/ranklocal_tune_h200x2.json ;;
    sweep-full-*)
      slice=${phase#sweep-full-}
      run "$phase" python benchmarks/sweep.py --arm full --configs "$slice" --out $R/sweep_full_"${slice/-/_}".json ;;
    *) echo "unknown phase $phase" | tee -a "$LOG"; status=1 ;;
  esac
done
# Only what this call wrote: $OUT takes a limited number of files.
find $R -name '*.json' -newer /tmp/device_run.start -exec cp {} "$OUT"/ \;
exit $status
