#!/bin/bash
# Issue 16, call 4: the GPU tests of adapter switching per memory mode (log: $OUT/gpu_tests.log), then
# 64 rows over 4 adapter sets in fp8 (eager: what quantizing again costs a switch).
source "$(dirname "$0")/common.sh"
L="python3 bench/lora_gpu.py"
timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider -W ignore::SyntaxWarning -s tests/test_gpu_adapters.py > $OUT/gpu_tests.log 2>&1
grep -E "/255|passed|failed|^FAILED|^E  " $OUT/gpu_tests.log | head -40
step $L switching --mode fp8 --compile off --work $W/l --json $J
echo "=== done $(date +%T)"
