#!/bin/bash
# Issue 16, call 3 (see docs/benchmarks.md): the GPU tests of adapter switching per memory mode, then
# 64 rows over 4 adapter sets in bf16 (compiled; TORCH_LOGS=recompiles -> $OUT/switching.log) and in
# fp8 (eager: the time a switch takes to quantize again), with the parts of each switch.
source "$(dirname "$0")/common.sh"
L="python3 bench/lora_gpu.py"
TAIL=40 step python3 -m pytest -q -m gpu -p no:cacheprovider -W ignore::SyntaxWarning -s tests/test_gpu_adapters.py
echo "=== $(date +%T) switching bf16"
TORCH_LOGS=recompiles timeout $(( deadline - $(date +%s) )) $L switching --work $W/l --json $J > $OUT/switching.log 2>&1
echo "recompiles logged: $(grep -c Recompiling $OUT/switching.log)"; tail -n 1 $OUT/switching.log | cut -c1-1800
step $L switching --mode fp8 --compile off --work $W/l --json $J
echo "=== done $(date +%T)"
