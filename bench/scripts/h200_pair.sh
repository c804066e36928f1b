#!/bin/bash
# Two benchmark commands at once on a two-GPU machine (the device's nvidia-h200-x2), each pinned to one
# GPU with its own home, work folders and results file: every ratio is still the recipe against the
# engine in one process on one H200, and a session's 30 device minutes hold twice the runs. The host's CPUs are
# shared, so GPU-busy figures (busy-200, TRACE) run alone: AFTER="..." runs once both are done.
# BUDGET (560) is the whole call's, from its start: both commands and AFTER share that one deadline.
#   bash bench/scripts/h200_pair.sh "BF16_VARIANTS=... BUSY_STEPS=0 bash bench/scripts/h200_call2.sh" \
#                                   "FP8_VARIANTS=... bash bench/scripts/h200_call3.sh"
# Results: $OUT/results-gpu0.jsonl, -gpu1.jsonl (AFTER's in results.jsonl), logs $OUT/gpu0.log, gpu1.log.
source "$(dirname "$0")/fast_env.sh"  # once, before both: two pip installs into /tmp/site would race
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
for gpu in 0 1; do
  job=$([ $gpu = 0 ] && echo "$1" || echo "$2")
  # Own work folders too: two runs of one script (say fp8 at batch 4 and 8) would share --work folders.
  [ -n "$job" ] && (export CUDA_VISIBLE_DEVICES=$gpu QWEN_BATCH_HOME=/tmp/qbh$gpu J=$OUT/results-gpu$gpu.jsonl W=/tmp/qbw/gpu$gpu
    eval "$job") > "$OUT/gpu$gpu.log" 2>&1 &
done
wait
for gpu in 0 1; do echo "##### GPU $gpu"; tail -n ${TAIL:-45} "$OUT/gpu$gpu.log"; done
[ -n "${AFTER:-}" ] && eval "$AFTER"
echo "=== pair done $(date +%T)"
