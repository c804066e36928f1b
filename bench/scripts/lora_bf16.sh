#!/bin/bash
# Issue 16, call 1 (see docs/benchmarks.md): the Lightning recipe at full size against diffusers' own
# Lightning recipe and the 50-step recipe, qwen-batch bf16, in one process; then 64 rows over 4 adapter
# sets (fuses, switching time, recompiles). Results: $OUT/results.jsonl, dynamo's recompile log beside.
source "$(dirname "$0")/common.sh"
L="python3 bench/lora_gpu.py"
step $L lightning --variants bf16 --prompts 8 --work $W/l --json $J
echo "=== $(date +%T) switching (TORCH_LOGS=recompiles -> $OUT/switching.log)"
TORCH_LOGS=recompiles timeout $(( deadline - $(date +%s) )) $L switching --work $W/l --json $J > $OUT/switching.log 2>&1
grep -c "Recompiling" $OUT/switching.log; tail -n 3 $OUT/switching.log | cut -c1-1500
echo "=== done $(date +%T)"
