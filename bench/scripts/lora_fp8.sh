#!/bin/bash
# Issue 16, call 2 (see docs/benchmarks.md): the same Lightning comparison for qwen-batch fp8 (torchao,
# compiled; adapters fused in bf16, then quantized), then the GPU tests of adapter switching per mode.
source "$(dirname "$0")/common.sh"
L="python3 bench/lora_gpu.py"
step $L lightning --variants fp8 --prompts 8 --work $W/l --json $J
TAIL=30 step python3 -m pytest -q -m gpu -p no:cacheprovider -W ignore::SyntaxWarning tests/test_gpu_adapters.py
echo "=== done $(date +%T)"
