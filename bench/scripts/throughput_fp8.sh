#!/bin/bash
# Issue 7, fp8 (see docs/benchmarks.md): the recipe and the engine's fp8 mode (torchao, compiled) at
# batch 4 and 2 on an 80 GB card, in one process each with the recipe before and after.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export QWEN_BATCH_HOME=/tmp/qbh PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 DIFFUSERS_VERBOSITY=error TRANSFORMERS_VERBOSITY=error
B="python3 bench/qwen_image_gpu.py"; J=$OUT/results.jsonl; W=/tmp/qbw; S=${STEPS:-6}
deadline=$(( $(date +%s) + ${BUDGET:-560} ))
step() { local left=$(( deadline - $(date +%s) )); if [ $left -lt 20 ]; then echo "SKIP (time) $*"; return; fi
  echo "=== $(date +%T) [$left s left] $*"; timeout $left "$@" 2>&1 | grep -v "Loading\|it/s\]\|SyntaxWarning\|Configuration class" | tail -n ${TAIL:-25}; }
mem=$(awk '/MemTotal/ {print int($2/1048576)}' /proc/meminfo); [ "$mem" -lt 100 ] && export QWEN_BATCH_HOST_MEMORY_GIB=125
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/gpu.txt
python3 -c "import qwen_batch.model_source as m; m.ensure_tiny_model()"
step $B versus --steps $S --prompts 4 --variants fp8-compile-b4 --compile-cache $W/cc8 --work $W/vs4 --json $J
step $B versus --steps $S --prompts 2 --variants fp8-compile-b2 --compile-cache $W/cc8 --work $W/vs2 --json $J
echo "=== done $(date +%T)"
