#!/bin/bash
# Two benchmark scripts at once on a two-GPU machine, each pinned to one GPU with its own home, work folder
# and results file, so that every ratio is still the recipe against the engine in one process on one GPU:
#   bash bench/scripts/on_two_gpus.sh "ONLY=edit-fp8 bash bench/scripts/edit.sh" \
#                                     "bash bench/scripts/throughput_fp8.sh"
# The host's CPUs are shared, so GPU-busy figures (busy-200) must run alone: AFTER="..." runs once both are
# done. BUDGET is the whole command's, from its start. Results: $OUT/gpu0/results.jsonl and gpu1/, logs beside.
source "$(dirname "$0")/env.sh"  # once, before both: two pip installs into /tmp/site would race
for gpu in 0 1; do
  job=$([ $gpu = 0 ] && echo "$1" || echo "$2")
  mkdir -p "$OUT/gpu$gpu"
  [ -n "$job" ] && (export CUDA_VISIBLE_DEVICES=$gpu QWEN_BATCH_HOME=/tmp/qbh$gpu QWEN_BENCH_WORK=/tmp/qbw/gpu$gpu \
    OUT=$OUT/gpu$gpu; eval "$job") > "$OUT/gpu$gpu/log" 2>&1 &
done
wait
for gpu in 0 1; do echo "##### GPU $gpu"; tail -n "${TAIL:-45}" "$OUT/gpu$gpu/log"; done
[ -n "${AFTER:-}" ] && eval "$AFTER"
